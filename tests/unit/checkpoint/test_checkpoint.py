"""Single-process checkpoint tests: round trip, exact resume, retention, policy, async save."""

from __future__ import annotations

import random
import time

import ckpt_toy as toy
import numpy as np
import pytest
import torch
from torch import nn

from modmoe.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    TrainState,
    list_checkpoints,
    read_manifest,
    validate,
)
from modmoe.config_base import ConfigError, validate_config


def _assert_nested_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_roundtrip_is_bit_identical(tmp_path):
    model, opt, sched = toy.build(seed=0)
    sampler = toy.ToySampler()
    for _ in range(3):
        toy.train_step(model, opt, sched, sampler)
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    meta = {"toy_sampler": sampler.state_dict(), "mlflow_run_id": "r123", "config": {"model": {"dim": 16}}}
    mgr.save(3, toy.app_state(model, opt, sched), meta)
    saved = (toy.plain_state(model), opt.state_dict(), sched.state_dict())
    after_save = _draws()

    model2, opt2, sched2 = toy.build(seed=99)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    path = mgr.find_latest_valid()
    assert path is not None and path.name == "step_00000003"
    got_meta = mgr.load(path, toy.app_state(model2, opt2, sched2))
    assert got_meta == meta
    _assert_nested_equal(saved[0], toy.plain_state(model2), "model")
    _assert_nested_equal(saved[1], opt2.state_dict(), "optim")
    _assert_nested_equal(saved[2], sched2.state_dict(), "sched")
    a, b = after_save, _draws()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    manifest = read_manifest(path)
    assert manifest.step == 3 and manifest.world_size == 1 and manifest.model_prefix == "train.model."
    assert {".metadata", "rng/rank_00000.json"} <= {f.path for f in manifest.files}


@pytest.mark.parametrize("async_save", [False, True])
def test_exact_resume_matches_straight_run(tmp_path, async_save):
    n = 4
    model, opt, sched = toy.build(seed=0)
    sampler = toy.ToySampler()
    torch.manual_seed(42)
    straight = [toy.train_step(model, opt, sched, sampler) for _ in range(2 * n)]
    straight_params = toy.plain_state(model)

    model, opt, sched = toy.build(seed=0)
    sampler = toy.ToySampler()
    torch.manual_seed(42)
    first = [toy.train_step(model, opt, sched, sampler) for _ in range(n)]
    mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=async_save))
    mgr.save(n, toy.app_state(model, opt, sched), {"toy_sampler": sampler.state_dict()})
    mgr.close()
    del model, opt, sched, sampler

    model, opt, sched = toy.build(seed=7)  # different init: everything must come from disk
    torch.manual_seed(0)
    mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=async_save))
    meta = mgr.load(mgr.find_latest_valid(), toy.app_state(model, opt, sched))
    sampler = toy.ToySampler(seed=0)
    sampler.load_state_dict(meta["toy_sampler"])
    second = [toy.train_step(model, opt, sched, sampler) for _ in range(n)]
    assert first + second == straight  # exact float equality
    _assert_nested_equal(straight_params, toy.plain_state(model), "params")


def test_retention_keep_last_and_keep_every(tmp_path):
    model, opt, sched = toy.build()
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2, keep_every=4))
    for step in range(1, 10):
        mgr.save(step, toy.app_state(model, opt, sched), {})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 9]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_should_save_policy(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(interval_steps=5))
    assert [s for s in range(0, 12) if mgr.should_save(s)] == [5, 10]
    mgr.save(5, {"train": TrainState(nn.Linear(2, 2))}, {})
    assert not mgr.should_save(5)
    off = CheckpointManager(tmp_path, CheckpointConfig(interval_steps=0, interval_minutes=0.0005))
    assert not off.should_save(1)
    time.sleep(0.05)
    assert off.should_save(1)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"keep_last = -1"):
        validate_config(CheckpointConfig, {"keep_last": -1})
    with pytest.raises(ConfigError, match=r"unknown key interval"):
        validate_config(CheckpointConfig, {"interval": 3})
    assert CheckpointConfig.model_fields["keep_every"].description


def test_leftover_tmp_dirs_are_removed_on_start(tmp_path):
    (tmp_path / ".tmp-step_00000007" / "rng").mkdir(parents=True)
    (tmp_path / ".tmp-step_00000007" / "__0_0.distcp").write_bytes(b"partial")
    CheckpointManager(tmp_path, CheckpointConfig())
    assert list(tmp_path.iterdir()) == []


def test_meta_must_be_json(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    with pytest.raises(CheckpointError, match="meta is not JSON"):
        mgr.save(1, {"train": TrainState(nn.Linear(2, 2))}, {"bad": object()})


def test_resave_same_step_replaces_it(tmp_path):
    model = nn.Linear(3, 3)
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    mgr.save(2, {"train": TrainState(model)}, {"v": 1})
    mgr.save(2, {"train": TrainState(model)}, {"v": 2})
    assert validate(tmp_path / "step_00000002") == []
    assert read_manifest(tmp_path / "step_00000002").meta == {"v": 2}


class _Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2048, 2048, bias=False)  # 16 MiB
        self.b = nn.Linear(2048, 2048, bias=False)  # 16 MiB


def test_async_save_returns_before_write_and_snapshots_state(tmp_path):
    torch.manual_seed(0)
    model = _Big()
    timings = {}
    for step, async_save in [(1, False), (2, True)]:
        mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=async_save, keep_last=0))
        expected = toy.plain_state(model)
        t0 = time.perf_counter()
        mgr.save(step, {"train": TrainState(model)}, {"step": step})
        timings[async_save] = time.perf_counter() - t0
        # Training goes on while the write runs: this must not leak into the checkpoint.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
        assert not mgr.in_flight
        fresh = _Big()
        CheckpointManager(tmp_path, CheckpointConfig()).load(
            tmp_path / f"step_{step:08d}", {"train": TrainState(fresh)}
        )
        _assert_nested_equal(expected, toy.plain_state(fresh), f"async={async_save}")
    print(f"\n32 MiB model: save() blocked {timings[False]:.3f}s sync, {timings[True]:.3f}s async")
