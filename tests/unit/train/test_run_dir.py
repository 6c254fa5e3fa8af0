"""The run directory: only modmoe's own is written into, and one job at a time holds it."""

from __future__ import annotations

import json
import os

import pytest

from modmoe.config_base import ConfigError
from modmoe.train.run_dir import MARKER, check_run_dir, claim_run_dir
from modmoe.train.run_lock import RunDirLockedError, RunLock


def test_new_empty_marked_and_legacy_directories_are_ours(tmp_path):
    assert check_run_dir(tmp_path / "a" / "b") == "new"
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty") == "empty"
    (tmp_path / "empty" / "logs").mkdir()  # what the Slurm launcher creates before the trainer starts
    assert check_run_dir(tmp_path / "empty") == "empty"
    assert claim_run_dir(tmp_path / "a" / "b") == "new"
    assert json.loads((tmp_path / "a" / "b" / MARKER).read_text())["created_by"] == "modmoe"
    assert check_run_dir(tmp_path / "a" / "b") == "marked"
    legacy = tmp_path / "legacy"  # written before the marker existed
    legacy.mkdir()
    (legacy / "config.yaml").write_text("model: {dim: 64}\ntrainer: {max_steps: 3}\n")
    (legacy / "metrics.jsonl").write_text('{"step": 1}\n')
    assert claim_run_dir(legacy) == "legacy" and (legacy / MARKER).is_file()
    seeded = tmp_path / "seeded" / "checkpoints" / "step_00000003"  # a checkpoint copied in to resume from
    seeded.mkdir(parents=True)
    (seeded / "manifest.json").write_text(json.dumps({"format": "modmoe-checkpoint"}))
    assert check_run_dir(tmp_path / "seeded") == "legacy"
    (seeded / "manifest.json").write_text(json.dumps({"format": "someone-else"}))
    with pytest.raises(ConfigError, match="not a modmoe run directory"):
        check_run_dir(tmp_path / "seeded")


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p.write_text("x"), "is a file"),
        (lambda p: (p.mkdir(), (p / "thesis.tex").write_text("x")), "not a modmoe run directory"),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.yaml").write_text("not: modmoe\n"),
                (p / "metrics.jsonl").write_text(""),
            ),
            "not a modmoe run directory",
        ),
    ],
)
def test_anything_else_is_refused_in_one_line(tmp_path, setup, expected):
    path = tmp_path / "run"
    setup(path)
    before = sorted(os.listdir(path)) if path.is_dir() else path.read_text()
    with pytest.raises(ConfigError) as err:
        claim_run_dir(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert (sorted(os.listdir(path)) if path.is_dir() else path.read_text()) == before  # nothing written


def test_a_run_dir_below_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(tmp_path / "f" / "run")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root: simulate it
    with pytest.raises(ConfigError, match="not writable"):
        check_run_dir(tmp_path / "new")


def test_two_locks_in_one_process_conflict_and_release_frees(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire()
    with pytest.raises(RunDirLockedError):
        RunLock(tmp_path).acquire()
    first.release()
    assert RunLock(tmp_path).acquire()
