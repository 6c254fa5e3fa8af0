"""FP8 (torchao float8) conversion and the config checks of compile / CUDA graphs / FP8."""

from __future__ import annotations

import pytest
import torch

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.model import MoDETransformer
from modmoe.model_config import ModelConfig
from modmoe.parallel.fp8 import apply_fp8
from modmoe.train.resolve import resolve_job


def fp8_model() -> MoDETransformer:
    """Routed blocks with experts and a shared expert, and dense blocks (moe.every = 2)."""
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=2,
        ffn_hidden=64,
        max_seq_len=32,
        depth={"capacity": 0.25, "predictor": True, "predictor_hidden": 16},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32, "num_shared_experts": 1, "every": 2},
    )
    torch.manual_seed(0)
    return MoDETransformer(cfg).train()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_swaps_only_the_projections_and_trains_under_emulation(recipe):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    model, ref = fp8_model(), fp8_model()
    keys = sorted(model.state_dict())
    converted = apply_fp8(model, recipe, emulate=True)
    attn = [f"layers.{i}.attn.{p}" for i in range(2) for p in ("wq", "wk", "wv", "wo")]
    assert converted == sorted(
        attn + [f"layers.0.mlp.shared.w{j}" for j in (1, 2, 3)] + [f"layers.1.mlp.w{j}" for j in (1, 2, 3)]
    )
    block0 = model.layers[0]
    for kept in (block0.mlp.gate, model.layers[1].router.proj, *model.layers[1].router.predictor, model.output):
        assert not isinstance(kept, Float8Linear)  # router, gate, predictor, LM head: high precision
    assert sorted(model.state_dict()) == keys  # checkpoints keep their names
    tokens = torch.randint(0, 64, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(tokens, tokens)
        (out.loss + out.aux_total).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    # FP8 rounding (e4m3 forward, e5m2 gradients) moves the first loss by ~1e-5 relative here.
    assert losses[0] == pytest.approx(float(ref(tokens, tokens).loss), rel=1e-3)
    assert losses[2] < losses[0] - 0.1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.cuda_graphs=true"], "trainer.cuda_graphs = True: needs trainer.compile = blocks or model"),
        (["trainer.cuda_graphs=true", "trainer.compile=model"], "trainer.cuda_graphs = True: needs a CUDA device"),
        (
            ["trainer.cuda_graphs=true", "trainer.compile=model", "trainer.compile_backend=aot_eager"],
            "needs trainer.compile_backend = inductor",
        ),
        (["trainer.cuda_graphs=true", "trainer.compile=blocks", "parallel.ep=2"], "needs parallel.ep = 1"),
        (["trainer.fp8=rowwise"], "trainer.fp8 = 'rowwise': needs a CUDA GPU with FP8 GEMMs (training runs on cpu"),
        (["trainer.fp8=tensorwise", "parallel.tp=2"], "needs parallel.tp = 1"),
        (["trainer.compile=model", "parallel.dp_backend=deepspeed"], "not honoured by the deepspeed backend"),
        (["trainer.compile=blocks", "engine=megatron"], "not honoured by the megatron backend"),
        (["trainer.compile=fast"], "trainer.compile = 'fast'"),
    ],
)
def test_speed_options_are_checked_when_the_job_is_resolved(overrides, message):
    """On this CPU machine, for a 2-rank job (so that ep=2 and tp=2 are valid layouts)."""
    with pytest.raises(ConfigError) as err:
        resolve_job(load_config("configs/tiny.yaml", overrides), world_size=2, device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)
