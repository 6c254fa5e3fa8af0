"""One training job per run directory: an exclusive ``flock`` on ``RUN_DIR/.modmoe.lock``.

Rank 0 takes the lock before it writes anything into the run directory and holds it for the
whole run; the kernel releases it when the process exits, however it exits (an exception,
SIGKILL, a node crash on a local filesystem), so a lock left by a dead process is never seen
as held. The file records who holds it (host, pid, Slurm job id, start time) only so that a
refusal can say so; the record is never what decides.

Slurm requeue: the old job's processes are gone before the job runs again, so the lock is
free. On a network filesystem the lock of a node that died without releasing it lives until
the server expires it (NFSv4: one lease, ~90 s; NFSv3 through lockd: when the client's
state is recovered). A holder whose record has our own Slurm job id is therefore waited for
(up to :data:`REQUEUE_WAIT_S`) instead of refused: it is this job's previous incarnation.
Filesystems without ``flock`` support (Lustre mounted without ``-o flock``) cannot lock: the
run warns once and goes on without a lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from modmoe.errors import UserError

LOCK_FILE = ".modmoe.lock"
REQUEUE_WAIT_S = 180.0
log = logging.getLogger("modmoe.train")


class RunDirLockedError(UserError, RuntimeError):
    """Another job holds the run directory; one line saying who."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(record: dict) -> str:
    host, pid = record.get("host", "?"), record.get("pid", "?")
    parts = [f"pid {pid} on {host}"]
    if record.get("slurm_job_id"):
        parts.append(f"Slurm job {record['slurm_job_id']}")
    if isinstance(record.get("started_unix"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started_unix"])))
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        parts.append("(that pid is gone: a process it started still holds the lock)")
    return ", ".join(parts)


class RunLock:
    """``acquire`` takes the lock or raises :class:`RunDirLockedError`; ``release`` (or process
    exit) gives it back."""

    def __init__(self, run_dir: str | os.PathLike, requeue_wait_s: float = REQUEUE_WAIT_S) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.requeue_wait_s = requeue_wait_s
        self._fd: int | None = None

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "started_unix": time.time(),
        }

    def _read_record(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            record = json.loads(raw.decode("utf-8", errors="replace") or "{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def acquire(self) -> bool:
        """True when locked; False when the filesystem cannot lock (warned)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                record = self._read_record(fd)
                ours = os.environ.get("SLURM_JOB_ID")
                if ours and record.get("slurm_job_id") == ours:  # our requeued predecessor's lease
                    deadline = deadline or time.monotonic() + self.requeue_wait_s
                    if time.monotonic() < deadline:
                        time.sleep(1.0)
                        continue
                os.close(fd)
                raise RunDirLockedError(
                    f"run directory {self.path.parent} is in use by another training job ({_holder(record)}); "
                    "wait for it to end, or give another trainer.run_dir"
                ) from None
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    log.warning("cannot lock %s (%s): running without a run-directory lock", self.path, err.strerror)
                    return False
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self._record()) + "\n").encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a Trainer dropped without close() must not keep the directory
        self.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
