"""The project's own error types.

A :class:`UserError` says that something the user handed us (a config, a corpus, a tokenizer,
a checkpoint, an export, a run directory) or the machine it runs on cannot be used, and what is
allowed instead. The command line reports it in one line and exits with status 2. Any other
exception is a bug and reaches the user with its full traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """Base of every error that is reported in one line (never with a traceback)."""


class OutputError(UserError):
    """An output location that cannot be written (read-only, full, gone) or that is not
    modmoe's to replace; one line naming it and what to do."""


def os_error_text(err: OSError) -> str:
    """``strerror (file)`` of an operating-system error, for a one-line message."""
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or err}{where}"


@contextlib.contextmanager
def os_errors_in_one_line(what: str) -> Iterator[None]:
    """Turns an ``OSError`` raised inside (a read-only output directory, a full disk or quota, a
    path that vanished) into one :class:`OutputError` line: ``what: strerror (file)``."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{what}: {os_error_text(err)}") from None
