"""Issue 24's checkpoint findings at the manager: a stray ``step_*`` entry never makes retention
delete real checkpoints (1), checkpoints modmoe cannot read are never deleted and never
silently started over (2), resealed RNG and sampler records that are malformed fail validation
(12), and torch's writer failing on a full disk is one line (14). Each failed before the issue."""

from __future__ import annotations

import errno
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

import ckpt_toy as toy
import pytest
from hostile import reseal

from modmoe.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, validate


def _manager(directory: Path, **cfg) -> tuple[CheckpointManager, dict]:
    model, opt, sched = toy.build()
    return CheckpointManager(directory, CheckpointConfig(**cfg)), toy.app_state(model, opt, sched)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _break_index(step: Path) -> None:
    """DCP's index replaced by bytes no reader takes, and the manifest resealed over it."""
    (step / ".metadata").write_bytes(b"not a checkpoint index")
    reseal(step, ".metadata")


# ---------------------------------------------------------------------------- finding 1
def test_issue24_1_a_stray_step_entry_never_makes_retention_delete_real_checkpoints(tmp_path):
    mgr, state = _manager(tmp_path, keep_last=1)
    mgr.save(1, state)
    precious = tmp_path.parent / f"{tmp_path.name}-precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    (tmp_path / "step_00000099").mkdir()  # empty: sorts after every real checkpoint
    os.symlink(precious, tmp_path / "step_00000098")  # a symlink to someone's directory
    (tmp_path / "step_00000097").write_text("a file")
    mgr.save(2, state)
    assert _names(tmp_path) == ["step_00000002", "step_00000097", "step_00000098", "step_00000099"]
    assert validate(tmp_path / "step_00000002") == [] and (precious / "notes.txt").read_text() == "mine"
    assert mgr.find_resume_point() == tmp_path / "step_00000002"
    mgr.close()


# ---------------------------------------------------------------------------- finding 2
def test_issue24_2_unreadable_checkpoints_are_never_deleted_nor_silently_skipped(tmp_path):
    mgr, state = _manager(tmp_path, keep_last=1)
    mgr.save(1, state)
    _break_index(tmp_path / "step_00000001")
    mgr.save(2, state)
    mgr.save(3, state)  # retention: step 2 (valid) goes, step 1 (unreadable) stays
    assert _names(tmp_path) == ["step_00000001", "step_00000003"]
    _break_index(tmp_path / "step_00000003")
    from modmoe.checkpoint.manager import find_resume_point

    with pytest.raises(CheckpointError) as err:
        find_resume_point(tmp_path)
    line = str(err.value)
    assert "\n" not in line and "none of which can be read" in line and "--resume none" in line
    mgr.save(3, state)  # starting over reaches step 3 again: the unreadable one is set aside, not deleted
    assert validate(tmp_path / "step_00000003") == []
    assert [n.split(".")[0] for n in _names(tmp_path)] == ["step_00000001", "step_00000003", "step_00000003"]
    assert find_resume_point(tmp_path / "nothing-here") is None  # no checkpoint at all: a fresh start
    mgr.close()


# ---------------------------------------------------------------------------- finding 12
RNG_DAMAGE = [
    lambda s: s.pop("numpy"),  # KeyError on resume before
    lambda s: s["python"].update(internal=[1, 2, 3]),  # a Mersenne Twister state of the wrong length
    lambda s: s.update(torch_cpu="AAAA"),  # a torch state of the wrong size
    lambda s: s["numpy"].update(pos=10**30),
]
RNG_TEXT = ["{", '{"python": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"python": 1e999}']
SAMPLER_DAMAGE = [
    lambda m: m.pop("position"),
    lambda m: m.update(position=-5),
    lambda m: m.update(position=1e300),
    lambda m: m.update(counts={"x": 3}),  # counts that do not add up to the position
    lambda m: m.update(weights={"main": "heavy"}),
]


@pytest.fixture(scope="module")
def saved_step(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    mgr, state = _manager(directory)
    sampler = {
        "position": 16,
        "counts": {"main": 16},
        "seed": 0,
        "seq_len": 64,
        "samples_per_epoch": {"main": 100},
        "weights": {"main": 1.0},
    }
    mgr.save(2, state, {"sampler": sampler})
    mgr.close()
    assert validate(directory / "step_00000002") == []
    return directory / "step_00000002"


def _copy(step: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "step_00000002"
    shutil.copytree(step, copy)
    return copy


@pytest.mark.parametrize("damage", range(len(RNG_DAMAGE) + len(RNG_TEXT)))
def test_issue24_12_a_resealed_malformed_rng_state_fails_validation(saved_step, tmp_path, damage):
    step = _copy(saved_step, tmp_path)
    rng = step / "rng" / "rank_00000.json"
    if damage < len(RNG_DAMAGE):
        state = json.loads(rng.read_text())
        RNG_DAMAGE[damage](state)
        rng.write_text(json.dumps(state))
    else:
        rng.write_text(RNG_TEXT[damage - len(RNG_DAMAGE)])
    reseal(step, "rng/rank_00000.json")
    problems = validate(step)
    assert problems and "rng/rank_00000.json" in problems[0] and "\n" not in problems[0], problems
    mgr, state = _manager(tmp_path)
    with pytest.raises(CheckpointError):
        mgr.load(step, state)
    mgr.close()


@pytest.mark.parametrize("damage", range(len(SAMPLER_DAMAGE)))
def test_issue24_12_a_malformed_sampler_position_fails_validation(saved_step, tmp_path, damage):
    step = _copy(saved_step, tmp_path)
    manifest = json.loads((step / "manifest.json").read_text())
    SAMPLER_DAMAGE[damage](manifest["meta"]["sampler"])
    (step / "manifest.json").write_text(json.dumps(manifest))
    problems = validate(step)
    assert problems and "meta.sampler" in problems[0], problems


# ---------------------------------------------------------------------------- finding 14
@contextmanager
def _disk_fills_while_writing(budget: int):
    """DCP's files are real files that take ``budget`` bytes in all, then every write fails with
    ENOSPC, as a full disk makes them fail; torch's zip writer then raises its own RuntimeError."""
    from torch.distributed.checkpoint import filesystem

    original = filesystem.FileSystem.create_stream
    left = [budget]

    class FillingFile(io.FileIO):
        def write(self, data) -> int:
            if len(data) > left[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= len(data)
            return super().write(data)

    @contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with original(self, path, mode) as stream:
                yield stream
            return
        with io.BufferedWriter(FillingFile(str(path), "wb"), 64) as stream:
            yield stream

    filesystem.FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        filesystem.FileSystem.create_stream = original


def test_issue24_14_a_full_disk_inside_torchs_writer_is_one_line(tmp_path):
    mgr, state = _manager(tmp_path)
    mgr.save(1, state)
    with _disk_fills_while_writing(budget=5000), pytest.raises(CheckpointError) as err:  # inside torch.save
        mgr.save(2, state)
    line = str(err.value)
    assert "\n" not in line and line.startswith("checkpoint step 2 not saved: No space left on device"), line
    assert "newest committed checkpoint: step_00000001, untouched" in line
    assert _names(tmp_path) == ["step_00000001"] and validate(tmp_path / "step_00000001") == []
    mgr.close()
