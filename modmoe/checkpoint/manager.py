"""``CheckpointManager``: when to save, atomic commit, async saves, retention, resume.

On-disk layout under ``ckpt_dir``::

    step_00001000/            committed: renamed into place only after manifest.json exists
        .metadata             DCP index (a pickle: read only after its checksum matched)
        __0_0.distcp ...      DCP shards, one or more per rank
        rng/rank_00000.json   per-rank RNG states
        manifest.json         written last: files, sizes, sha256, step, world size, meta
    .tmp-step_00002000/       being written (or left by a crash; removed on the next start)

A crash at any moment leaves every ``step_*`` directory either complete or absent, because
the only step that makes a checkpoint visible is the final ``rename`` of a fully written,
fsynced directory. Rank 0 does the commit; the directory must be on a filesystem all ranks
share.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from modmoe.checkpoint.config import CheckpointConfig
from modmoe.checkpoint.errors import environment_failure
from modmoe.checkpoint.fsutil import fsync_dir, write_json_durable
from modmoe.checkpoint.manifest import (
    DCP_METADATA,
    LAYOUT_DCP,
    LAYOUT_MEGATRON,
    MANIFEST_NAME,
    STEP_DIR_RE,
    CheckpointError,
    build_manifest,
    read_manifest,
    step_dirname,
    validate,
    verify_files,
    write_manifest,
)
from modmoe.checkpoint.reader import safe_dcp_load
from modmoe.checkpoint.rng import RNG_DIR, capture_rng, read_rng, reseed_rng, restore_rng, rng_filename
from modmoe.checkpoint.train_state import MODEL_KEY

log = logging.getLogger("modmoe.checkpoint")
# DCP warns on every single-process save/load, even when asked for one with no_dist=True; the
# save itself may run in DCP's thread, so a scoped catch_warnings cannot reach it.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is .*assuming the intent is to (save|load) in a single process"
)
TMP_PREFIX = ".tmp-"
# Which engine writes each manifest layout, for the one-line "resume it with engine: ..." refusal.
ENGINE_OF_LAYOUT = {LAYOUT_DCP: "native", LAYOUT_MEGATRON: "megatron"}


class StateIO(Protocol):
    """How a train state is written into a checkpoint directory and read back. The manager owns
    everything around it: the temporary directory, RNG states, the manifest, the atomic commit,
    retention and validation before any read."""

    layout: str
    """The manifest layout it writes (``dcp``, ``megatron``); a checkpoint of another is refused."""
    model_prefix: str | None
    """Prefix of the model weights' keys (recorded in the manifest, for consolidation)."""
    can_save_async: bool

    def save(self, path: Path, process_group, no_dist: bool, async_save: bool) -> Future | None:
        """Collective. Writes the state into ``path``; with ``async_save`` returns a future that
        resolves once it is all on disk (on rank 0: every rank's part)."""
        ...

    def load(self, path: Path, process_group, no_dist: bool) -> None:
        """Collective. Reads the state of the validated checkpoint ``path``."""
        ...


class DcpStateIO:
    """``app_state`` (name -> DCP ``Stateful``, e.g. ``{"train": TrainState}``) through
    torch.distributed.checkpoint: sharded, resharded on load, optionally asynchronous."""

    layout = LAYOUT_DCP
    can_save_async = True

    def __init__(self, app_state: dict[str, Stateful]) -> None:
        self.app_state = app_state
        self.model_prefix = next(
            (f"{k}.{MODEL_KEY}." for k, v in app_state.items() if getattr(v, "holds_model", False)), None
        )

    def save(self, path: Path, process_group, no_dist: bool, async_save: bool) -> Future | None:
        if async_save:
            return dcp.async_save(self.app_state, checkpoint_id=path, process_group=process_group, no_dist=no_dist)
        dcp.save(self.app_state, checkpoint_id=path, process_group=process_group, no_dist=no_dist)
        return None

    def load(self, path: Path, process_group, no_dist: bool) -> None:
        safe_dcp_load(self.app_state, path, process_group=process_group, no_dist=no_dist)


def as_state_io(state: StateIO | dict[str, Stateful]) -> StateIO:
    return DcpStateIO(state) if isinstance(state, dict) else state


def step_entries(ckpt_dir: Path) -> list[Path]:
    """Every entry named like a checkpoint (``step_*``), whatever it is: a stray file, an empty
    directory or a symlink counts here, so that nothing named a checkpoint goes unnoticed."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if STEP_DIR_RE.match(p.name))


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``step_*`` directories (real ones, not symlinks), oldest first; validity not checked."""
    found = [
        (int(m.group(1)), p)
        for p in step_entries(ckpt_dir)
        if (m := STEP_DIR_RE.match(p.name)) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found)


def _problems(path: Path) -> list[str]:
    if path.is_symlink():
        return [f"{path.name} is a symlink (modmoe writes checkpoints as directories)"]
    return validate(path)


def find_latest_valid(ckpt_dir: str | os.PathLike) -> Path | None:
    """Newest checkpoint that passes :func:`validate`; each newer invalid one is skipped with a
    one-line warning naming its first problem. Not collective: on a shared filesystem every
    rank that calls it gets the same answer."""
    for path in reversed(step_entries(Path(ckpt_dir))):
        problems = _problems(path)
        if not problems:
            return path
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        log.warning("skipping invalid checkpoint %s: %s%s", path, problems[0], more)
    return None


def find_resume_point(ckpt_dir: str | os.PathLike) -> Path | None:
    """What ``--resume auto`` continues from: the newest valid checkpoint, or None when there is
    no checkpoint at all. When there are checkpoints but none can be read, starting over would
    silently throw the run away: that is a one-line :class:`CheckpointError` naming the way out."""
    ckpt_dir = Path(ckpt_dir)
    found = find_latest_valid(ckpt_dir)
    entries = step_entries(ckpt_dir)
    if found is not None or not entries:
        return found
    newest = entries[-1]
    raise CheckpointError(
        f"{ckpt_dir}: {len(entries)} checkpoint(s), none of which can be read (newest {newest.name}: "
        f"{_problems(newest)[0]}); nothing was deleted. Resume a repaired one with --resume PATH, or start "
        "over on purpose with --resume none (unreadable checkpoints are kept)"
    )


def _remove_tree(path: Path) -> None:
    """Renames to a ``.tmp-`` name first, so a crash mid-delete leaves no half ``step_*`` dir."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointManager:
    """Saves and restores ``app_state`` (name -> DCP ``Stateful``, e.g. ``{"train": TrainState}``)
    plus per-rank RNG states and a JSON ``meta`` dict.

    Construct it on every rank (collective when a process group is initialized: it creates two
    gloo groups so that async saves interleave neither with training collectives nor with its own
    agreements). ``save``,
    ``wait``, ``load`` and ``should_save`` (with ``interval_minutes``) are collective too.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, cfg: CheckpointConfig, rank: int = 0, world_size: int = 1) -> None:
        self.dir = Path(ckpt_dir)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self._dist = dist.is_available() and dist.is_initialized()
        if self._dist and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise CheckpointError(
                f"CheckpointManager: rank/world_size {rank}/{world_size} differ from the process group's "
                f"{dist.get_rank()}/{dist.get_world_size()}"
            )
        if not self._dist and world_size != 1:
            raise CheckpointError(f"CheckpointManager: world_size = {world_size} needs an initialized process group")
        # Two gloo groups: the state writer's collectives (which an async save runs on its own
        # thread) and the manager's agreements (main thread only). Sharing one group would let
        # the two threads' collectives interleave differently on each rank and deadlock.
        self._pg = dist.new_group(backend="gloo") if self._dist else None
        self._control_pg = dist.new_group(backend="gloo") if self._dist else None
        self._pending: Future | None = None
        self._pending_save: tuple[int, Path] = (0, self.dir)
        self._commit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit") if rank == 0 else None
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        self._save_blocking_s: float | None = None
        self._known_valid: dict[str, tuple[int, int, int]] = {}  # step dir name -> its manifest's identity
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()
        self._barrier()

    # ---- agreements over our own gloo group ---------------------------------------------
    def _barrier(self) -> None:
        if self._dist:
            dist.barrier(group=self._control_pg)

    def _broadcast_int(self, value: int) -> int:
        if not self._dist:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self._control_pg)
        return int(t.item())

    # ---- policy ------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True when ``step`` is due by ``interval_steps`` or ``interval_minutes`` (rank 0's
        clock decides; collective when ``interval_minutes`` is set)."""
        if step == self._last_saved_step:
            return False
        if self.cfg.interval_steps > 0 and step > 0 and step % self.cfg.interval_steps == 0:
            return True
        if self.cfg.interval_minutes is None:
            return False
        elapsed = time.monotonic() - self._last_save_time >= 60.0 * self.cfg.interval_minutes
        return bool(self._broadcast_int(int(elapsed)))

    # ---- save --------------------------------------------------------------------------
    def save(self, step: int, state: StateIO | dict[str, Stateful], meta: dict[str, Any] | None = None) -> None:
        """Collective. Writes ``state`` (a :class:`StateIO`, or a DCP app-state dict), the RNG
        states and ``meta`` (JSON) as checkpoint ``step``. With ``async_save`` (where the state
        supports it) it returns once the state is copied to CPU memory; the commit follows when
        the write completes (see :meth:`wait`)."""
        t0 = time.perf_counter()
        io = as_state_io(state)
        self.wait()  # at most one save in flight; also commits the previous one
        try:
            meta_copy = json.loads(json.dumps(meta or {}))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint meta is not JSON-serializable: {err}") from None
        tmp = self.dir / f"{TMP_PREFIX}{step_dirname(step)}"
        # Every phase that may fail on some ranks only (a full disk, a quota) ends with an
        # agreement, so all ranks raise together instead of waiting for each other forever.
        failure: BaseException | None = None
        try:
            if self.rank == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except BaseException as err:
            failure = err
        self._agree(failure, step, tmp)
        rng = capture_rng()  # before the state: what a resume must continue from
        async_save = self.cfg.async_save and io.can_save_async
        future = None
        try:
            # Some writers (Megatron's dist_checkpointing) want an empty directory: state first.
            future = io.save(tmp, self._pg, not self._dist, async_save)
            if self.rank == 0:
                (tmp / RNG_DIR).mkdir(exist_ok=True)
        except BaseException as err:
            failure = err
        self._agree(failure, step, tmp)
        try:
            write_json_durable(tmp / rng_filename(self.rank), rng)
        except BaseException as err:
            failure = err
        self._agree(failure, step, tmp)  # also: every rank's files are on disk (sync saves)
        commit_args = (tmp, step, meta_copy, io, time.time())
        if future is not None:
            if self._commit_pool is not None:
                self._pending = self._commit_pool.submit(self._finish_async, future, commit_args)
            else:
                self._pending = future
            self._pending_save = (step, tmp)
        else:
            try:
                if self.rank == 0:
                    self._commit(*commit_args)
            except BaseException as err:
                failure = err
            self._agree(failure, step, tmp)
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        self._save_blocking_s = time.perf_counter() - t0
        log.info("checkpoint step %d: save call blocked %.3fs (async=%s)", step, self._save_blocking_s, async_save)

    def pop_save_blocking_s(self) -> float | None:
        """Seconds the last ``save`` call blocked its caller, once per save (None: no new save)."""
        value, self._save_blocking_s = self._save_blocking_s, None
        return value

    @property
    def in_flight(self) -> bool:
        """Whether an async save (write or commit) is still running on this rank."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Collective. Finishes a pending async save; when it returns, the checkpoint is
        committed (or the save's error is raised)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        failure: BaseException | None = None
        try:
            pending.result()
        except BaseException as err:
            failure = err
        self._agree(failure, *self._pending_save)

    # ---- failures while saving -----------------------------------------------------------
    def _any(self, flag: bool) -> bool:
        if not self._dist:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_pg)
        return bool(t.item())

    def _agree(self, failure: BaseException | None, step: int, tmp: Path) -> None:
        """Collective (and a barrier): when any rank failed, the unfinished save is removed and
        every rank raises. An environment failure (``OSError``: a full disk, a quota, a
        read-only or vanished directory) becomes one CheckpointError line; anything else is a
        bug and keeps its own exception on the rank where it happened."""
        if not self._any(failure is not None):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # ours; frees the space the partial save took
        committed = list_checkpoints(self.dir)
        kept = (
            f"newest committed checkpoint: {committed[-1][1].name}"
            if committed
            else "no checkpoint was committed before"
        )
        if failure is None:
            raise CheckpointError(
                f"checkpoint step {step} not saved: another rank failed to write it; {kept}, untouched"
            )
        why = environment_failure(failure)
        if why is None:
            raise failure
        raise CheckpointError(f"checkpoint step {step} not saved: {why}; {kept}, untouched") from None

    def _finish_async(self, future: Future, commit_args: tuple) -> None:
        # DCP's coordinator writes .metadata only after every rank reported its shards
        # written, so once rank 0's future resolves the whole checkpoint is on disk.
        future.result()
        self._commit(*commit_args)

    def _commit(self, tmp: Path, step: int, meta: dict[str, Any], io: StateIO, created: float) -> None:
        """Rank 0: seal ``tmp`` with its manifest and rename it into place, then prune."""
        manifest = build_manifest(
            tmp,
            step=step,
            world_size=self.world_size,
            meta=meta,
            model_prefix=io.model_prefix,
            created=created,
            layout=io.layout,
        )
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(d)
        write_manifest(tmp, manifest)  # last file written: its presence marks completeness
        fsync_dir(tmp)
        final = self.dir / step_dirname(step)
        if final.exists() or final.is_symlink():  # re-saving a step (after a rollback or a restart)
            if self._is_valid(final):
                _remove_tree(final)
            else:  # never deleted: set aside under a name no listing takes for a checkpoint
                aside = final.with_name(f"{final.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                os.rename(final, aside)
                log.warning("checkpoint %s could not be read by modmoe: kept as %s", final, aside)
        os.rename(tmp, final)
        fsync_dir(self.dir)
        self._remember_valid(final)  # sealed just now: no need to hash it again for retention
        log.info("checkpoint committed: %s", final)
        self._apply_retention()

    # ---- which checkpoints count: only those that validate ---------------------------------
    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int] | None:
        try:
            info = (path / MANIFEST_NAME).stat()
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def _remember_valid(self, path: Path) -> None:
        identity = self._identity(path)
        if identity is not None:
            self._known_valid[path.name] = identity

    def _is_valid(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint modmoe can read: validated in full once per manifest
        (this manager's own commits and loads count as validated)."""
        identity = None if path.is_symlink() else self._identity(path)
        if identity is not None and self._known_valid.get(path.name) == identity:
            return True
        problems = _problems(path)
        if problems:
            log.warning(
                "retention: keeping %s, which modmoe cannot read (%s); it counts for nothing", path, problems[0]
            )
            return False
        self._remember_valid(path)
        return True

    def _apply_retention(self) -> None:
        """Deletes valid checkpoints beyond ``keep_last`` (newest valid ones) and ``keep_every``.
        A checkpoint that does not validate, or anything else named ``step_*``, is never deleted
        and never counted: it cannot push a readable checkpoint out."""
        if self.cfg.keep_last <= 0:
            return
        ckpts = [(s, p) for s, p in list_checkpoints(self.dir) if self._is_valid(p)]
        keep = {s for s, _ in ckpts[-self.cfg.keep_last :]}
        if self.cfg.keep_every > 0:
            keep |= {s for s, _ in ckpts if s % self.cfg.keep_every == 0}
        for s, path in ckpts:
            if s not in keep:
                _remove_tree(path)
                self._known_valid.pop(path.name, None)
                log.info("retention: removed %s", path)

    def _clean_leftovers(self) -> None:
        for p in self.dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                log.warning("removing leftover of an interrupted save or delete: %s", p)
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # ---- resume ------------------------------------------------------------------------
    def find_latest_valid(self) -> Path | None:
        """See :func:`find_latest_valid`."""
        return find_latest_valid(self.dir)

    def find_resume_point(self) -> Path | None:
        """See :func:`find_resume_point`."""
        return find_resume_point(self.dir)

    def load(
        self, path: str | os.PathLike, state: StateIO | dict[str, Stateful], restore_rng_state: bool = True
    ) -> dict[str, Any]:
        """Collective. Loads checkpoint ``path`` into ``state`` (resharding to the current
        layout and world size) and restores this rank's RNG states; returns the saved ``meta``.

        Refuses an invalid checkpoint: rank 0 checks every file's size and sha256 before any
        rank reads it, and each rank re-checks DCP's ``.metadata`` right before DCP unpickles it
        (DCP's index and its non-tensor items are pickles, so they must match the manifest)."""
        path, io = Path(path), as_state_io(state)
        problems = validate(path) if self.rank == 0 else []
        if self._dist:  # every rank raises rank 0's words (the group is our own processes)
            box = [problems]
            dist.broadcast_object_list(box, src=0, group=self._control_pg)
            problems = box[0]
        if problems:
            raise CheckpointError(f"refusing to load {path}: {'; '.join(problems)}")
        manifest = read_manifest(path)
        if manifest.layout != io.layout:
            engine = ENGINE_OF_LAYOUT.get(manifest.layout, manifest.layout)
            raise CheckpointError(
                f"refusing to load {path}: it was written by the {engine} engine "
                f"(manifest layout {manifest.layout!r}); resume it with engine: {engine}"
            )
        if manifest.layout == LAYOUT_DCP:
            verify_files(path, manifest, [DCP_METADATA])
        io.load(path, self._pg, not self._dist)
        if restore_rng_state:
            rng_file = path / rng_filename(self.rank)
            if rng_file.is_file():
                verify_files(path, manifest, [rng_filename(self.rank)])
                state = read_rng(rng_file)
                try:
                    restore_rng(state)
                except (ValueError, TypeError, RuntimeError) as err:
                    raise CheckpointError(f"{rng_file}: not a usable RNG state ({str(err)[:120]})") from None
            else:
                seed = reseed_rng(manifest.step, self.rank)
                log.warning(
                    "checkpoint %s was saved by %d rank(s) and has no RNG state for rank %d: reseeded with %d",
                    path,
                    manifest.world_size,
                    self.rank,
                    seed,
                )
        self._last_saved_step = manifest.step
        if self.rank == 0:
            self._remember_valid(path)
        self._barrier()
        return manifest.meta

    def close(self) -> None:
        """Finishes any pending save and stops the commit thread."""
        self.wait()
        if self._commit_pool is not None:
            self._commit_pool.shutdown(wait=True)
