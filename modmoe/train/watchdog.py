"""A per-rank watchdog for hung or very slow steps.

Every rank runs one :class:`StepWatchdog`. The Trainer marks each step's start and end and the
phase it is in: ``data`` (the rank's own work: no peer is involved yet), then
``forward/backward`` (marked ``synchronizing``: from here on the rank meets its peers in
collectives and may wait for them), ``optimizer step`` and so on. A daemon thread checks every
``check_every_s``: when the step in flight has run longer than ``factor`` times the median of
the recent steps (and at least ``floor_s``), the watchdog writes the Python stack of every
thread of this rank with :mod:`faulthandler` to ``RUN_DIR/stacks/rank_RRRRR-stepN.txt`` and
logs one line with the phase. Once one rank stalls, its peers wait in a collective and their
steps run long too, so every rank dumps its stacks; a rank that overran before its first
collective of the step is slow by itself. :func:`debug_stall` is the test seam that makes one
rank slow on purpose.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from modmoe.config_base import ConfigError
from modmoe.train.config import WatchdogConfig

STALL_ENV = "MODMOE_DEBUG_STALL"
"""``RANK:STEP:SECONDS``: rank RANK sleeps SECONDS at the start of step STEP (tests only)."""


class StepWatchdog:
    """Step timing of one rank, and the thread that catches an overrunning step."""

    def __init__(
        self,
        cfg: WatchdogConfig,
        rank: int,
        stacks_dir: Path,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.rank, self.stacks_dir, self.log, self.clock = cfg, rank, Path(stacks_dir), log, clock
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=cfg.window)
        self._step: int | None = None
        self._started = 0.0
        self._local_s: float | None = None
        self._phase = ""
        self._dumped_step: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dumps: list[Path] = []

    # ---- marks made by the training loop and the backend
    def step_started(self, step: int) -> None:
        """Step ``step`` starts now (a second call for the step in flight changes nothing)."""
        with self._lock:
            if self._step != step:
                self._step, self._started, self._local_s, self._phase = step, self.clock(), None, "data"

    def phase(self, name: str, synchronizing: bool = False) -> None:
        """The step enters phase ``name``; ``synchronizing``: from here on this rank waits for
        its peers (its own work of the step is done; the first such mark counts)."""
        with self._lock:
            self._phase = name
            if synchronizing and self._local_s is None:
                self._local_s = self.clock() - self._started

    def local_s(self) -> float:
        """Seconds of this rank's own work in the step in flight (so far, if not yet marked)."""
        with self._lock:
            return self._local_s if self._local_s is not None else self.clock() - self._started

    def step_finished(self) -> float:
        """Ends the step; returns its seconds."""
        with self._lock:
            elapsed = self.clock() - self._started
            self._durations.append(elapsed)
            self._step = None
        return elapsed

    # ---- judging
    def limit_s(self) -> float | None:
        """How long the step in flight may run before it counts as overrunning (None while the
        watchdog is still warming up)."""
        with self._lock:
            if len(self._durations) < self.cfg.warmup_steps:
                return None
            return max(self.cfg.floor_s, self.cfg.factor * statistics.median(self._durations))

    def check(self) -> Path | None:
        """Looks at the step in flight once; dumps and logs (once per step) if it overran.
        Returns the stack file written, if any."""
        limit = self.limit_s()
        with self._lock:
            step, elapsed, local_done, phase = (
                self._step,
                self.clock() - self._started,
                self._local_s is not None,
                self._phase,
            )
            if step is None or limit is None or elapsed <= limit or self._dumped_step == step:
                return None
            self._dumped_step = step
            median = statistics.median(self._durations)
        path = self._dump(step, elapsed)
        where = (
            f"in {phase!r}, a phase with collectives: it may be waiting for a slower peer"
            if local_done
            else f"in {phase!r}, before its first collective of the step: no peer holds it up, this rank is slow by itself"
        )
        self.log(
            f"watchdog: rank {self.rank} step {step} has run {elapsed:.1f} s, over its limit of {limit:.1f} s "
            f"({self.cfg.factor:g} x the median {median:.3f} s of the last {len(self._durations)} steps, "
            f"at least {self.cfg.floor_s:g} s); {where}; stacks of all its threads in {path}"
        )
        return path

    def _dump(self, step: int, elapsed: float) -> Path:
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        path = self.stacks_dir / f"rank_{self.rank:05d}-step{step}.txt"
        with path.open("w") as f:
            f.write(f"# rank {self.rank}, pid {os.getpid()}, step {step}, {elapsed:.1f} s into the step\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        self.dumps.append(path)
        return path

    # ---- the thread
    def start(self) -> None:
        if self.cfg.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="modmoe-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.check_every_s):
            self.check()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def parse_stall(text: str) -> tuple[int, int, float]:
    """``RANK:STEP:SECONDS`` -> (rank, step, seconds); :class:`ConfigError` otherwise."""
    parts = text.split(":")
    try:
        rank, step, seconds = int(parts[0]), int(parts[1]), float(parts[2])
        if len(parts) != 3 or rank < 0 or step < 1 or seconds < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(f"config error: {STALL_ENV} = {text!r}: expected RANK:STEP:SECONDS, e.g. 1:12:5") from None
    return rank, step, seconds


def debug_stall(rank: int, step: int, sleep: Callable[[float], None] = time.sleep) -> float:
    """The test seam: sleeps where ``MODMOE_DEBUG_STALL`` names this rank and step (called at
    the start of every step's own work); returns the seconds slept."""
    text = os.environ.get(STALL_ENV)
    if not text:
        return 0.0
    stall_rank, stall_step, seconds = parse_stall(text)
    if (stall_rank, stall_step) != (rank, step):
        return 0.0
    sleep(seconds)
    return seconds
