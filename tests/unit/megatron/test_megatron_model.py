"""Megatron-Core's GPTModel with MoDE layers against the native model, on CPU.

Megatron's local (non-TE) layers run here inside ``megatron_on_cpu`` (its device queries
answer "cpu"; see modmoe/engines/megatron/cpu_emulation.py): attention, MoE router,
dispatcher and experts are Megatron's own code. Given the native weights through the
converter, logits and gradients (auxiliary losses included) must match; CUDA kernels and
Transformer Engine are left to the GPU tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from modmoe.engines.megatron import MegatronConfig  # noqa: E402
from modmoe.engines.megatron.checkpoint import megatron_checkpoint_to_native  # noqa: E402
from modmoe.engines.megatron.convert import load_into_megatron, megatron_to_native, native_to_megatron  # noqa: E402
from modmoe.engines.megatron.translate import build_transformer_config, translate  # noqa: E402
from modmoe.model import MoDETransformer  # noqa: E402
from modmoe.model_config import ModelConfig  # noqa: E402
from modmoe.parallel.config import ParallelConfig  # noqa: E402

T, B, V = 32, 3, 96
CONFIGS = {
    "mode_softmax_all_losses": {
        "depth": {"capacity": 0.25, "bce_loss_coef": 0.1},
        "moe": {"seq_aux_loss_coef": 0.01, "z_loss_coef": 0.01},
    },
    "mode_sigmoid_bias_shared_predictor": {
        "depth": {"capacity": 0.25, "predictor": True, "router_weight": "sigmoid", "causal_router": "predictor"},
        "moe": {
            "score": "sigmoid",
            "bias_update_rate": 0.01,
            "aux_loss_coef": 0.0,
            "num_shared_experts": 1,
            "first_dense": 1,
        },
    },
    "mode_tied_mqa": {"tie_embeddings": True, "num_kv_heads": 1, "depth": {"capacity": 0.5, "every": 3, "offset": 2}},
    "dense_mod": {"depth": {"capacity": 0.125}, "moe": {"enabled": False}},
    "moe_only": {"depth": {"enabled": False}, "moe": {"top_k": 1, "normalize_top_k": False}},
    # The pretrained families' features (docs/pretrained.md): Llama's biases on q/k/v and the output
    # projection, head_dim apart from dim / heads and llama3 RoPE scaling (Megatron's constants:
    # its wavelengths above 8192 positions are slowed); Qwen's per-head q/k norms, linear RoPE
    # scaling, the gated shared expert and raw top-k weights.
    "llama_features": {
        "attention_bias": "all",
        "head_dim": 12,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
        "depth": {"capacity": 0.5, "router_weight": "unit"},
        "moe": {"enabled": False},
    },
    "qwen_features": {
        "attention_bias": "qkv",
        "qk_norm": "head",
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "depth": {"capacity": 0.5},
        "moe": {"num_shared_experts": 1, "shared_expert_gate": True, "normalize_top_k": False, "first_dense": 1},
    },
}


def make_cfg(extra: dict) -> ModelConfig:
    base = {
        "vocab_size": V,
        "dim": 32,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden": 48,
        "max_seq_len": T,
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16},
    }
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return ModelConfig.model_validate(base)


def build_pair(cfg: ModelConfig, seed: int = 0, engine: MegatronConfig | None = None):
    """A native model and the Megatron model holding the same weights."""
    from modmoe.engines.megatron.spec import build_gpt_model

    torch.manual_seed(seed)
    native = MoDETransformer(cfg)
    with torch.no_grad():
        for p in native.parameters():
            if p.dim() == 1:  # norms start at 1: perturb them so their mapping is checked too
                p.add_(torch.randn_like(p) * 0.1)
    engine = engine or MegatronConfig(dispatcher="allgather")
    plan = translate(cfg, ParallelConfig(), engine, world_size=1, seq_len=T, precision="fp32")
    meg = build_gpt_model(plan, build_transformer_config(plan, use_cpu_initialization=True))
    load_into_megatron(meg, native_to_megatron(native.state_dict(), cfg))
    return native, meg


def megatron_forward(meg, tokens, labels=None):
    mask = ~torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # local attention's default mask is CUDA-only
    return meg(tokens, torch.arange(T).expand(tokens.shape[0], T), attention_mask=mask, labels=labels)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_names_and_shapes_match_the_megatron_spec(megatron_cpu, name):
    cfg = make_cfg(CONFIGS[name])
    native, meg = build_pair(cfg)
    built = {k: v for k, v in meg.state_dict().items() if not k.endswith("_extra_state")}
    converted = native_to_megatron(native.state_dict(), cfg)
    assert converted.keys() == built.keys()
    assert all(converted[k].shape == built[k].shape for k in built)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_the_native_model(megatron_cpu, name):
    cfg = make_cfg(CONFIGS[name])
    native, meg = build_pair(cfg)
    native.eval(), meg.eval()
    tokens = torch.randint(0, V, (B, T))
    with torch.no_grad():
        expected = native(tokens).logits
        got = megatron_forward(meg, tokens)  # [b, s, V]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_features", "qwen_features"])
def test_scaled_rope_tables_are_the_native_ones(megatron_cpu, name):
    """The rotation angles of every position (small random weights hardly see a slowed frequency,
    so the tables are compared directly)."""
    from modmoe.model.layers import rope_angles

    cfg = make_cfg(CONFIGS[name])
    _, meg = build_pair(cfg)
    table = meg.rotary_pos_emb(T)  # [T, 1, 1, hd]: the angles of each half, twice
    args = cfg.to_args()
    expected = rope_angles(torch.arange(T), args.head_dim, args.rope_theta, args.rope_scaling)  # (T, hd/2)
    unscaled = rope_angles(torch.arange(T), args.head_dim, args.rope_theta)
    torch.testing.assert_close(table[:, 0, 0, : args.head_dim // 2], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(expected, unscaled, atol=1e-3)


def _grads_after_one_backward(cfg, engine=None, bias_noise=0.0):
    native, meg = build_pair(cfg, engine=engine)
    if bias_noise:
        with torch.no_grad():
            for moe in native.moe_layers():
                moe.expert_bias.copy_(torch.randn_like(moe.expert_bias) * bias_noise)
        load_into_megatron(meg, native_to_megatron(native.state_dict(), cfg))
    native.train(), meg.train()
    tokens, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    out = native(tokens, targets)
    (out.loss + out.aux_total).backward()
    megatron_forward(meg, tokens, targets).mean().backward()  # aux losses ride on the activations
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in meg.named_parameters()}
    converted = megatron_to_native({**meg.state_dict(), **grads}, cfg)
    errors = {
        k: float((converted[k] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
        for k, p in native.named_parameters()
        if p.grad is not None
    }
    return errors, out


@pytest.mark.parametrize(
    "name", ["mode_softmax_all_losses", "mode_sigmoid_bias_shared_predictor", "dense_mod", "qwen_features"]
)
def test_gradients_with_auxiliary_losses_match_the_native_model(megatron_cpu, name):
    errors, out = _grads_after_one_backward(make_cfg(CONFIGS[name]))
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert any(k.endswith("router.proj.weight") for k in errors)  # the depth router gets its gradient


def test_balance_loss_with_expert_bias_differs_which_is_why_it_is_rejected(megatron_cpu):
    """With a non-zero expert bias, Megatron's balance loss counts loads without the bias: the
    router gradient differs from the native one (translate refuses this unless opted in)."""
    cfg = make_cfg({"moe": {"score": "sigmoid", "bias_update_rate": 0.01, "aux_loss_coef": 0.1}})
    opt_in = MegatronConfig(dispatcher="allgather", aux_loss_with_expert_bias="megatron")
    same, _ = _grads_after_one_backward(cfg, opt_in)
    assert max(same.values()) < 1e-4  # zero bias: both count the same loads
    differ, _ = _grads_after_one_backward(cfg, opt_in, bias_noise=0.2)
    assert max(v for k, v in differ.items() if k.endswith("mlp.gate.weight")) > 1e-3


def test_skipped_tokens_pass_a_megatron_mode_layer_bit_identical(megatron_cpu):
    from modmoe.engines.megatron.layer import MoDETransformerLayer
    from modmoe.model.routing import topk_positions

    cfg = make_cfg(CONFIGS["mode_softmax_all_losses"])
    _, meg = build_pair(cfg)
    meg.eval()
    layers = [m for m in meg.modules() if isinstance(m, MoDETransformerLayer)]
    assert [m.layer_number for m in layers] == [2, 4]  # 1-based: native blocks 1 and 3
    seen = []
    layers[0].register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((kwargs["hidden_states"], out[0])), with_kwargs=True
    )
    with torch.no_grad():
        megatron_forward(meg, torch.randint(0, V, (B, T)))
        x, y = seen[0]  # [s, b, h]
        chosen = torch.zeros(T, B, dtype=torch.bool).scatter_(
            0, topk_positions(layers[0].depth_router.logits(x), T // 4, token_dim=0), True
        )
    assert torch.equal(y[~chosen], x[~chosen]) and not torch.equal(y[chosen], x[chosen])


def test_depth_metrics_match_the_native_auxiliary_losses(megatron_cpu):
    from modmoe.engines.megatron.layer import collect_depth_metrics

    cfg = make_cfg(CONFIGS["mode_sigmoid_bias_shared_predictor"])
    native, meg = build_pair(cfg)
    native.train(), meg.train()
    tokens = torch.randint(0, V, (B, T))
    ref = native(tokens)
    megatron_forward(meg, tokens)
    metrics = collect_depth_metrics([meg], sequence_parallel=False)
    assert metrics["mod_bce_loss"] == pytest.approx(float(ref.aux_losses["mod_bce_loss"]), rel=1e-5)
    assert metrics["mod_predictor_loss"] == pytest.approx(float(ref.aux_losses["mod_predictor_loss"]), rel=1e-5)
    agreement = torch.stack(
        [(a.depth.causal_enter == a.depth.topk_mask).float().mean() for a in ref.layers if a.depth is not None]
    ).mean()
    assert metrics["mod/causal_agreement"] == pytest.approx(float(agreement), rel=1e-5)
    assert collect_depth_metrics([meg], sequence_parallel=False) == {
        "mod_bce_loss": 0.0,
        "mod_predictor_loss": 0.0,
        "mod/causal_agreement": 0.0,
    }


def test_mode_layer_refuses_what_it_cannot_route(megatron_cpu):
    from modmoe.engines.megatron.layer import MoDETransformerLayer

    _, meg = build_pair(make_cfg(CONFIGS["dense_mod"]))
    layer = next(m for m in meg.modules() if isinstance(m, MoDETransformerLayer))
    x = torch.randn(T, B, 32)
    with pytest.raises(NotImplementedError, match="generation runs on the native model"):
        layer(hidden_states=x, inference_context=object())
    with pytest.raises(NotImplementedError, match="packed sequences"):
        layer(hidden_states=x, packed_seq_params=object())


def test_pipeline_stages_take_their_slice_of_the_layers(megatron_cpu):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from modmoe.engines.megatron.layer import MoDETransformerLayer
    from modmoe.engines.megatron.spec import decoder_block_spec

    cfg = make_cfg({"depth": {"capacity": 0.25, "every": 3, "offset": 2}})  # routed: layer 2 only
    plan = translate(cfg, ParallelConfig(), MegatronConfig(pp=2), world_size=2, seq_len=T, precision="fp32")
    tc = build_transformer_config(plan)
    stages = [decoder_block_spec(plan, tc, pp_rank=r).layer_specs for r in (0, 1)]
    assert [s.module for s in stages[0]] == [TransformerLayer, TransformerLayer]
    assert [s.module for s in stages[1]] == [MoDETransformerLayer, TransformerLayer]
    assert stages[1][0].params["depth"] == plan.depth


def _save(root: Path, step: int, meg, meta: dict) -> Path:
    """What the Trainer does: the checkpoint manager seals and commits a MegatronStateIO save."""
    from modmoe.checkpoint import CheckpointConfig, CheckpointManager
    from modmoe.engines.megatron.checkpoint import MegatronStateIO

    CheckpointManager(root, CheckpointConfig(keep_last=0)).save(step, MegatronStateIO(meg), meta)
    return root / f"step_{step:08d}"


@pytest.mark.parametrize("name", ["mode_sigmoid_bias_shared_predictor", "dense_mod"])
def test_dist_checkpoint_exports_to_the_native_state_dict(megatron_cpu, tmp_path, name):
    """Routed layers hold a depth router the others lack: without MoE too (Megatron would stack
    identical layers along one checkpoint axis and refuse the holes)."""
    cfg = make_cfg(CONFIGS[name])
    native, meg = build_pair(cfg)
    path = _save(tmp_path, 3, meg, meta={"engine": "megatron"})
    assert json.loads((path / "manifest.json").read_text())["layout"] == "megatron"
    exported = megatron_checkpoint_to_native(path, cfg)
    expected = native.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_unsealed_or_damaged_megatron_checkpoints_are_refused(megatron_cpu, tmp_path):
    from megatron.core import dist_checkpointing

    from modmoe.checkpoint import find_latest_valid, validate
    from modmoe.config_base import ConfigError

    cfg = make_cfg(CONFIGS["mode_sigmoid_bias_shared_predictor"])
    _, meg = build_pair(cfg)
    good = _save(tmp_path, 2, meg, meta={})
    assert validate(good) == [] and find_latest_valid(tmp_path) == good
    # An interrupted save of older code (shards written, no manifest) is skipped by --resume auto.
    (tmp_path / "step_00000004").mkdir()
    dist_checkpointing.save({"model": meg.sharded_state_dict()}, str(tmp_path / "step_00000004"))
    assert find_latest_valid(tmp_path) == good
    # A flipped byte in a shard is named by validate and refused by the exporter in one line.
    shard = max((p for p in good.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("checksum" in problem for problem in validate(good))
    assert find_latest_valid(tmp_path) is None
    with pytest.raises(ConfigError, match=r"refusing to load .*step_00000002.*checksum") as err:
        megatron_checkpoint_to_native(good, cfg)
    assert "\n" not in str(err.value)
    # A new save commits atomically beside them; nothing it did not write is touched.
    newest = _save(tmp_path, 6, meg, meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert find_latest_valid(tmp_path) == newest
