"""The project's own error types.

A :class:`UserError` says that something the user handed us (a config, a corpus, a tokenizer,
a checkpoint, an export, a run directory) or the machine it runs on cannot be used, and what is
allowed instead. The command line reports it in one line and exits with status 2. Any other
exception is a bug and reaches the user with its full traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error that is reported in one line (never with a traceback)."""
