"""A per-rank watchdog for hung or very slow steps.

Every rank runs one :class:`StepWatchdog`. The training loop marks three moments of each step:
its start, the end of the rank's own work (data and forward passes: what a rank does before it
has to wait for its peers in the gradient synchronisation), and its end. A daemon thread
checks every ``check_every_s``: when the step in flight has run longer than ``factor`` times
the median of the recent steps (and at least ``floor_s``), the watchdog writes the Python stack
of every thread of this rank with :mod:`faulthandler` to
``RUN_DIR/stacks/rank_RRRRR-stepN.txt`` and logs one line. Once one rank stalls, its peers
wait in a collective and their steps run long too, so every rank dumps its stacks; each line
says whether that rank is still in its own work (the slow one) or has finished it and waits for
a peer. :func:`debug_stall` is the test seam that makes one rank slow on purpose.
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

from pydantic import Field

from modmoe.config_base import ConfigError, ConfigModel

STALL_ENV = "MODMOE_DEBUG_STALL"
"""``RANK:STEP:SECONDS``: rank RANK sleeps SECONDS at the start of step STEP (tests only)."""


class WatchdogConfig(ConfigModel):
    """Hang and straggler detection (every rank)."""

    enabled: bool = True
    """Run the watchdog thread that dumps stacks when a step overruns (the step times and the
    straggler metric are measured either way)."""

    factor: float = Field(10.0, gt=1)
    """A step overruns when it has taken longer than this many times the median of the
    recent steps."""

    floor_s: float = Field(60.0, gt=0)
    """...and longer than this many seconds, so short steps' jitter (an evaluation, a
    checkpoint save) does not count as a hang."""

    window: int = Field(50, ge=1)
    """How many recent steps the median is taken over."""

    warmup_steps: int = Field(3, ge=1)
    """Steps timed before the watchdog judges any (the first steps compile and warm caches)."""

    check_every_s: float = Field(1.0, gt=0)
    """How often the watchdog thread looks at the step in flight."""

    straggler_factor: float = Field(2.0, gt=1)
    """Log a straggler line when the slowest rank's own work took longer than this many times
    the median over the ranks (and at least ``straggler_min_s`` longer)."""

    straggler_min_s: float = Field(0.5, ge=0)
    """Absolute margin the slowest rank must exceed the median by before it is logged."""


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
        self._dumped_step: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dumps: list[Path] = []

    # ---- marks made by the training loop
    def step_started(self, step: int) -> None:
        with self._lock:
            self._step, self._started, self._local_s = step, self.clock(), None

    def local_done(self) -> None:
        """This rank's own work of the step is done; from here on it may wait for its peers."""
        with self._lock:
            if self._local_s is None:
                self._local_s = self.clock() - self._started

    def step_finished(self) -> tuple[float, float]:
        """Ends the step; returns (step seconds, seconds of this rank's own work)."""
        with self._lock:
            elapsed = self.clock() - self._started
            local = self._local_s if self._local_s is not None else elapsed
            self._durations.append(elapsed)
            self._step = None
        return elapsed, local

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
            step, elapsed, local_done = self._step, self.clock() - self._started, self._local_s is not None
            if step is None or limit is None or elapsed <= limit or self._dumped_step == step:
                return None
            self._dumped_step = step
            median = statistics.median(self._durations)
        path = self._dump(step, elapsed)
        where = (
            "it has done its own work of the step and waits for a slower peer in a collective"
            if local_done
            else "it is still in its own work of the step (data, forward): this rank is the slow one"
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
