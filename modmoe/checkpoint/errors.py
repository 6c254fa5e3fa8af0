"""The error type of checkpoint saving, loading and validation."""

from __future__ import annotations

from modmoe.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be saved or loaded; the message is one line naming the problem."""
