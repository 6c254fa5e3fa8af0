"""SIGKILL a checkpointing training run at random moments (also mid-save, sync and async):
after every kill the newest valid checkpoint is complete and loads, no ``step_*`` directory is
ever partial, the next run resumes from exactly that step, and the run finished across all the
crashes ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from queue import Queue

import ckpt_toy as toy
import pytest
import torch
from ckpt_crash_worker import PaddedToy
from runs import REPO
from safetensors.torch import load_file

from modmoe.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    find_latest_valid,
    list_checkpoints,
    read_manifest,
    validate,
)

STEPS = 240  # more than the kills let any run reach, so every run is killed mid-way
TRIALS = 12


class ForkServer:
    """Drives ``ckpt_crash_worker.py serve``: one child training run per request."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests/support/ckpt_crash_worker.py"), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.lines: Queue[str] = Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def next_line(self, timeout: float = 60.0) -> str:
        line = self.lines.get(timeout=timeout)
        assert not line.startswith(("ERROR", "EOF")), line
        return line

    def start(self, run_dir: Path, steps: int, async_save: bool, save_every: int = 4) -> int:
        self.proc.stdin.write(f"{run_dir} {steps} {int(async_save)} {save_every}\n")
        self.proc.stdin.flush()
        return int(self.expect("CHILD").split()[1])

    def expect(self, prefix: str) -> str:
        while not (line := self.next_line()).startswith(prefix):
            pass
        return line

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _check_after_kill(run_dir: Path, scratch: Path) -> int | None:
    """Every committed checkpoint is complete; the newest loads. Returns its step."""
    for _, path in list_checkpoints(run_dir):
        assert validate(path) == [], f"partial checkpoint visible after a kill: {path}"
    latest = find_latest_valid(run_dir)
    if latest is None:
        return None
    copy = scratch / latest.name
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(latest, copy)  # load a copy: the run dir stays as the kill left it
    model, opt, sched = toy.build(seed=5, model_cls=PaddedToy)
    meta = CheckpointManager(scratch, CheckpointConfig()).load(copy, toy.app_state(model, opt, sched))
    assert meta["step"] == read_manifest(copy).step
    assert meta["toy_sampler"]["index"] == meta["step"]
    return meta["step"]


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path):
    rng = random.Random(1234)
    server = ForkServer()
    try:
        ref_dir = tmp_path / "reference"
        ref_dir.mkdir()
        server.start(ref_dir, STEPS, async_save=False, save_every=0)  # never interrupted
        server.expect("DONE")
        server.expect("EXIT")

        run_dir = tmp_path / "crashy"
        run_dir.mkdir()
        expected: int | None = None
        leftovers_seen = kills_in_save = 0
        for trial in range(TRIALS):
            async_save = trial % 2 == 1
            pid = server.start(run_dir, STEPS, async_save)
            assert server.expect("READY") == "READY 0"  # leftovers of the last kill were removed
            first = server.next_line()
            assert first == (f"RESUMED {expected}" if expected is not None else "FRESH"), (trial, first)
            if trial % 3 != 0:  # kill while a save is being written
                for _ in range(rng.randint(1, 2)):
                    server.expect("SAVE-BEGIN")
                threading.Event().wait(rng.uniform(0.0, 0.05))
                kills_in_save += 1
            else:  # kill at an arbitrary moment
                threading.Event().wait(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            status = int(server.expect(f"EXIT {pid}").split()[2])
            leftovers_seen += any(p.name.startswith(".tmp-") for p in run_dir.iterdir())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"trial {trial}: {status}"
            expected = _check_after_kill(run_dir, tmp_path / "scratch")
        print(f"\n{TRIALS} kills ({kills_in_save} aimed at saves); partial saves left behind: {leftovers_seen}")
        assert leftovers_seen >= 1  # some kill really landed mid-save

        server.start(run_dir, STEPS, async_save=True)  # finish across all the crashes
        server.expect("DONE")
        server.expect("EXIT")
    finally:
        server.close()
    ref = load_file(ref_dir / "final.safetensors")
    got = load_file(run_dir / "final.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
