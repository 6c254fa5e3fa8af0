"""The one error type of ``checkpoints_tools convert``."""

from __future__ import annotations

from modmoe.errors import UserError


class ConvertError(UserError, ValueError):
    """A checkpoint cannot be converted; the message is one line naming the file or field and
    what is allowed."""
