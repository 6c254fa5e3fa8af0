"""Issue 14, finding 1: a crafted checkpoint runs no code, through any reader.

Each test takes a real checkpoint, replaces one of its pickles with a payload that would create
a marker file (tests/support/hostile.py), reseals the manifest so every checksum matches, runs
one command on it, and checks that the marker was not created and that the command ended with
one line (``validate`` lists the problem instead). On the code before issue 14 every test of a
DCP ``.metadata``, a non-tensor item, Megatron's ``common.pt`` or a DeepSpeed partition created
the marker.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hostile import (
    Payload,
    one_line,
    plant_bytes_item,
    plant_metadata_payload,
    plant_torch_save_payload,
)
from runs import REPO, small_overrides
from typer.testing import CliRunner

from checkpoints_tools.cli import app as tools_app
from modmoe import cli as modmoe_cli
from modmoe.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, validate
from modmoe.config import load_config
from modmoe.train.loop import Trainer

CONFIG = str(REPO / "configs" / "tiny.yaml")
RUN_OVERRIDES = {
    "trainer.max_steps": 2,
    "checkpoint.interval_steps": 1,
    "checkpoint.keep_last": 0,
    "logging.mlflow.enabled": False,
}


@pytest.fixture(scope="module")
def native_run(small_data_dir, tmp_path_factory) -> Path:
    """A native run with checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("hostile-native")
    Trainer(load_config(CONFIG, small_overrides(small_data_dir, run_dir, **RUN_OVERRIDES)), log=lambda _: None).train()
    return run_dir


@pytest.fixture()
def run(native_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(native_run, copy)
    return copy


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def _step(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _tools(*args: str):
    return CliRunner().invoke(tools_app, [str(a) for a in args])


def _modmoe(*args: str):
    modmoe_cli.mount_commands(args[0])
    return CliRunner().invoke(modmoe_cli.app, [str(a) for a in args])


def _train_args(small_data_dir: str, run_dir: Path, *extra: str, **overrides) -> list[str]:
    values = small_overrides(small_data_dir, run_dir, **{**RUN_OVERRIDES, **overrides})
    return ["train", CONFIG, *sum((["--set", v] for v in values), []), *extra]


def _refused(result, marker: Path, prefix: str, exit_code: int) -> str:
    assert not marker.exists(), "the checkpoint's payload ran"
    assert result.exit_code == exit_code, result.output[-3000:]
    return one_line(result.stderr, prefix)


# ---------------------------------------------------------------------------- checkpoints_tools
def test_validate_reports_the_payload(run, marker):
    plant_metadata_payload(_step(run, 2), marker)
    result = _tools("validate", _step(run, 2))
    assert not marker.exists()
    assert result.exit_code == 1 and "INVALID" in result.stdout
    assert "names the global posix.system" in result.stdout, result.stdout
    assert _tools("validate", _step(run, 1)).exit_code == 0


@pytest.mark.parametrize("command", ["inspect", "consolidate", "convert"])
def test_tools_refuse_the_payload_in_one_line(run, marker, tmp_path, command):
    plant_metadata_payload(_step(run, 2), marker)
    extra = {
        "inspect": [],
        "consolidate": ["--out", tmp_path / "w.safetensors"],
        "convert": [tmp_path / "ds", "--to", "deepspeed"],
    }[command]
    line = _refused(_tools(command, _step(run, 2), *extra), marker, "error: ", 1)
    assert "posix.system" in line, line
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "ds").exists()


def test_convert_from_deepspeed_refuses_a_payload(tmp_path, marker):
    """``--to dcp`` reads DeepSpeed's files: a model-states file holding the payload."""
    tag = tmp_path / "ds" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step1")
    torch.save({"module": Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    line = _refused(_tools("convert", tmp_path / "ds", tmp_path / "out", "--to", "dcp"), marker, "error: ", 1)
    assert "posix.system" in line


def test_a_pickled_non_tensor_item_is_refused(run, marker):
    """The index names only DCP's classes, but one entry points at a pickled object."""
    key = plant_bytes_item(_step(run, 2), marker)
    assert any(key in p and "pickled Python object" in p for p in validate(_step(run, 2)))
    line = _refused(_tools("inspect", _step(run, 2)), marker, "error: ", 1)
    assert key in line


# ---------------------------------------------------------------------------- modmoe export
def test_export_of_a_step_refuses_the_payload(run, marker, tmp_path):
    plant_metadata_payload(_step(run, 2), marker)
    line = _refused(_modmoe("export", _step(run, 2), "--out", tmp_path / "hf"), marker, "modmoe: ", 2)
    assert "posix.system" in line and not (tmp_path / "hf").exists()


def test_export_of_a_run_skips_the_payload_and_says_so(run, marker, tmp_path, caplog):
    plant_metadata_payload(_step(run, 2), marker)
    with caplog.at_level(logging.WARNING, logger="modmoe.checkpoint"):
        result = _modmoe("export", run, "--out", tmp_path / "hf")
    assert not marker.exists()
    assert result.exit_code == 0, result.output[-3000:]
    assert "exported step 1" in result.stdout
    assert any("step_00000002" in r.message and "posix.system" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------- resume
def test_resume_of_a_path_refuses_the_payload(run, marker, small_data_dir):
    plant_metadata_payload(_step(run, 2), marker)
    result = _modmoe(*_train_args(small_data_dir, run, "--resume", str(_step(run, 2)), **{"trainer.max_steps": 3}))
    line = _refused(result, marker, "modmoe: ", 2)
    assert "refusing to load" in line and "posix.system" in line


def test_resume_auto_skips_the_payload_and_says_so(run, marker, small_data_dir, caplog):
    plant_metadata_payload(_step(run, 2), marker)
    with caplog.at_level(logging.WARNING, logger="modmoe.checkpoint"):
        result = _modmoe(*_train_args(small_data_dir, run, **{"trainer.max_steps": 3}))
    assert not marker.exists()
    assert result.exit_code == 0, result.output[-3000:]
    assert f"resumed from {_step(run, 1)} at step 1" in result.stdout
    assert any("skipping invalid checkpoint" in r.message and "posix.system" in r.message for r in caplog.records)


def test_deepspeed_backend_resume_refuses_the_payload(run, marker, small_data_dir):
    """The DeepSpeed backend reads modmoe's own (DCP) checkpoints (two ranks under torchrun:
    the backend needs a process group)."""
    pytest.importorskip("deepspeed")
    plant_metadata_payload(_step(run, 2), marker)
    args = _train_args(
        small_data_dir,
        run,
        "--resume",
        str(_step(run, 2)),
        **{"trainer.max_steps": 3, "parallel.dp_backend": "deepspeed", "trainer.micro_batch_size": 4},
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "modmoe"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*torchrun, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert proc.returncode != 0
    # Each rank says it in one line; torchrun then adds its own summary of the failed workers.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("modmoe: ")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
    assert "refusing to load" in lines[0] and "posix.system" in lines[0]
    assert 'File "' + str(REPO / "modmoe") not in proc.stderr  # no traceback through modmoe


@pytest.mark.parametrize("plant", ["metadata", "bytes_item"])
def test_the_reader_refuses_even_when_validation_is_skipped(run, marker, monkeypatch, plant):
    """Defence in depth: the loader itself never unpickles outside the allowlist, so a
    checkpoint swapped after validation (or a caller that skips it) runs nothing either."""
    from ckpt_toy import app_state, build

    from modmoe.checkpoint import manager as manager_module

    step = _step(run, 2)
    plant_metadata_payload(step, marker) if plant == "metadata" else plant_bytes_item(step, marker)
    monkeypatch.setattr(manager_module, "validate", lambda path: [])
    model, opt, sched = build()
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(run / "checkpoints", CheckpointConfig()).load(step, app_state(model, opt, sched))
    assert not marker.exists()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- Megatron engine
@pytest.fixture(scope="module")
def megatron_runs(small_data_dir, tmp_path_factory) -> dict[str, Path]:
    """Megatron engine runs on CPU (2 steps, checkpoint at 2): plain, and with DeepSpeed ZeRO-1."""
    pytest.importorskip("megatron.core")
    from test_megatron_multirank import train_config

    from modmoe.train.loop import run_training

    root = tmp_path_factory.mktemp("hostile-megatron")
    ds = ["parallel.dp_backend=deepspeed", "parallel.zero_stage=1", "megatron.distributed_optimizer=null"]
    for name, extra in (("plain", []), ("deepspeed", ds)):
        run_training(train_config(root / name, small_data_dir, ["trainer.max_steps=2", *extra]))
    return {"plain": root / "plain", "deepspeed": root / "deepspeed"}


MEGATRON_PLANTS = {
    "metadata": ("plain", lambda step, marker: plant_metadata_payload(step, marker)),
    "common_pt": ("plain", lambda step, marker: plant_torch_save_payload(step, "common.pt", marker)),
    "bytes_item": ("plain", lambda step, marker: plant_bytes_item(step, marker)),
    "deepspeed_partition": (
        "deepspeed",
        lambda step, marker: plant_torch_save_payload(step, "deepspeed/zero/mp_rank_00_model_states.pt", marker),
    ),
}


def _megatron_copy(megatron_runs, name: str, tmp_path: Path) -> Path:
    copy = tmp_path / name
    shutil.copytree(megatron_runs[name], copy)
    return copy


@pytest.mark.parametrize("plant", sorted(MEGATRON_PLANTS))
def test_megatron_resume_refuses_the_payload(megatron_runs, small_data_dir, tmp_path, marker, monkeypatch, plant):
    from test_megatron_multirank import train_config

    from modmoe.checkpoint import manager as manager_module
    from modmoe.train.loop import run_training

    name, plant_fn = MEGATRON_PLANTS[plant]
    run_dir = _megatron_copy(megatron_runs, name, tmp_path)
    step = _step(run_dir, 2)
    plant_fn(step, marker)
    assert validate(step), "validate must report the payload"
    extra = ["trainer.max_steps=3"]
    if name == "deepspeed":
        extra += ["parallel.dp_backend=deepspeed", "parallel.zero_stage=1", "megatron.distributed_optimizer=null"]
    cfg = train_config(run_dir, small_data_dir, extra)
    with pytest.raises(CheckpointError, match="refusing to load"):
        run_training(cfg, resume=str(step))
    assert not marker.exists()
    # And with validation skipped, Megatron's own read (through modmoe's reader) runs nothing.
    monkeypatch.setattr(manager_module, "validate", lambda path: [])
    with pytest.raises(CheckpointError) as err:
        run_training(cfg, resume=str(step))
    assert not marker.exists() and "\n" not in str(err.value)


def test_megatron_export_refuses_the_payload(megatron_runs, tmp_path, marker):
    run_dir = _megatron_copy(megatron_runs, "plain", tmp_path)
    plant_metadata_payload(_step(run_dir, 2), marker)
    line = _refused(_modmoe("export", _step(run_dir, 2), "--out", tmp_path / "hf"), marker, "modmoe: ", 2)
    assert "posix.system" in line


def test_legitimate_checkpoints_still_load(native_run, megatron_runs, small_data_dir, tmp_path):
    """Today's checkpoints of both engines need nothing outside the allowlists: they validate,
    and Megatron runs (with and without DeepSpeed) resume. (Native resume and export of a
    legitimate checkpoint are in the tests above.)"""
    from test_megatron_multirank import train_config

    from modmoe.train.loop import run_training

    assert validate(_step(native_run, 2)) == []
    ds = ["parallel.dp_backend=deepspeed", "parallel.zero_stage=1", "megatron.distributed_optimizer=null"]
    for name, extra in (("plain", []), ("deepspeed", ds)):
        run_dir = _megatron_copy(megatron_runs, name, tmp_path)
        assert validate(_step(run_dir, 2)) == []
        run_training(train_config(run_dir, small_data_dir, ["trainer.max_steps=3", *extra]))
        assert (run_dir / "COMPLETED").exists() and validate(_step(run_dir, 3)) == []
