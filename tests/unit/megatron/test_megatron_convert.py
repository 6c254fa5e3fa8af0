"""Native <-> Megatron state-dict converter: bit-identical round trips on real native models,
Megatron's packing layouts, and one-line errors. (Names and shapes against a real Megatron
GPTModel are checked in test_megatron_model.py.)"""

from __future__ import annotations

import pytest
import torch

from modmoe.engines.megatron.convert import MegatronLayout, load_into_megatron, megatron_to_native, native_to_megatron
from modmoe.model import MoDETransformer
from modmoe.model_config import ModelConfig

CONFIGS = {
    "mode_full": {
        "depth": {"capacity": 0.25, "predictor": True},
        "moe": {"score": "sigmoid", "bias_update_rate": 0.01, "num_shared_experts": 1, "first_dense": 1},
    },
    "mode_tied": {"tie_embeddings": True, "depth": {"capacity": 0.5}, "moe": {"every": 2}},
    "dense_mod": {"moe": {"enabled": False}},
    "moe_only_mqa": {"num_kv_heads": 1, "depth": {"enabled": False}},
    "pretrained_features": {
        "attention_bias": "all",
        "qk_norm": "head",
        "head_dim": 12,
        "moe": {"num_shared_experts": 1, "shared_expert_gate": True},
    },
}
LAYOUTS = {"local": MegatronLayout(), "te": MegatronLayout(fused_norms=True), "te_grouped": MegatronLayout(True, True)}


def make_cfg(extra: dict) -> ModelConfig:
    base = {
        "vocab_size": 64,
        "dim": 32,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden": 48,
        "max_seq_len": 32,
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16},
    }
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return ModelConfig.model_validate(base)


def native_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MoDETransformer(cfg)
    with torch.no_grad():  # make every tensor distinct, buffers included
        for t in model.state_dict().values():
            t.add_(torch.randn_like(t) * 0.1)
    return model.state_dict()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(name, layout):
    cfg = make_cfg(CONFIGS[name])
    state = native_state(cfg)
    meg = native_to_megatron(state, cfg, LAYOUTS[layout])
    back = megatron_to_native(meg, cfg, LAYOUTS[layout])
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # The result loads into a fresh native model.
    MoDETransformer(cfg).load_state_dict(back)


def test_megatron_layout_names_and_packing():
    cfg = make_cfg(CONFIGS["mode_full"])
    state = native_state(cfg)
    local = native_to_megatron(state, cfg)
    # QKV grouped per KV head: [q0 q1 | k0 | v0 | q2 q3 | k1 | v1] blocks of head_dim rows.
    hd = cfg.to_args().head_dim
    q, k, v = (state[f"layers.0.attn.{n}.weight"] for n in ("wq", "wk", "wv"))
    qkv = local["decoder.layers.0.self_attention.linear_qkv.weight"]
    expected = torch.cat([q[: 2 * hd], k[:hd], v[:hd], q[2 * hd :], k[hd:], v[hd:]])
    assert torch.equal(qkv, expected)
    # SwiGLU: fc1 = [gate; up] = [w1; w3]; experts transposed from the stacked (E, D, F) layout.
    assert torch.equal(
        local["decoder.layers.0.mlp.linear_fc1.weight"],
        torch.cat([state["layers.0.mlp.w1.weight"], state["layers.0.mlp.w3.weight"]]),
    )
    e1 = local["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    assert torch.equal(
        e1, torch.cat([state["layers.1.mlp.experts.w1"][2].t(), state["layers.1.mlp.experts.w3"][2].t()])
    )
    assert torch.equal(
        local["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"], state["layers.1.mlp.experts.w2"][2].t()
    )
    assert torch.equal(local["decoder.layers.1.mlp.router.expert_bias"], state["layers.1.mlp.expert_bias"])
    assert torch.equal(
        local["decoder.layers.1.depth_router.predictor.2.bias"], state["layers.1.router.predictor.2.bias"]
    )
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in local
    assert "decoder.layers.0.input_layernorm.weight" in local and "output_layer.weight" in local

    te = native_to_megatron(state, cfg, LAYOUTS["te_grouped"])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te  # dense MLP: fused norm
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in te  # MoE layer: separate norm
    assert torch.equal(te["decoder.layers.1.mlp.experts.linear_fc1.weight2"], e1)
    assert not any(k.endswith(("input_layernorm.weight", "local_experts.0.linear_fc1.weight")) for k in te)


def test_tied_embeddings_have_no_output_layer():
    cfg = make_cfg(CONFIGS["mode_tied"])
    state = native_state(cfg)
    meg = native_to_megatron(state, cfg)
    assert "output_layer.weight" not in meg
    back = megatron_to_native(meg, cfg)
    assert back["output.weight"] is back["tok_embeddings.weight"]
    untied = dict(state, **{"output.weight": state["output.weight"] + 1})
    with pytest.raises(ValueError, match="tie_embeddings is set but output.weight differs"):
        native_to_megatron(untied, cfg)


def test_mismatches_are_one_line_errors():
    cfg = make_cfg(CONFIGS["dense_mod"])
    state = native_state(cfg)
    with pytest.raises(KeyError, match="native state dict has no 'layers.1.router.proj.weight'"):
        native_to_megatron({k: v for k, v in state.items() if k != "layers.1.router.proj.weight"}, cfg)
    with pytest.raises(KeyError, match="native key 'stray' has no Megatron counterpart"):
        native_to_megatron({**state, "stray": torch.zeros(1)}, cfg)
    meg = native_to_megatron(state, cfg)
    with pytest.raises(KeyError, match="Megatron key 'decoder.extra' has no native counterpart"):
        megatron_to_native({**meg, "decoder.extra": torch.zeros(1)}, cfg)
    # TE's FP8 metadata entries carry no weights and are skipped.
    assert (
        megatron_to_native({**meg, "decoder.layers.0.self_attention.linear_qkv._extra_state": None}, cfg).keys()
        == state.keys()
    )
    integrated = make_cfg({"depth": {"variant": "integrated", "noop_experts": 2}})
    with pytest.raises(ValueError, match="integrated MoDE"):
        native_to_megatron(native_state(integrated), integrated)


def test_load_into_megatron_tolerates_only_missing_extra_state():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2, bias=False)

        def get_extra_state(self):
            return None

        def set_extra_state(self, state):
            pass

    model = Tiny()
    load_into_megatron(model, {"linear.weight": torch.ones(2, 2)})  # "_extra_state" missing: fine
    assert torch.equal(model.linear.weight, torch.ones(2, 2))
    with pytest.raises(KeyError, match="disagree on 'linear.weight'"):
        load_into_megatron(model, {})
