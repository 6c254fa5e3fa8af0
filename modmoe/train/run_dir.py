"""Which directories a training run may write into: only its own.

A run writes, truncates (``metrics.jsonl`` after a resume) and cleans (interrupted saves, old
checkpoints) inside ``trainer.run_dir``. It does so only when the directory is new or empty
(but for what modmoe's launchers put there first: the Slurm launcher's ``logs/`` and ``STOP``,
``modmoe sweep``'s point config, log and attempt record), or carries
modmoe's marker file :data:`MARKER` (written when a run claims the directory). Anything
else, a home directory given by mistake, a file, someone else's data, is refused in one line
naming the path, before any work.

Only the marker makes a directory with other content ours: a ``config.yaml`` with ``model:``
and ``trainer:`` keys and a ``metrics.jsonl`` are what other trainers leave too, so a run
directory of a modmoe from before the marker is refused with the one command that adopts it
(``touch RUN_DIR/.modmoe-run``). The one exception holds nothing modmoe could overwrite: a
directory seeded with nothing but modmoe checkpoints to resume from (every entry of its
checkpoint directory a committed modmoe checkpoint); it gets the marker when a run claims it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from modmoe.checkpoint.manifest import STEP_DIR_RE, CheckpointError, read_manifest
from modmoe.config_base import field_error

MARKER = ".modmoe-run"
# What may be there before a run first claims the directory: the Slurm launcher's logs and stop
# file (launch/train.sbatch creates RUN_DIR/logs before the trainer starts), what `modmoe sweep`
# writes before it starts a point's trainer (modmoe/sweep/runner.py: POINT_CONFIG, TRAIN_LOG,
# ATTEMPTS), a lock, a marker being written.
SWEEP_ENTRIES = frozenset({"sweep-point.yaml", "train.log", "sweep-attempts.jsonl"})
LAUNCHER_ENTRIES = frozenset({"logs", "STOP", ".modmoe.lock", f"{MARKER}.tmp"}) | SWEEP_ENTRIES


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _holds_only_checkpoints(path: Path, entries: list[str], ckpt_dirname: str) -> bool:
    """A directory seeded with modmoe checkpoints to resume from (copied into a new run
    directory): nothing but the checkpoint directory, and in it nothing but committed modmoe
    checkpoints (each manifest reads as modmoe's), so claiming it overwrites nothing."""
    if set(entries) - LAUNCHER_ENTRIES != {ckpt_dirname} or not (path / ckpt_dirname).is_dir():
        return False
    children = list((path / ckpt_dirname).iterdir())
    if not children or not all(STEP_DIR_RE.match(c.name) and c.is_dir() and not c.is_symlink() for c in children):
        return False
    try:
        for child in children:
            read_manifest(child)
    except CheckpointError:
        return False
    return True


def check_run_dir(run_dir: str | os.PathLike, ckpt_dirname: str = "checkpoints") -> str:
    """Whether a run may use ``run_dir``, without touching it: ``"new"``, ``"empty"``,
    ``"marked"`` or ``"seeded"``; anything else is a one-line ConfigError naming the path."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise field_error("trainer.run_dir", str(path), "is a file, not a directory (give a new or empty directory)")
    if not path.exists():
        parent = _nearest_existing(path.parent if path.parent != path else path)
        if not parent.is_dir():
            raise field_error("trainer.run_dir", str(path), f"cannot be created: {parent} is a file")
        if not _writable(parent):
            raise field_error("trainer.run_dir", str(path), f"cannot be created: {parent} is not writable")
        return "new"
    if not _writable(path):
        raise field_error("trainer.run_dir", str(path), "is not writable by this user")
    if (path / MARKER).is_file():
        return "marked"
    entries = sorted(p.name for p in path.iterdir())
    if not set(entries) - LAUNCHER_ENTRIES:
        return "empty"
    if _holds_only_checkpoints(path, entries, ckpt_dirname):
        return "seeded"
    shown = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise field_error(
        "trainer.run_dir",
        str(path),
        f"exists and is not a modmoe run directory (no {MARKER} marker; it holds {shown}); give a new or empty "
        f"directory (a run directory of a modmoe from before the marker: adopt it with `touch {path / MARKER}`)",
    )


def claim_run_dir(run_dir: str | os.PathLike, ckpt_dirname: str = "checkpoints") -> str:
    """Rank 0: checks ``run_dir`` again (it may have changed since the config was resolved),
    creates it and writes the marker; returns what :func:`check_run_dir` found."""
    path = Path(run_dir)
    state = check_run_dir(path, ckpt_dirname)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if state != "marked":
            record = {"created_by": "modmoe", "created_unix": time.time(), "host": socket.gethostname(), "was": state}
            tmp = path / f"{MARKER}.tmp"
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, path / MARKER)
    except OSError as err:
        raise field_error("trainer.run_dir", str(path), f"cannot be written: {err.strerror}") from None
    return state
