"""The one error type the data pipeline raises for bad files and bad inputs."""

from __future__ import annotations

from modmoe.errors import UserError


class DataError(UserError, ValueError):
    """A data problem (missing, empty, damaged or unreadable file), reported as one line that
    names the file or field and what is wrong."""
