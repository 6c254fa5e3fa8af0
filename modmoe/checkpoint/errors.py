"""The error type of checkpoint saving, loading and validation."""

from __future__ import annotations

from modmoe.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be saved or loaded; the message is one line naming the problem."""


def iter_causes(err: BaseException, depth: int = 0):
    """``err`` and what it wraps: the per-rank exceptions of DCP's ``CheckpointException``
    (values are ``(exception, traceback)``) and ``__cause__`` chains (libraries that re-raise)."""
    if depth > 8:
        return
    yield err
    for failure in (getattr(err, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exception", failure)
        if isinstance(inner, BaseException):
            yield from iter_causes(inner, depth + 1)
    if err.__cause__ is not None and err.__cause__ is not err:
        yield from iter_causes(err.__cause__, depth + 1)
