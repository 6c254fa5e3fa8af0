"""The step watchdog: when it judges a step overrun, what it dumps and what it says."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from modmoe.config_base import ConfigError
from modmoe.train.watchdog import STALL_ENV, StepWatchdog, WatchdogConfig, debug_stall, parse_stall


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _watchdog(tmp_path: Path, **cfg) -> tuple[StepWatchdog, FakeClock, list[str]]:
    clock, lines = FakeClock(), []
    cfg = {"factor": 5.0, "floor_s": 2.0, "warmup_steps": 3, "window": 4, **cfg}
    return StepWatchdog(WatchdogConfig(**cfg), 3, tmp_path / "stacks", lines.append, clock), clock, lines


def _steps(wd: StepWatchdog, clock: FakeClock, durations: list[float], first: int = 1) -> None:
    for i, d in enumerate(durations):
        wd.step_started(first + i)
        clock.now += d
        wd.step_finished()


def test_no_judgement_while_warming_up(tmp_path: Path) -> None:
    wd, clock, lines = _watchdog(tmp_path)
    _steps(wd, clock, [1.0, 1.0])
    wd.step_started(3)
    clock.now += 1000  # a first step compiling for minutes is not a hang
    assert wd.check() is None and wd.limit_s() is None and not lines


def test_overrun_dumps_every_thread_once_and_names_the_rank(tmp_path: Path) -> None:
    wd, clock, lines = _watchdog(tmp_path)
    _steps(wd, clock, [1.0, 1.2, 0.8, 1.0])
    assert wd.limit_s() == pytest.approx(5.0)  # 5 x median 1.0, above the floor
    wd.step_started(5)
    clock.now += 4.9
    assert wd.check() is None
    clock.now += 0.2
    path = wd.check()
    assert path == tmp_path / "stacks" / "rank_00003-step5.txt"
    text = path.read_text()
    # faulthandler's dump of every thread: this test's frame is in the main thread's stack.
    assert text.startswith("# rank 3, pid ") and "test_overrun_dumps_every_thread_once_and_names_the_rank" in text
    assert len(lines) == 1 and lines[0].startswith("watchdog: rank 3 step 5 has run 5.1 s, over its limit of 5.0 s")
    assert (
        "in 'data', before its first collective of the step: no peer holds it up, this rank is slow by itself"
        in lines[0]
    )
    assert str(path) in lines[0]
    clock.now += 100
    assert wd.check() is None and len(lines) == 1  # once per step
    wd.step_finished()
    assert wd.check() is None  # nothing in flight


def test_a_rank_waiting_for_its_peers_says_so(tmp_path: Path) -> None:
    wd, clock, lines = _watchdog(tmp_path)
    _steps(wd, clock, [1.0] * 3)
    wd.step_started(4)
    wd.phase("forward/backward", synchronizing=True)
    clock.now += 50
    assert wd.check() is not None
    assert "in 'forward/backward', a phase with collectives: it may be waiting for a slower peer" in lines[0]


def test_floor_holds_for_fast_steps(tmp_path: Path) -> None:
    wd, clock, _ = _watchdog(tmp_path, floor_s=30.0)
    _steps(wd, clock, [0.01] * 4)
    assert wd.limit_s() == 30.0


def test_own_work_time_is_up_to_the_first_synchronizing_phase(tmp_path: Path) -> None:
    wd, clock, _ = _watchdog(tmp_path)
    wd.step_started(1)
    clock.now += 0.25
    assert wd.local_s() == pytest.approx(0.25)  # not marked yet: so far
    wd.phase("forward/backward", synchronizing=True)
    clock.now += 0.5
    wd.phase("optimizer step")
    wd.phase("later", synchronizing=True)  # the first mark counts
    assert wd.local_s() == pytest.approx(0.25)
    assert wd.step_finished() == pytest.approx(0.75)


def test_the_thread_catches_a_stalled_step(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = WatchdogConfig(factor=2.0, floor_s=0.05, warmup_steps=1, check_every_s=0.01)
    wd = StepWatchdog(cfg, 0, tmp_path / "stacks", lines.append)
    wd.start()
    try:
        wd.step_started(1)
        wd.step_finished()
        wd.step_started(2)
        deadline = time.monotonic() + 10
        while not wd.dumps and time.monotonic() < deadline:
            time.sleep(0.01)  # the stalled "step"
    finally:
        wd.close()
    assert wd.dumps == [tmp_path / "stacks" / "rank_00000-step2.txt"] and len(lines) == 1
    assert "modmoe-watchdog" not in [t.name for t in threading.enumerate()]


def test_disabled_watchdog_starts_no_thread(tmp_path: Path) -> None:
    wd = StepWatchdog(WatchdogConfig(enabled=False), 0, tmp_path)
    wd.start()
    assert "modmoe-watchdog" not in [t.name for t in threading.enumerate()]
    wd.close()


def test_debug_stall_sleeps_only_on_the_named_rank_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.delenv(STALL_ENV, raising=False)
    assert debug_stall(1, 3, slept.append) == 0.0
    monkeypatch.setenv(STALL_ENV, "1:3:2.5")
    assert [debug_stall(r, s, slept.append) for r, s in [(0, 3), (1, 2), (1, 3)]] == [0.0, 0.0, 2.5]
    assert slept == [2.5]


@pytest.mark.parametrize("text", ["1:3", "a:3:1", "1:0:1", "-1:3:1", "1:3:-2", "1:3:1:4"])
def test_bad_stall_setting_is_one_line(text: str) -> None:
    with pytest.raises(ConfigError, match=STALL_ENV) as info:
        parse_stall(text)
    assert "\n" not in str(info.value)


def test_starting_the_step_in_flight_again_changes_nothing(tmp_path: Path) -> None:
    wd, clock, _ = _watchdog(tmp_path)
    wd.step_started(1)
    clock.now += 2.0
    wd.step_started(1)
    assert wd.step_finished() == pytest.approx(2.0)
