"""Offline tools for modmoe checkpoints: ``python -m checkpoints_tools inspect|validate|consolidate``.

Converting between DeepSpeed and DCP layouts is not here yet (DeepSpeed is not a dependency).
"""
