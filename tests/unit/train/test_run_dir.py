"""The run directory: only modmoe's own is written into, and one job at a time holds it."""

from __future__ import annotations

import json
import os

import pytest

from modmoe.config_base import ConfigError
from modmoe.train.run_dir import MARKER, check_run_dir, claim_run_dir
from modmoe.train.run_lock import RunDirLockedError, RunLock


def test_new_empty_marked_and_seeded_directories_are_ours(tmp_path):
    assert check_run_dir(tmp_path / "a" / "b") == "new"
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty") == "empty"
    (tmp_path / "empty" / "logs").mkdir()  # what the Slurm launcher creates before the trainer starts
    assert check_run_dir(tmp_path / "empty") == "empty"
    assert claim_run_dir(tmp_path / "a" / "b") == "new"
    assert json.loads((tmp_path / "a" / "b" / MARKER).read_text())["created_by"] == "modmoe"
    assert check_run_dir(tmp_path / "a" / "b") == "marked"
    seeded = tmp_path / "seeded" / "checkpoints" / "step_00000003"  # a checkpoint copied in to resume from
    seeded.mkdir(parents=True)
    manifest = {"format": "modmoe-checkpoint", "format_version": 1, "step": 3, "world_size": 1, "layout": "dcp"}
    manifest |= {"created_unix": 0.0, "files": [], "meta": {}}
    (seeded / "manifest.json").write_text(json.dumps(manifest))
    assert claim_run_dir(tmp_path / "seeded") == "seeded" and (tmp_path / "seeded" / MARKER).is_file()
    (tmp_path / "seeded" / MARKER).unlink()
    (seeded / "manifest.json").write_text(json.dumps({**manifest, "format": "someone-else"}))
    with pytest.raises(ConfigError, match="not a modmoe run directory"):
        check_run_dir(tmp_path / "seeded")


def test_issue24_3_a_foreign_run_directory_is_never_claimed(tmp_path):
    """What other trainers leave (a config.yaml with model: and trainer: keys, a metrics.jsonl)
    does not make a directory modmoe's: only the marker does. The refusal says how to adopt a
    pre-marker modmoe run directory on purpose, and nothing in the directory changes."""
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("model: {dim: 64}\ntrainer: {max_steps: 3}\n")
    (foreign / "metrics.jsonl").write_text('{"step": 1}\n')
    (foreign / "checkpoints").mkdir()
    before = {p.name: p.read_bytes() for p in foreign.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as err:
        claim_run_dir(foreign)
    assert "not a modmoe run directory" in str(err.value) and f"touch {foreign / MARKER}" in str(err.value)
    assert {p.name: p.read_bytes() for p in foreign.iterdir() if p.is_file()} == before
    (foreign / MARKER).touch()  # adopted on purpose
    assert claim_run_dir(foreign) == "marked"


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
