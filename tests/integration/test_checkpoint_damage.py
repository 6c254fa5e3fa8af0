"""Damaged checkpoints: validate names the problem, resume falls back, loading refuses."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import ckpt_toy as toy
import pytest
from runs import REPO
from typer.testing import CliRunner

from checkpoints_tools.cli import app
from modmoe.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, find_latest_valid, validate


@pytest.fixture()
def two_ckpts(tmp_path) -> tuple[Path, Path]:
    model, opt, sched = toy.build()
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep_last=0))
    sampler = toy.ToySampler()
    for step in (1, 2):
        toy.train_step(model, opt, sched, sampler)
        mgr.save(step, toy.app_state(model, opt, sched), {"step": step})
    return tmp_path / "step_00000001", tmp_path / "step_00000002"


def _shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


def _edit_manifest(ckpt: Path, fn) -> None:
    path = ckpt / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _truncate(ckpt: Path) -> None:
    shard = _shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:-10])


def _flip_byte(ckpt: Path) -> None:
    shard = _shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _flip_metadata(ckpt: Path) -> None:
    md = ckpt / ".metadata"
    data = bytearray(md.read_bytes())
    data[-3] ^= 0x40
    md.write_bytes(bytes(data))


def _remove_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


def _remove_shard(ckpt: Path) -> None:
    _shard(ckpt).unlink()


def _dotdot_path(ckpt: Path) -> None:
    (ckpt.parent / "x").write_text("outside")
    _edit_manifest(ckpt, lambda m: m["files"].append({"path": "../x", "size": 7, "sha256": "0" * 64}))


def _absolute_path(ckpt: Path) -> None:
    _edit_manifest(ckpt, lambda m: m["files"].append({"path": "/etc/hostname", "size": 1, "sha256": "0" * 64}))


def _symlink_out(ckpt: Path) -> None:
    outside = ckpt.parent / "outside.bin"
    shard = _shard(ckpt)
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(outside, shard)


def _unlisted_file(ckpt: Path) -> None:
    (ckpt / "__9_0.distcp").write_bytes(b"extra")


DAMAGES = {
    "truncated": (_truncate, r"has \d+ bytes, manifest says \d+ \(truncated"),
    "flipped_byte": (_flip_byte, r"fails its sha256 checksum"),
    "flipped_metadata": (_flip_metadata, r"'\.metadata' fails its sha256 checksum"),
    "missing_manifest": (_remove_manifest, r"missing manifest\.json"),
    "missing_file": (_remove_shard, r"listed in the manifest is missing"),
    "dotdot_path": (_dotdot_path, r"'\.\./x' leads out of "),
    "absolute_path": (_absolute_path, r"'/etc/hostname' is absolute"),
    "symlink_out": (_symlink_out, r"is a symlink that leads out of "),
    "unlisted_file": (_unlisted_file, r"'__9_0\.distcp' is not listed"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damage_is_named_and_resume_falls_back(two_ckpts, damage, caplog):
    older, newer = two_ckpts
    assert validate(newer) == []
    damage_fn, pattern = DAMAGES[damage]
    damage_fn(newer)
    problems = validate(newer)
    assert problems and any(re.search(pattern, p) for p in problems), problems
    with caplog.at_level(logging.WARNING, logger="modmoe.checkpoint"):
        assert find_latest_valid(newer.parent) == older
    assert any("skipping invalid checkpoint" in r.message and newer.name in r.message for r in caplog.records)

    model, opt, sched = toy.build()
    mgr = CheckpointManager(newer.parent, CheckpointConfig())
    with pytest.raises(CheckpointError, match="refusing to load"):
        mgr.load(newer, toy.app_state(model, opt, sched))
    assert mgr.load(older, toy.app_state(model, opt, sched)) == {"step": 1}

    result = CliRunner().invoke(app, ["validate", str(newer)])
    assert result.exit_code == 1 and "INVALID" in result.output
    assert CliRunner().invoke(app, ["validate", str(older)]).exit_code == 0


def test_metadata_is_never_unpickled_before_its_checksum(two_ckpts, monkeypatch):
    """A tampered .metadata must be rejected before pickle sees it."""
    _, newer = two_ckpts
    (newer / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")

    def boom(*a, **k):
        raise AssertionError("pickle.load reached on an unverified file")

    monkeypatch.setattr(pickle, "load", boom)
    from modmoe.checkpoint.reader import read_dcp_metadata

    with pytest.raises(CheckpointError, match=r"\.metadata"):
        read_dcp_metadata(newer)
    result = CliRunner().invoke(app, ["inspect", str(newer)])
    assert result.exit_code == 1


def test_cli_module_entry_point_exit_codes(two_ckpts):
    older, newer = two_ckpts
    _flip_byte(newer)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run(
        [sys.executable, "-m", "checkpoints_tools", "validate", str(newer)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "fails its sha256 checksum" in bad.stdout
    good = subprocess.run(
        [sys.executable, "-m", "checkpoints_tools", "validate", str(older)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stdout + good.stderr


def test_training_resume_skips_a_damaged_newest_checkpoint_and_says_so(small_data_dir, tmp_path):
    """Through ``modmoe train``: the newest checkpoint has a flipped byte, so ``--resume auto``
    warns about it and continues from the one before; an explicit ``--resume`` of the damaged
    one is refused in one line."""
    from runs import run_modmoe, small_overrides

    def args(steps: int) -> list[str]:
        overrides = small_overrides(
            small_data_dir,
            tmp_path,
            **{
                "trainer.max_steps": steps,
                "checkpoint.interval_steps": 2,
                "checkpoint.keep_last": 0,
                "logging.mlflow.enabled": False,
            },
        )
        return ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])]

    run_modmoe(args(4))
    ckpts = tmp_path / "checkpoints"
    _flip_byte(ckpts / "step_00000004")
    out = run_modmoe(args(6))
    text = out.stdout + out.stderr
    assert "skipping invalid checkpoint" in text and "step_00000004" in text and "fails its sha256 checksum" in text, (
        text[-2000:]
    )
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in text, text[-2000:]
    _flip_byte(ckpts / "step_00000006")
    with pytest.raises(AssertionError) as refused:
        run_modmoe([*args(8), "--resume", str(ckpts / "step_00000006")])
    message = str(refused.value)
    assert "modmoe: refusing to load" in message and "sha256" in message and "Traceback" not in message, message[-2000:]
