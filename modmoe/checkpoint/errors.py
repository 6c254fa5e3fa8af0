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
    elif err.__context__ is not None and err.__context__ is not err and not err.__suppress_context__:
        # torch's zip writer swallows the OSError of a failed write into the context of its own
        # "[enforce fail at inline_container.cc] ... unexpected pos" RuntimeError.
        yield from iter_causes(err.__context__, depth + 1)


_TORCH_WRITER_FAILURE = ("PytorchStreamWriter failed", "inline_container.cc")


def environment_failure(err: BaseException) -> str | None:
    """What the machine did to a save, for a one-line message, or None when ``err`` is a bug:
    an ``OSError`` anywhere among its causes (a full disk, a quota, a read-only or vanished
    directory), or torch's zip writer failing a write without saying why."""
    for cause in iter_causes(err):
        if isinstance(cause, OSError):
            where = f" ({cause.filename})" if cause.filename else ""
            return f"{cause.strerror or cause}{where}"
    for cause in iter_causes(err):
        if isinstance(cause, RuntimeError) and any(s in str(cause) for s in _TORCH_WRITER_FAILURE):
            return "torch's checkpoint writer could not write a file (a full disk or quota?)"
    return None
