"""Sharded, atomic, optionally async checkpoints built on torch.distributed.checkpoint."""

from modmoe.checkpoint.config import CheckpointConfig
from modmoe.checkpoint.manager import CheckpointManager, find_latest_valid, list_checkpoints
from modmoe.checkpoint.manifest import CheckpointError, Manifest, read_manifest, step_dirname, validate
from modmoe.checkpoint.rng import capture_rng, restore_rng
from modmoe.checkpoint.train_state import TrainState

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "Manifest",
    "TrainState",
    "capture_rng",
    "find_latest_valid",
    "list_checkpoints",
    "read_manifest",
    "restore_rng",
    "step_dirname",
    "validate",
]
