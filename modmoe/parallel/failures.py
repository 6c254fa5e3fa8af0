"""A failed collective: tell a lost or hung peer apart from a bug, say so in one line, exit.

When a node dies, the ranks on the other nodes are blocked in a collective with a peer that
will never answer. With ``parallel.timeout_s`` on every process group (see
:func:`modmoe.parallel.distributed.init_distributed`), gloo raises in the blocked call once the
timeout has passed (or at once, when the peer's connection is reset); NCCL's watchdog aborts
the communicator. :func:`exit_on_comm_failure` turns such an error into one log line naming
the cause and exit status :data:`EXIT_PEER_LOST`, without tearing down the process group (whose
peers are gone, so its teardown could block or abort). Any other exception propagates with its
traceback: it is a bug, not a lost node.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist

EXIT_PEER_LOST = 75
"""Exit status of a rank whose collective failed (``EX_TEMPFAIL``: the job may be retried)."""

# Substrings of the errors torch's backends raise (seen in torch 2.13: gloo's tcp transport,
# the TCPStore, ProcessGroupNCCL's watchdog and abort paths).
_TIMED_OUT = ("timed out", "timeout")
_LOST = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "connection refused",
    "no route to host",
    "nccl communicator was aborted",
    "ncclremoteerror",
    "ncclsystemerror",
)
_FROM_COMM = ("gloo", "nccl", "c10d", "tcpstore", "processgroup")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def comm_failure(exc: BaseException) -> str | None:
    """One line describing ``exc`` if it (or an exception in its chain) is a failed collective
    or rendezvous-store operation, else ``None``."""
    for err in _chain(exc):
        text = str(err)
        lowered = text.lower()
        is_comm = isinstance(err, dist.DistError) or (
            isinstance(err, RuntimeError) and any(m in lowered for m in _FROM_COMM)
        )
        if not is_comm:
            continue
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
        if len(first) > 240:
            first = first[:237] + "..."
        if any(m in lowered for m in _LOST):
            cause = "the connection to a peer rank was lost (its process or node died)"
        elif any(m in lowered for m in _TIMED_OUT):
            cause = "a peer rank did not answer within parallel.timeout_s (its node is gone or it hangs)"
        else:
            cause = "a collective failed"
        return f"{cause}: {type(err).__name__}: {first}"
    return None


@contextmanager
def exit_on_comm_failure(log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Runs the block; if it raises a failed collective, logs one line (``rank R: ...``) and
    ends the process with :data:`EXIT_PEER_LOST` at once. The block's own ``finally`` clauses
    (checkpoint writer, MLflow run, data workers) have run by then."""
    try:
        yield
    except Exception as exc:
        cause = comm_failure(exc)
        if cause is None:
            raise
        rank = os.environ.get("RANK", "0")
        line = f"error: rank {rank}: {cause}; exiting with status {EXIT_PEER_LOST} so that the job can be requeued"
        (log or (lambda msg: print(msg, file=sys.stderr)))(line)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: interpreter shutdown would destroy a process group whose peers are gone.
        os._exit(EXIT_PEER_LOST)
