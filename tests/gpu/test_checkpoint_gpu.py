"""CUDA round trip (skipped without CUDA): device tensors and the CUDA RNG state."""

from __future__ import annotations

import ckpt_toy as toy
import pytest
import torch

from modmoe.checkpoint import CheckpointConfig, CheckpointManager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("async_save", [False, True])
def test_cuda_roundtrip_restores_weights_optimizer_and_cuda_rng(tmp_path, async_save):
    model, opt, sched = toy.build(seed=0)
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, toy.D, device="cuda")
    model(x).square().mean().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=async_save))
    mgr.save(1, {"train": toy.TrainState(model, opt)}, {})
    mgr.wait()
    expected = toy.plain_state(model)
    draw = torch.rand(4, device="cuda")

    fresh, _, _ = toy.build(seed=9)
    fresh.cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    torch.cuda.manual_seed_all(77)
    mgr.load(mgr.find_latest_valid(), {"train": toy.TrainState(fresh, fresh_opt)})
    for k, v in toy.plain_state(fresh).items():
        assert v.is_cuda and torch.equal(v, expected[k]), k
    assert torch.equal(torch.rand(4, device="cuda"), draw)
    st = fresh_opt.state[fresh.experts]
    assert st["exp_avg"].is_cuda and torch.equal(st["exp_avg"], opt.state[model.experts]["exp_avg"])
