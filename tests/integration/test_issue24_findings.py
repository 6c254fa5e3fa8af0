"""Issue 24's findings through the command line (in process, the tiny model of the other
integration tests): every checkpoint refused on ``--resume auto`` (2), outputs that are not
ours (4), resealed malformed RNG records (12), deeply nested export and index JSON (13),
read-only and full output locations (15), a learning rate beyond float32 (16) and a last update that
leaves the model non-finite (17). The unit tests of checkpoint/, data/ and train/ hold the
others. Every test here failed on the code before the issue's changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import one_line, reseal
from runs import REPO, TEST_PYTHONPATH, small_overrides
from typer.testing import CliRunner

from checkpoints_tools.cli import app as tools_app
from modmoe import cli
from modmoe.checkpoint import validate

CONFIG = str(REPO / "configs" / "tiny.yaml")
QUIET = {"logging.mlflow.enabled": False, "trainer.max_steps": 2, "checkpoint.interval_steps": 1}


def _train(small_data_dir: str, run_dir: Path, *extra: str, **overrides):
    values = small_overrides(small_data_dir, run_dir, **{**QUIET, **overrides})
    return CliRunner().invoke(cli.app, ["train", CONFIG, *sum((["--set", v] for v in values), []), *extra])


def _invoke(app, *args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result, prefix: str = "modmoe: ") -> str:
    assert result.exit_code != 0, result.output[-3000:]
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return one_line(result.stderr, prefix)


@pytest.fixture(scope="module")
def trained_run(small_data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("issue24") / "run"
    result = _train(small_data_dir, run_dir)
    assert result.exit_code == 0, result.output[-3000:]
    return run_dir


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


# ---------------------------------------------------------------------------- finding 2
def test_issue24_2_every_checkpoint_refused_stops_resume_auto_and_deletes_nothing(
    small_data_dir, trained_run, tmp_path
):
    run = _copy_run(trained_run, tmp_path)
    steps = sorted((run / "checkpoints").glob("step_*"))
    for step in steps:  # the older-torch case of docs/security.md: an index no reader takes, resealed
        (step / ".metadata").write_bytes(b"not a checkpoint index")
        reseal(step, ".metadata")
    before = (run / "metrics.jsonl").read_text()
    line = _refused(_train(small_data_dir, run, **{"trainer.max_steps": 4, "checkpoint.keep_last": 1}))
    assert "none of which can be read" in line and "--resume none" in line, line
    assert sorted((run / "checkpoints").glob("step_*")) == steps and (run / "metrics.jsonl").read_text() == before
    again = _train(small_data_dir, run, "--resume", "none", **{"trainer.max_steps": 4, "checkpoint.keep_last": 1})
    assert again.exit_code == 0, again.output[-3000:]  # starting over on purpose: the unreadable ones stay
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "step_00000004" and validate(run / "checkpoints" / names[-1]) == [], names
    aside = names[:-1]  # re-saving steps 1 and 2 set the unreadable ones aside under another name
    assert [n.split(".")[0] for n in aside] == ["step_00000001", "step_00000002"], names
    assert all(".unreadable-" in n for n in aside), names
    assert all((run / "checkpoints" / n / ".metadata").read_bytes() == b"not a checkpoint index" for n in aside)


# ---------------------------------------------------------------------------- finding 4
def test_issue24_4_consolidate_replaces_existing_files_only_when_told(trained_run, tmp_path):
    step = trained_run / "checkpoints" / "step_00000002"
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the user's own weights")
    (tmp_path / "config.json").write_text('{"mine": true}')
    line = _refused(_invoke(tools_app, "consolidate", step, "--out", out), "error: ")
    assert str(out) in line and "--overwrite" in line, line
    assert out.read_bytes() == b"the user's own weights" and json.loads((tmp_path / "config.json").read_text())
    out.unlink()
    line = _refused(_invoke(tools_app, "consolidate", step, "--out", out), "error: ")  # config.json beside it
    assert "config.json" in line and not out.exists(), line
    ok = _invoke(tools_app, "consolidate", step, "--out", out, "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert "model" in json.loads((tmp_path / "config.json").read_text())


def test_issue24_4_export_overwrite_replaces_only_an_earlier_export(trained_run, tmp_path):
    cli.mount_commands("export")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    line = _refused(_invoke(cli.app, "export", trained_run, "--out", theirs, "--overwrite"))
    assert "not a modmoe export" in line, line
    assert (theirs / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "hf"
    assert _invoke(cli.app, "export", trained_run, "--out", out).exit_code == 0
    again = _invoke(cli.app, "export", trained_run, "--out", out, "--overwrite", "--dtype", "bf16")
    assert again.exit_code == 0, again.output[-2000:]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------- finding 12
def test_issue24_12_validate_and_resume_refuse_a_resealed_malformed_rng_state(small_data_dir, trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    step = run / "checkpoints" / "step_00000002"
    rng = step / "rng" / "rank_00000.json"
    state = json.loads(rng.read_text())
    del state["numpy"]  # resumed before with a KeyError
    rng.write_text(json.dumps(state))
    reseal(step, "rng/rank_00000.json")
    report = _invoke(tools_app, "validate", step)
    assert report.exit_code == 1 and report.stdout.startswith("INVALID") and "numpy" in report.stdout
    line = _refused(_train(small_data_dir, run, "--resume", str(step), **{"trainer.max_steps": 3}))
    assert "rng/rank_00000.json" in line and "numpy" in line, line


# ---------------------------------------------------------------------------- finding 13
DEEP = '{"model_type": "modmoe", "modmoe": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_issue24_13_a_deeply_nested_export_config_is_one_line(tmp_path, command):
    cli.mount_commands(command)
    (tmp_path / "config.json").write_text(DEEP)
    args = [command, tmp_path] + (["--prompt", "x"] if command == "generate" else [])
    line = _refused(_invoke(cli.app, *args))
    assert "config.json" in line and "nested deeper" in line, line


def test_issue24_13_a_deeply_nested_prepared_index_is_one_line_in_data_inspect(tmp_path):
    cli.mount_commands("data")
    (tmp_path / "index.json").write_text('{"producer": "modmoe.data", "format_version": 2, "x": ' + DEEP + "}")
    line = _refused(_invoke(cli.app, "data", "inspect", tmp_path))
    assert "index.json" in line and "nested deeper" in line, line


# ---------------------------------------------------------------------------- finding 15
OUTPUT_FAULT_CHILD = r"""
import resource, signal, sys, traceback
from typer.testing import CliRunner
from checkpoints_tools.cli import app as tools_app
from modmoe import cli

cli.mount_commands(None)
mode, step, out, config, data_dir, *overrides = sys.argv[1:]
calls = [
    (cli.app, ["data", "prepare", config, *sum((["--set", o] for o in overrides), [])]),
    (cli.app, ["export", step, "--out", f"{out}/hf"]),
    (tools_app, ["consolidate", step, "--out", f"{out}/w.safetensors"]),
]
if mode == "full":  # every file may grow to 64 KiB, then writes fail with EFBIG, as on a full quota
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    run = [f"trainer.run_dir={out}/run", f"data.prepared_dir={data_dir}", "logging.mlflow.enabled=false"]
    run += ["trainer.max_steps=2", "checkpoint.interval_steps=1", "data.max_corpus_bytes=600000"]
    run += ["data.vocab_size=512", "data.val_fraction=0.15", "data.seq_len=64", "model.vocab_size=512"]
    run += ["model.max_seq_len=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.eval_batches=2"]
    calls.append((cli.app, ["train", config, *sum((["--set", o] for o in run), [])]))
for app, args in calls:
    result = CliRunner().invoke(app, args)
    if not isinstance(result.exception, (SystemExit, type(None))):
        traceback.print_exception(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith(("modmoe: ", "error: "))]
    print(f"{args[0]}|{result.exit_code}|{type(result.exception).__name__}|{len(lines)}|{lines!r}")
"""


@pytest.mark.parametrize("mode", ["read-only", "full"])
def test_issue24_15_read_only_and_full_output_locations_are_one_line(small_data_dir, trained_run, tmp_path, mode):
    """Read-only: as root (CI), a read-only bind mount in a mount namespace of the child's own,
    otherwise the directory's write permission taken away. Full: a file-size limit on the child
    (writes past 64 KiB fail), which no root privilege lifts."""
    out = tmp_path / "out"
    out.mkdir()
    overrides = [f"data.prepared_dir={out / 'prepared'}", "data.max_corpus_bytes=200000", "data.vocab_size=300"]
    script = tmp_path / "child.py"
    script.write_text(OUTPUT_FAULT_CHILD)
    step = trained_run / "checkpoints" / "step_00000002"
    command = [sys.executable, str(script), mode, str(step), str(out), CONFIG, small_data_dir, *overrides]
    if mode == "read-only" and os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: no way to make a read-only directory")
        mount = f'mount --bind -o ro "{out}" "{out}" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", mount, "sh", *command]
    elif mode == "read-only":
        out.chmod(0o555)
    env = {**os.environ, "PYTHONPATH": TEST_PYTHONPATH, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|", 4) for line in proc.stdout.splitlines() if "|" in line]
    expected = ["data", "export", "consolidate"] + (["train"] if mode == "full" else [])
    assert [r[0] for r in rows] == expected, proc.stdout
    reasons = ("Read-only file system", "Permission denied") if mode == "read-only" else ("File too large",)
    for name, code, exception, count, lines in rows:
        assert code == ("1" if name == "consolidate" else "2") and exception == "SystemExit", proc.stderr[-3000:]
        assert count == "1" and any(r in lines for r in reasons), (name, lines)
        assert name != "train" or "checkpoint step 1 not saved: File too large" in lines, lines
    if mode == "read-only":
        assert list(out.iterdir()) == []
    else:  # nothing half-written is left where a reader would take it for whole
        assert not (out / "hf").exists() and not (out / "w.safetensors").exists()
        assert not (out / "prepared").exists() and not list((out / "run" / "checkpoints").glob("step_*"))


# ---------------------------------------------------------------------------- finding 16
def test_issue24_16_a_learning_rate_beyond_float32_is_refused_at_config(small_data_dir, tmp_path):
    line = _refused(_train(small_data_dir, tmp_path / "run", "--dry-run", **{"optimizer.lr": 1e39}))
    assert "optimizer.lr = '1e+39'" in line and "less than or equal to 3402823466" in line, line


# ---------------------------------------------------------------------------- finding 17
def test_issue24_17_a_non_finite_last_update_never_completes(small_data_dir, tmp_path):
    run = tmp_path / "run"
    overrides = {"optimizer.lr": 3.4e37, "trainer.max_steps": 1, "optimizer.warmup_steps": 0}
    line = _refused(_train(small_data_dir, run, **overrides))
    assert "step 1: the last update left the model non-finite" in line, line
    assert "trainer.numerics.on_nonfinite = 'stop'" in line
    assert not (run / "COMPLETED").exists() and not list((run / "checkpoints").glob("step_*"))
    assert all(validate(p) == [] for p in (run / "checkpoints").glob("step_*"))
