"""The native engine's speed paths on a real GPU (skipped without CUDA): CUDA graphs through
``modmoe train``, no host sync in a top-k training step, grouped GEMM on CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from runs import read_metrics, run_modmoe, small_overrides

from modmoe.model import MoDETransformer
from modmoe.model.moe import GroupedExperts
from modmoe.model_config import ModelConfig


def cfg(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=512,
        dim=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=256,
        max_seq_len=256,
        depth={"capacity": 0.125, "predictor": True},
        moe={"num_experts": 8, "top_k": 2, "expert_hidden": 128, **moe},
    )


def train(small_data_dir, run_dir, *extra: str) -> list[dict]:
    overrides = small_overrides(
        small_data_dir,
        run_dir,
        **{
            "trainer.max_steps": 4,
            "trainer.device": "cuda",
            "trainer.precision": "fp32",
            "logging.mlflow.enabled": False,
        },
    )
    run_modmoe(["train", "configs/tiny.yaml", *sum((["--set", o] for o in [*overrides, *extra]), [])], timeout=900)
    return read_metrics(run_dir)


def test_cuda_graphs_train_like_the_compiled_model(small_data_dir, tmp_path):
    compiled = train(small_data_dir, tmp_path / "compiled", "trainer.compile=model")
    graphs = train(small_data_dir, tmp_path / "graphs", "trainer.compile=model", "trainer.cuda_graphs=true")
    for a, b in zip(compiled, graphs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-3
        )
    assert graphs[-1]["eval/loss_topk"] == pytest.approx(compiled[-1]["eval/loss_topk"], rel=1e-4)


@pytest.mark.parametrize("moe", [{}, {"capacity_factor": 1.25}], ids=["dropless", "capacity"])
def test_topk_training_step_never_syncs_with_the_host(moe):
    torch.manual_seed(0)
    model = MoDETransformer(cfg(**moe)).cuda().train()
    tokens = torch.randint(0, 512, (4, 256), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens, tokens)
        (out.loss + out.aux_total).backward()

    step()  # lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grouped_experts_match_the_loop_on_cuda():
    results = []
    for kernel in ("loop", "grouped"):
        torch.manual_seed(0)
        model = MoDETransformer(cfg()).cuda().train()
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                m.kernel = kernel
        tokens = torch.randint(0, 512, (4, 256), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens, tokens)
        out.loss.backward()
        results.append(
            (out.loss.float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        )
    (loss_l, g_l), (loss_g, g_g) = results
    assert float((loss_g - loss_l).abs() / loss_l) < 1e-2
    assert float((g_g - g_l).norm() / g_l.norm()) < 5e-2
