"""Configuration of periodic sharded checkpoints."""

from __future__ import annotations

from pydantic import Field

from modmoe.config_base import ConfigModel

DIRNAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"  # one path component


class CheckpointConfig(ConfigModel):
    interval_steps: int = Field(default=1000, ge=0)
    """Save every this many optimizer steps (0 = no step-based saves)."""

    interval_minutes: float | None = Field(default=None, gt=0)
    """Also save when this many wall-clock minutes passed since the last save (``None`` = off).
    Rank 0's clock decides, so all ranks agree."""

    keep_last: int = Field(default=3, ge=0)
    """Keep the newest this many checkpoints, delete older ones (0 = keep all)."""

    keep_every: int = Field(default=0, ge=0)
    """Checkpoints whose step is a multiple of this are never deleted (0 = off)."""

    async_save: bool = False
    """Write checkpoints in a background thread so training goes on; the state is first copied
    to CPU memory, and at most one save is in flight."""

    dirname: str = Field(default="checkpoints", min_length=1, pattern=DIRNAME_PATTERN)
    """Directory of the checkpoints inside the run directory: one path component (letters,
    digits, ``_``, ``.``, ``-``), so that saves and their clean-up stay inside the run."""
