"""``modmoe train`` killed with SIGKILL at random moments, over and over, in one run directory.

Every trial starts ``modmoe train`` with ``--resume auto`` (the default), lets it train while it
checkpoints every step (sync and async saves alternate), and kills it: either the moment a
save is being written (a ``.tmp-step_*`` directory exists) or at an arbitrary time. After
every kill each visible ``step_*`` checkpoint must be complete, and the next trial must report
resuming from exactly the newest one. At the end the run is let finish: its per-step losses
and final weights must be bit-identical to a run that was never interrupted, which also shows
that no trial ever loaded a partial checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import REPO, read_metrics, run_modmoe, small_overrides
from safetensors.torch import load_file

from checkpoints_tools.consolidate import consolidate
from modmoe.checkpoint import find_latest_valid, list_checkpoints, validate

STEPS = 150  # more than the kills let a trial reach, so every trial dies mid-run
TRIALS = 12


def _args(data_dir: str, run_dir: Path, trial: int | None) -> list[str]:
    extra = {"trainer.max_steps": STEPS, "logging.mlflow.enabled": False, "checkpoint.interval_steps": 0}
    if trial is not None:  # the crashy run: a checkpoint every step, keep the last three
        extra.update(
            {"checkpoint.interval_steps": 1, "checkpoint.keep_last": 3, "checkpoint.async_save": trial % 2 == 1}
        )
    overrides = small_overrides(data_dir, run_dir, **extra)
    return ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])]


def _training_step(run_dir: Path) -> int:
    """Steps recorded so far (the trainer writes one metrics line per step)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text(errors="replace").count("\n") if path.exists() else 0


def _kill_one_run(data_dir: str, run_dir: Path, trial: int, rng: random.Random, log: Path) -> tuple[str, bool]:
    """Starts a run, kills it; returns its output and whether the kill landed mid-save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modmoe", *_args(data_dir, run_dir, trial)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        ckpts, start_lines = run_dir / "checkpoints", _training_step(run_dir)
        deadline = time.monotonic() + 120
        while _training_step(run_dir) <= start_lines:  # wait until this trial trains
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start\n" + log.read_text()[-3000:]
            time.sleep(0.005)
        if trial % 3 != 0:  # aim at a save: kill while a .tmp-step_* directory is being written
            wanted, seen, previous = rng.randint(1, 3), 0, False
            while seen < wanted and proc.poll() is None:
                writing = any(p.name.startswith(".tmp-step_") for p in ckpts.iterdir())
                seen += writing and not previous
                previous = writing
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.01))
        else:  # an arbitrary moment
            time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, "the run finished before it was killed\n" + log.read_text()[-3000:]
        in_save = any(p.name.startswith(".tmp-step_") for p in ckpts.iterdir())
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    return log.read_text(), in_save


@pytest.mark.timeout(600)
def test_sigkilled_training_always_resumes_from_the_last_complete_checkpoint(small_data_dir, tmp_path):
    rng = random.Random(20261123)
    reference = tmp_path / "reference"
    run_modmoe(_args(small_data_dir, reference, None))

    run_dir = tmp_path / "crashy"
    expected: Path | None = None
    kills_in_save = 0
    for trial in range(TRIALS):
        output, in_save = _kill_one_run(small_data_dir, run_dir, trial, rng, tmp_path / f"trial{trial}.log")
        kills_in_save += in_save
        if expected is None:
            assert "resumed from" not in output, (trial, output[-2000:])
        else:
            step = int(re.search(r"step_(\d+)$", expected.name).group(1))
            assert f"resumed from {expected} at step {step}" in output, (trial, output[-2000:])
        for _, path in list_checkpoints(run_dir / "checkpoints"):
            assert validate(path) == [], f"trial {trial}: a partial checkpoint is visible: {path}"
        expected = find_latest_valid(run_dir / "checkpoints")
    print(f"\n{TRIALS} SIGKILLs of `modmoe train` ({kills_in_save} landed while a save was being written)")
    assert kills_in_save >= 3, kills_in_save  # the aimed kills really hit saves

    final = run_modmoe(_args(small_data_dir, run_dir, TRIALS))  # finishes across all the crashes
    assert f"resumed from {expected}" in final.stdout + final.stderr
    got, ref = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    weights = {}
    for name, run in (("ref", reference), ("got", run_dir)):
        out = tmp_path / name / "model.safetensors"  # a directory each: consolidate writes config.json beside it
        consolidate(sorted((run / "checkpoints").glob("step_*"))[-1], out)
        weights[name] = load_file(out)
    assert weights["ref"].keys() == weights["got"].keys()
    assert all(torch.equal(weights["ref"][k], weights["got"][k]) for k in weights["ref"])
