"""The stock transformers architectures a model can be written as, and their ``config.json``.

``modmoe export --standard`` writes a model in an architecture that transformers, vLLM, SGLang
and llama.cpp's converter know, without remote code. :func:`unfit` says why an architecture
cannot express a model (None: it can), :func:`choose` picks the architecture (the one the model
was imported as when it still fits, else Llama / Qwen3 / Qwen2 for a dense model and Mixtral /
Qwen3-MoE / Qwen2-MoE / OLMoE for experts), and :func:`stock_config` writes its ``config.json``
from the model fields, keeping the rest of the imported ``config.json`` (token ids, sliding window,
...) when the architecture is the imported one.
"""

from __future__ import annotations

from typing import Any

from modmoe.hf.families import (
    LLAMA,
    MISTRAL,
    MIXTRAL,
    MODEL_TYPES,
    OLMOE,
    QWEN2,
    QWEN2_MOE,
    QWEN3,
    QWEN3_MOE,
)
from modmoe.model.args import ModelArgs

DENSE_FALLBACKS = (LLAMA, QWEN3, QWEN2)
MOE_FALLBACKS = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE)
_QK_NORM = {QWEN3: "head", QWEN3_MOE: "head", OLMOE: "full"}
_BIASES = {
    LLAMA: ("none", "all"),
    MISTRAL: ("none",),
    QWEN2: ("qkv",),
    QWEN3: ("none", "all"),
    MIXTRAL: ("none",),
    QWEN2_MOE: ("none", "qkv"),
    QWEN3_MOE: ("none", "all"),
    OLMOE: ("none", "all"),
}
# Families whose attention derives head_dim from hidden_size / num_attention_heads.
_NO_HEAD_DIM = (QWEN2, QWEN2_MOE, OLMOE)
# Families with experts in every layer (no dense-layer key).
_ALL_LAYERS_MOE = (MIXTRAL, OLMOE)


def moe_layers(args: ModelArgs) -> list[int]:
    return [i for i in range(args.num_layers) if args.moe.is_moe(i)]


def unfit(architecture: str, args: ModelArgs) -> str | None:
    """Why ``architecture`` cannot express ``args`` (None: it can)."""
    m = args.moe
    if args.depth.enabled:
        return "it has depth routing (a MoDE model), which no stock architecture has"
    if m.enabled and (m.score != "softmax" or m.bias_update_rate > 0):
        return "its experts are chosen by sigmoid scores or an expert bias, which stock MoE routers do not have"
    if (architecture in (LLAMA, MISTRAL, QWEN2, QWEN3)) == m.enabled:
        return f"{architecture} {'has no experts' if m.enabled else 'needs experts'}"
    if _QK_NORM.get(architecture, "none") != args.qk_norm:
        return f"model.qk_norm = {args.qk_norm!r}, {architecture} has {_QK_NORM.get(architecture, 'none')!r}"
    if args.attention_bias not in _BIASES[architecture]:
        return (
            f"model.attention_bias = {args.attention_bias!r}, {architecture} takes {' or '.join(_BIASES[architecture])}"
        )
    if architecture in _NO_HEAD_DIM and args.head_dim * args.num_heads != args.dim:
        return f"{architecture} needs head_dim = dim / num_heads"
    if not m.enabled:
        return None
    if architecture in _ALL_LAYERS_MOE and len(moe_layers(args)) != args.num_layers:
        return f"{architecture} has experts in every layer"
    if (architecture == QWEN2_MOE) != bool(m.shared_hidden and m.shared_expert_gate):
        return "shared experts (with a sigmoid gate) exist in Qwen2-MoE only, and it always has them"
    if architecture == MIXTRAL and not m.normalize_top_k:
        return "Mixtral always normalizes the top-k weights (model.moe.normalize_top_k = false)"
    return None


def choose(args: ModelArgs, imported: str | None) -> tuple[str | None, str]:
    """(the architecture to write or None, the reason the preferred one does not fit or '')."""
    fallbacks = MOE_FALLBACKS if args.moe.enabled else DENSE_FALLBACKS
    candidates = ([imported] if imported else []) + [a for a in fallbacks if a != imported]
    first_reason = ""
    for architecture in candidates:
        reason = unfit(architecture, args)
        if reason is None:
            return architecture, first_reason
        first_reason = first_reason or f"{architecture}: {reason}"
    return None, first_reason


# Keys of a config.json that describe the architecture: rewritten from the model, never copied.
_REWRITTEN = (
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "auto_map",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "qkv_bias",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "clip_qkv",
)


def _rope_scaling(args: ModelArgs) -> dict[str, Any] | None:
    s = args.rope_scaling
    if s is None:
        return None
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {
        "rope_type": "llama3",
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
    }


def stock_config(
    architecture: str, args: ModelArgs, base: dict[str, Any] | None, dtype: str, token_ids: dict[str, Any]
) -> dict[str, Any]:
    """``config.json`` of ``architecture`` for ``args``. ``base``: the imported ``config.json``
    (kept except for the architecture keys) when writing the imported architecture; ``token_ids``:
    the bos/eos/pad ids of the tokenizer shipped with it."""
    out = {k: v for k, v in (base or {}).items() if k not in _REWRITTEN}
    out.update(token_ids)
    out.setdefault("max_position_embeddings", args.max_seq_len)
    m = args.moe
    out.update(
        architectures=[architecture],
        model_type=MODEL_TYPES[architecture],
        dtype=dtype,
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        hidden_act="silu",
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings,
        rope_theta=args.rope_theta,
        rope_scaling=_rope_scaling(args),
        intermediate_size=args.ffn_hidden,
    )
    if architecture not in _NO_HEAD_DIM:
        out["head_dim"] = args.head_dim
    if architecture in (LLAMA, QWEN3, QWEN3_MOE, OLMOE):
        out["attention_bias"] = args.attention_bias == "all"
    if architecture == LLAMA:
        out["mlp_bias"] = False
    if architecture == QWEN2_MOE:
        out["qkv_bias"] = args.attention_bias == "qkv"
    if architecture == OLMOE:
        out["clip_qkv"] = None
    if not m.enabled:
        return out
    out.update(num_experts_per_tok=m.top_k)
    if architecture in _ALL_LAYERS_MOE:
        out["intermediate_size"] = m.expert_hidden
    if architecture == MIXTRAL:
        out["num_local_experts"] = m.num_experts
    else:
        out.update(num_experts=m.num_experts, norm_topk_prob=m.normalize_top_k)
    if architecture in (QWEN2_MOE, QWEN3_MOE):
        layers = moe_layers(args)
        out.update(
            moe_intermediate_size=m.expert_hidden,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(args.num_layers) if i not in layers],
        )
    if architecture == QWEN2_MOE:
        out["shared_expert_intermediate_size"] = m.shared_hidden
    return out
