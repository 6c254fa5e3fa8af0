"""Real torchrun (2 ranks, gloo): DDP and FSDP2 saves load on 1 rank; a 1-rank save reshards
onto 2 FSDP2 ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ckpt_toy as toy
import pytest
import torch
from runs import REPO
from safetensors.torch import load_file, save_file

from modmoe.checkpoint import CheckpointConfig, CheckpointManager, read_manifest

WORKER = REPO / "tests/support/ckpt_dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("multirank")
    model, opt, sched = toy.build(seed=11)
    sampler = toy.ToySampler()
    for _ in range(5):
        toy.train_step(model, opt, sched, sampler)
    CheckpointManager(work / "single", CheckpointConfig()).save(
        5, toy.app_state(model, opt, sched), {"phase": "single"}
    )
    save_file(toy.plain_state(model), work / "single_ref.safetensors")
    expected_lr = opt.param_groups[0]["lr"]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(WORKER),
        str(work),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (work / "expected_lr.txt").write_text(repr(expected_lr))
    return work


def _load_single(ckpt_root: Path):
    model, opt, sched = toy.build(seed=123)
    mgr = CheckpointManager(ckpt_root, CheckpointConfig())
    meta = mgr.load(mgr.find_latest_valid(), toy.app_state(model, opt, sched))
    return model, opt, meta


@pytest.mark.multirank
@pytest.mark.parametrize("phase", ["ddp", "fsdp"])
def test_two_rank_save_loads_on_one_rank(torchrun_work, phase):
    manifest = read_manifest(torchrun_work / phase / "step_00000002")
    assert manifest.world_size == 2
    assert {"rng/rank_00000.json", "rng/rank_00001.json"} <= {f.path for f in manifest.files}
    model, opt, meta = _load_single(torchrun_work / phase)
    assert meta == {"phase": phase}
    ref = load_file(torchrun_work / f"{phase}_ref.safetensors")
    got = toy.plain_state(model)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    if phase == "fsdp":  # the sharded optimizer state is resharded too
        exp_avg = load_file(torchrun_work / "fsdp_ref_exp_avg.safetensors")
        names = dict(zip(map(id, model.parameters()), (n for n, _ in model.named_parameters())))
        for p, st in opt.state.items():
            assert torch.equal(st["exp_avg"], exp_avg[names[id(p)]])


@pytest.mark.multirank
def test_one_rank_save_reshards_onto_two_fsdp_ranks(torchrun_work):
    result = json.loads((torchrun_work / "result.json").read_text())
    assert result["reshard_equal"] == [True, True]
    # rank 0 finds its saved RNG state; rank 1 has none and is reseeded with a warning
    assert result["rng_fallback_warned"] == [False, True]
    assert result["reshard_meta"] == {"phase": "single"}
    assert result["lr_after_load"] == float((torchrun_work / "expected_lr.txt").read_text())
