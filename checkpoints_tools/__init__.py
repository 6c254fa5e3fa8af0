"""Offline tools for modmoe checkpoints: ``python -m checkpoints_tools inspect|validate|consolidate|convert``.

``convert`` translates DeepSpeed checkpoints to and from DCP; reading them does not import DeepSpeed.
"""
