"""A pretrained import under torchrun (2 ranks over gloo): EP=2, FSDP2 and TP=2 each give the
logits of one rank, each rank reads only its part of the checkpoint, and the frozen trunk of
``optimizer.routers_only_steps`` keeps every bit of every shard while the routers move.

The checkpoint is a tiny Qwen2-MoE (gated shared expert, q/k/v biases, a dense first layer),
MoD-ified at capacity 1.0, so routers, experts, shared experts and biases are all sharded somewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import hf_models
import pytest
import torch
from runs import REPO, TEST_PYTHONPATH

from modmoe.config import JobConfig
from modmoe.config_base import validate_config
from modmoe.hf.load import pretrained_model

pytestmark = pytest.mark.multirank
pytest.importorskip("transformers")
LAYOUTS = ("ep2", "fsdp2", "tp2")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    work = tmp_path_factory.mktemp("hf-layouts")
    model = hf_models.build("qwen2_moe")
    hf_models.save(model, work / "hf")
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(1))
    cfg = validate_config(
        JobConfig, {"model": {"from_hf": str(work / "hf"), "depth": {"enabled": True, "capacity": 1.0}}}
    )
    with torch.no_grad():
        one_rank = pretrained_model(cfg.model).eval()(ids).logits
    assert hf_models.rel_err(one_rank, hf_models.logits(model, ids)) <= 1e-5
    torch.save({"ids": ids, "logits": one_rank}, work / "reference.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TEST_PYTHONPATH}
    worker = REPO / "tests" / "support" / "hf_layout_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker), str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return work, (work / "hf" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("layout", LAYOUTS)
def test_import_under_the_layout(layout, launched):
    work, checkpoint_bytes = launched
    for rank in (0, 1):
        result = json.loads((work / f"{layout}-{rank}.json").read_text())
        assert result["rel_err"] <= 1e-5, (rank, result)
        assert result["bytes_read"] < 0.9 * checkpoint_bytes, (rank, result)  # its part, not the whole
        assert result["trunk_frozen"] and result["routers_moved"], (rank, result)


@needs_deepspeed
def test_import_under_deepspeed_zero3_with_ep(launched):
    """DeepSpeed takes the weights of the model it is given: imported before it partitions them."""
    work, checkpoint_bytes = launched
    for rank in (0, 1):
        result = json.loads((work / f"deepspeed_zero3_ep2-{rank}.json").read_text())
        assert result["rel_err"] <= 1e-5 and result["bytes_read"] < 0.9 * checkpoint_bytes, (rank, result)
