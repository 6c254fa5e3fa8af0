"""checkpoints_tools: consolidate to safetensors, inspect."""

from __future__ import annotations

import json

import ckpt_toy as toy
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from checkpoints_tools.cli import app
from modmoe.checkpoint import CheckpointConfig, CheckpointManager


def _saved(tmp_path):
    model, opt, sched = toy.build(seed=3)
    sampler = toy.ToySampler()
    for _ in range(2):
        toy.train_step(model, opt, sched, sampler)
    mgr = CheckpointManager(tmp_path / "ckpts", CheckpointConfig())
    meta = {"toy_sampler": sampler.state_dict(), "config": {"model": {"dim": toy.D, "experts": toy.E}}}
    mgr.save(2, toy.app_state(model, opt, sched), meta)
    return model, tmp_path / "ckpts" / "step_00000002", meta


def test_consolidate_equals_model_state_dict(tmp_path):
    model, ckpt, meta = _saved(tmp_path)
    out = tmp_path / "export" / "model.safetensors"
    # A tiny group budget forces several load groups.
    result = CliRunner().invoke(app, ["consolidate", str(ckpt), "--out", str(out), "--group-mb", "1"])
    assert result.exit_code == 0, result.output
    loaded = load_file(out)
    expected = model.state_dict()
    assert loaded.keys() == expected.keys() and "expert_bias" in loaded and "experts" in loaded
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(out, "pt") as f:
        assert f.metadata()["step"] == "2"
    assert json.loads((out.parent / "config.json").read_text()) == meta["config"]
    side = json.loads((out.parent / "model.meta.json").read_text())
    assert side["step"] == 2 and side["meta"] == meta


def test_consolidate_streams_in_groups(tmp_path, monkeypatch):
    """With a budget smaller than any tensor, each DCP load holds exactly one tensor."""
    from checkpoints_tools import consolidate as mod
    from modmoe.checkpoint import reader

    _, ckpt, _ = _saved(tmp_path)
    sizes: list[int] = []
    real_load = reader.dcp.load
    monkeypatch.setattr(reader.dcp, "load", lambda sd, **kw: (sizes.append(len(sd)), real_load(sd, **kw))[1])
    info = mod.consolidate(ckpt, tmp_path / "m.safetensors", group_bytes=1)
    assert sizes == [1] * info["tensors"] and info["tensors"] == len(toy.ToyMoE().state_dict())


def test_consolidate_rejects_bad_output_name(tmp_path):
    _, ckpt, _ = _saved(tmp_path)
    result = CliRunner().invoke(app, ["consolidate", str(ckpt), "--out", str(tmp_path / "m.bin")])
    assert result.exit_code == 1 and "must end with .safetensors" in result.output


def test_inspect_prints_step_tensors_and_meta(tmp_path):
    _, ckpt, _ = _saved(tmp_path)
    result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "step: 2" in out and "world size: 1" in out and "layout: dcp" in out
    assert "train.model.experts" in out and "[4, 16, 32]" in out and "float32" in out
    assert "train.optim.state.fc1.weight.exp_avg" in out
    assert '"toy_sampler"' in out and "valid: yes" in out
