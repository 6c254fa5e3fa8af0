"""Issue 14's findings 3-6, each reproduced as the issue describes it (finding 1, crafted
checkpoints, is tests/integration/test_hostile_checkpoints.py; finding 2, prepared-data
directories, belongs to modmoe/data's tests). Every test here failed on the code before the
issue's changes: a crash, a hang, a silent NaN run, or a broken run directory."""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hostile import one_line
from runs import REPO, read_metrics, small_overrides
from typer.testing import CliRunner

from modmoe import cli
from modmoe.checkpoint import validate

CONFIG = str(REPO / "configs" / "tiny.yaml")
QUIET = {"logging.mlflow.enabled": False, "trainer.max_steps": 2}


def _args(small_data_dir: str, run_dir: Path, *extra: str, **overrides) -> list[str]:
    values = small_overrides(small_data_dir, run_dir, **{**QUIET, **overrides})
    return ["train", CONFIG, *sum((["--set", v] for v in values), []), *extra]


def _train(small_data_dir, run_dir, *extra, **overrides):
    return CliRunner().invoke(cli.app, _args(small_data_dir, run_dir, *extra, **overrides))


def _refused(result) -> str:
    assert result.exit_code == 2, result.output[-3000:]
    return one_line(result.stderr, "modmoe: ")


def _subprocess(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "modmoe", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------- finding 3
def test_3_rerunning_a_finished_run_says_so_and_exits_0(small_data_dir, tmp_path):
    assert _train(small_data_dir, tmp_path).exit_code == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    again = _train(small_data_dir, tmp_path)
    assert again.exit_code == 0, again.output[-3000:]
    assert "Traceback" not in again.output
    assert "is complete: it is at step 2 of trainer.max_steps = 2" in again.stdout
    assert (tmp_path / "metrics.jsonl").read_text() == before
    more = _train(small_data_dir, tmp_path, **{"trainer.max_steps": 3})  # max_steps raised: it goes on
    assert more.exit_code == 0, more.output[-3000:]
    assert "at step 2" in more.stdout and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------------------- finding 4
def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_4_a_second_trainer_on_the_same_run_directory_is_refused(small_data_dir, tmp_path):
    """The first run logs to MLflow (the embedded sqlite in the run directory); the second,
    started while the first trains, refuses in one line, and the first finishes with an intact
    mlflow.db and a metrics.jsonl without duplicate steps."""
    first_args = _args(small_data_dir, tmp_path, **{"logging.mlflow.enabled": True, "trainer.max_steps": 100000})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-m", "modmoe", *first_args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, 120, "the first run's steps")
        second = _train(small_data_dir, tmp_path, **{"logging.mlflow.enabled": True, "trainer.max_steps": 3})
        line = _refused(second)
        assert f"is in use by another training job (pid {first.pid}" in line, line
        (tmp_path / "STOP").write_text("")  # the first run saves and exits at the next step
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1))
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (1,)
        logged = db.execute("SELECT MAX(step) FROM metrics WHERE key = 'loss'").fetchone()[0]
    assert logged == steps[-1]


# ---------------------------------------------------------------------------- finding 5
def test_5_an_infinite_learning_rate_is_refused_at_config(small_data_dir, tmp_path):
    line = _refused(_train(small_data_dir, tmp_path, **{"optimizer.lr": ".inf"}))
    assert "optimizer.lr = inf: Input should be a finite number" in line
    assert not (tmp_path / "COMPLETED").exists()


def test_5_a_diverging_run_stops_with_one_line_and_no_nan_checkpoint(small_data_dir, tmp_path):
    """A finite but absurd learning rate makes the weights blow up within a few steps."""
    result = _train(
        small_data_dir,
        tmp_path,
        **{"optimizer.lr": 1e30, "optimizer.grad_clip": "null", "optimizer.warmup_steps": 0, "trainer.max_steps": 10},
        **{"checkpoint.interval_steps": 1},
    )
    line = _refused(result)
    assert "loss nan" in line or "loss inf" in line or "gradient norm" in line, line
    assert "trainer.numerics.on_nonfinite = 'stop'" in line
    assert not (tmp_path / "COMPLETED").exists()
    for step_dir in sorted((tmp_path / "checkpoints").glob("step_*")):  # only steps before the fault
        assert validate(step_dir) == []
    failing = int(line.split("step ")[1].split(":")[0])
    assert all(int(p.name.split("_")[1]) < failing for p in (tmp_path / "checkpoints").glob("step_*"))


@contextmanager
def _nan_at(step: int):
    """Makes the native backend's backward produce NaN gradients (and loss) the first time it
    runs optimizer step ``step`` (1-based), as an overflow on one batch would."""
    from modmoe.train.backends import native

    original = native.NativeModelBackend.forward_backward
    fired = []

    def poisoned(self, batches, at):
        stats = original(self, batches, at)
        if at + 1 == step and not fired:
            fired.append(at)
            for p in self.core.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            stats.loss = math.nan
        return stats

    native.NativeModelBackend.forward_backward = poisoned
    try:
        yield
    finally:
        native.NativeModelBackend.forward_backward = original


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from modmoe.checkpoint.reader import load_tensor_groups, model_tensors, read_dcp_metadata

    path = run_dir / "checkpoints" / f"step_{step:08d}"
    _, md = read_dcp_metadata(path)
    return {
        k: v for group in load_tensor_groups(path, model_tensors(md, "train.model."), 1 << 30) for k, v in group.items()
    }


def _train_with_nan_at_step_3(small_data_dir, run_dir: Path, policy: str, interval: int):
    """Four steps under ``policy``, checkpoints every ``interval`` steps, NaN once at step 3."""
    overrides = {"trainer.numerics.on_nonfinite": policy, "trainer.max_steps": 4, "checkpoint.interval_steps": interval}
    with _nan_at(3):
        result = _train(small_data_dir, run_dir, **overrides)
    assert result.exit_code == 0, result.output[-3000:]
    return result


def test_5_skip_holds_back_the_nan_step_and_the_run_completes(small_data_dir, tmp_path):
    result = _train_with_nan_at_step_3(small_data_dir, tmp_path, "skip", interval=1)
    assert "step 3: loss nan" in result.stdout and "step skipped" in result.stdout
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert records[2]["numerics/skipped_steps"] == 0 and records[3]["numerics/skipped_steps"] == 1
    assert records[4]["lr"] == records[3]["lr"]  # the schedule did not move on the skipped step
    assert json.loads((tmp_path / "COMPLETED").read_text()) == {"step": 4, "skipped_steps": 1}
    before, after = _weights(tmp_path, 2), _weights(tmp_path, 3)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing moved, expert biases included
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path, 4).values())


def test_5_rollback_reloads_the_checkpoint_and_skips_the_window(small_data_dir, tmp_path):
    result = _train_with_nan_at_step_3(small_data_dir, tmp_path, "rollback", interval=2)
    assert "rolled back to" in result.stdout and "skipping the data of steps 3-3" in result.stdout
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the failed step 3 was redone on new data
    assert records[-1]["numerics/rollbacks"] == 1 and math.isfinite(records[2]["loss"])
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path, 4).values())


def test_5_a_backend_that_cannot_skip_refuses_the_policy(small_data_dir, tmp_path):
    line = _refused(
        _train(
            small_data_dir, tmp_path, **{"trainer.numerics.on_nonfinite": "skip", "parallel.dp_backend": "deepspeed"}
        )
    )
    assert "trainer.numerics.on_nonfinite = 'skip': not honoured by the deepspeed backend" in line


# ---------------------------------------------------------------------------- finding 6
LAUGHS = "parallel:\n  deepspeed_extra:\n    l0: &a0 [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"    l{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
)


def test_6_a_yaml_bomb_is_refused_at_once(tmp_path):
    """Nine lines that expand to 10^9 values (the code before issue 14 ran until killed)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    t0 = time.monotonic()
    proc = _subprocess(["train", str(bomb), "--set", f"trainer.run_dir={tmp_path / 'run'}"], timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "once aliases are expanded" in one_line(proc.stderr, "modmoe: ")
    assert not (tmp_path / "run").exists()


def test_6_a_terabyte_model_is_refused_before_any_allocation(small_data_dir, tmp_path):
    t0 = time.monotonic()
    proc = _subprocess(
        _args(
            small_data_dir,
            tmp_path,
            **{
                "model.dim": 32768,
                "model.num_layers": 256,
                "model.moe.expert_hidden": 32768,
                "model.ffn_hidden": 65536,
            },
        ),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr, "modmoe: ")
    assert "needs at least" in line and "GiB per rank" in line, line
    assert time.monotonic() - t0 < 60  # the process start (imports) dominates; the check is arithmetic
    assert not tmp_path.joinpath("checkpoints").exists() and not tmp_path.joinpath("config.yaml").exists()


def test_6_a_run_dir_that_is_a_file_is_refused(small_data_dir, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    line = _refused(_train(small_data_dir, target))
    assert f"trainer.run_dir = '{target}': is a file" in line
    assert target.read_text() == "mine"


@contextmanager
def _disk_full_while_writing(step_dir_name: str):
    """Every file DCP writes into ``step_dir_name`` fails with ENOSPC, as on a full disk."""
    from torch.distributed.checkpoint import filesystem

    original = filesystem.FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        if "w" in mode and step_dir_name in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with original(self, path, mode) as stream:
            yield stream

    filesystem.FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        filesystem.FileSystem.create_stream = original


def test_6_a_full_disk_during_a_save_is_one_line_and_loses_nothing(small_data_dir, tmp_path):
    overrides = {"trainer.max_steps": 4, "checkpoint.interval_steps": 2}
    with _disk_full_while_writing(".tmp-step_00000004"):
        result = _train(small_data_dir, tmp_path, **overrides)
    line = _refused(result)
    assert line.startswith("modmoe: checkpoint step 4 not saved: No space left on device"), line
    assert "newest committed checkpoint: step_00000002, untouched" in line
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]  # no partial save left
    assert validate(ckpts / "step_00000002") == []
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert not (tmp_path / "COMPLETED").exists()
    again = _train(small_data_dir, tmp_path, **overrides)  # space is back: the run resumes and ends
    assert again.exit_code == 0, again.output[-3000:]
    assert "at step 2" in again.stdout and validate(ckpts / "step_00000004") == []
