"""Training engines besides the native one (``modmoe.model`` + ``modmoe.parallel``).

Each engine lives in its own subpackage and imports its heavy dependencies lazily, so that
``import modmoe`` never needs them.
"""
