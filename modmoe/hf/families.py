"""What a transformers ``config.json`` says about the architecture, in modmoe's words.

For the eight supported families (``SUPPORTED``), :func:`describe` turns the ``config.json`` of a
pretrained checkpoint into the ``model`` fields modmoe needs (the values of
:class:`~modmoe.model_config.ModelConfig`'s fields of the same name) plus the facts that are not
fields (the sliding window, the original context). A key missing from ``config.json`` takes
transformers' default for that family (the values of transformers 5.23's config classes, checked
against them by ``tests/unit/hf``), so a hub checkpoint written by an older transformers reads
the same as a new one. Both RoPE spellings are read: ``rope_theta`` + ``rope_scaling`` (hub
checkpoints) and ``rope_parameters`` (transformers 5).

Anything the model cannot compute exactly (an activation other than SiLU, MLP biases, clipped
q/k/v, RoPE types other than llama3 and linear, partial rotary, expert layer patterns modmoe's
``every``/``first_dense`` cannot express) is a ``ValueError`` naming the key and the value.

A leaf module: it imports nothing of modmoe, so the config layer may use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KB; a bigger one is not a model config

LLAMA, MISTRAL, QWEN2, QWEN3 = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
)
SUPPORTED = (LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)
MODEL_TYPES = {
    LLAMA: "llama",
    MISTRAL: "mistral",
    QWEN2: "qwen2",
    QWEN3: "qwen3",
    MIXTRAL: "mixtral",
    QWEN2_MOE: "qwen2_moe",
    QWEN3_MOE: "qwen3_moe",
    OLMOE: "olmoe",
}
MOE_FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)

# transformers 5.23's defaults of the keys read below, per family (None: derived, e.g.
# num_key_value_heads = num_attention_heads, head_dim = hidden_size / num_attention_heads).
_COMMON = {
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "num_key_value_heads": None,
    "head_dim": None,
    "attention_bias": False,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    LLAMA: {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
    },
    MISTRAL: {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    },
    QWEN2: {
        **_COMMON,
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    QWEN3: {
        **_COMMON,
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    MIXTRAL: {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    QWEN2_MOE: {
        **_COMMON,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
    },
    QWEN3_MOE: {
        **_COMMON,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    OLMOE: {
        **_COMMON,
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "sliding_window": None,
    },
}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class Pretrained:
    """The architecture a checkpoint's ``config.json`` describes."""

    architecture: str
    """One of :data:`SUPPORTED`."""
    model: dict[str, Any]
    """``model`` fields the checkpoint fixes (nested ``moe``; ``rope_scaling`` as a mapping)."""
    max_position_embeddings: int
    """The context the checkpoint was trained for."""
    sliding_window: int | None
    """Keys a token attends to in the layers with a sliding window (None: no layer has one)."""
    hf_config: dict[str, Any] = field(repr=False, default_factory=dict)
    """``config.json`` as read (what an export back to this architecture starts from)."""


def architecture_of(hf: dict[str, Any], where: str) -> str:
    """The supported architecture ``config.json`` names (``architectures``, else ``model_type``)."""
    names = hf.get("architectures")
    if isinstance(names, list) and names:
        name = names[0]
    else:
        by_type = {t: a for a, t in MODEL_TYPES.items()}
        name = by_type.get(hf.get("model_type"), f"model_type {hf.get('model_type')!r}")
    if name not in SUPPORTED:
        raise ValueError(f"{where}: architecture {name!r} is not supported (supported: {', '.join(SUPPORTED)})")
    return name


class _Reader:
    """``config.json`` keys with the family's defaults and typed, one-line errors."""

    def __init__(self, hf: dict[str, Any], architecture: str, where: str) -> None:
        self.hf, self.defaults, self.where = hf, DEFAULTS[architecture], where

    def get(self, key: str) -> Any:
        return self.hf[key] if key in self.hf else self.defaults.get(key)

    def int(self, key: str, minimum: int = 1) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{self.where}: {key} = {value!r}: expected an integer >= {minimum}")
        return value

    def number(self, key: str, value: Any = None) -> float:
        value = self.get(key) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{self.where}: {key} = {value!r}: expected a positive number")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ValueError(f"{self.where}: {key} = {value!r}: expected true or false")
        return value

    def refuse_unless(self, key: str, allowed: Any, why: str) -> None:
        value = self.get(key)
        if value != allowed:
            raise ValueError(f"{self.where}: {key} = {value!r} is not supported ({why})")


def _rope(r: _Reader) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling fields or None) from either spelling."""
    params = r.hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{r.where}: rope_parameters per layer type are not supported (one RoPE for every layer)")
    if isinstance(params, dict):
        theta = r.number("rope_parameters.rope_theta", params.get("rope_theta", r.get("rope_theta")))
        scaling = params
    else:
        theta = r.number("rope_theta")
        scaling = r.hf.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ValueError(f"{r.where}: rope_scaling = {scaling!r}: expected a mapping or null")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{r.where}: RoPE type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = scaling.get("partial_rotary_factor", r.hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{r.where}: partial_rotary_factor = {partial!r} is not supported (RoPE on every channel)")
    if rope_type == "default":
        return theta, None
    out: dict[str, Any] = {"rope_type": rope_type, "factor": r.number("rope factor", scaling.get("factor"))}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key in scaling:
                out[key] = r.number(key, scaling[key])
        if "original_max_position_embeddings" in scaling:
            out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return theta, out


def _sliding_window(r: _Reader, architecture: str, num_layers: int) -> int | None:
    """The window of the layers that have one (None: full attention everywhere)."""
    window = r.get("sliding_window")
    layer_types = r.hf.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        sliding = any(t == "sliding_attention" for t in layer_types)
    elif architecture in (QWEN2, QWEN3, QWEN2_MOE, QWEN3_MOE):
        sliding = r.flag("use_sliding_window") and r.int("max_window_layers", 0) < num_layers
    else:
        sliding = window is not None
    if not sliding or window in (None, 0):
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{r.where}: sliding_window = {window!r}: expected a positive integer or null")
    return window


def moe_layer_pattern(moe_layers: list[int], num_layers: int, where: str) -> tuple[int, int]:
    """(every, first_dense) giving exactly ``moe_layers`` among ``num_layers`` blocks."""
    first = moe_layers[0]
    every = moe_layers[1] - first if len(moe_layers) > 1 else max(1, num_layers - first)
    expected = [i for i in range(num_layers) if i >= first and (i - first) % every == 0]
    if expected != moe_layers:
        raise ValueError(
            f"{where}: experts in layers {moe_layers} do not follow one period (modmoe places them every "
            "model.moe.every blocks after model.moe.first_dense dense ones)"
        )
    return every, first


def _moe(r: _Reader, architecture: str, num_layers: int) -> dict[str, Any]:
    """The ``moe`` section of a mixture-of-experts family."""
    if architecture == MIXTRAL:
        num_experts, hidden, normalize = r.int("num_local_experts"), r.int("intermediate_size"), True
    else:
        key = "num_local_experts" if "num_local_experts" in r.hf and "num_experts" not in r.hf else "num_experts"
        num_experts, normalize = r.int(key), r.flag("norm_topk_prob")
        hidden = r.int("intermediate_size" if architecture == OLMOE else "moe_intermediate_size")
    moe: dict[str, Any] = {
        "enabled": True,
        "num_experts": num_experts,
        "top_k": r.int("num_experts_per_tok"),
        "expert_hidden": hidden,
        "score": "softmax",
        "normalize_top_k": normalize,
        "num_shared_experts": 0,
        "shared_expert_hidden": None,
        "shared_expert_gate": False,
        "every": 1,
        "first_dense": 0,
    }
    if moe["top_k"] > num_experts:
        raise ValueError(f"{r.where}: num_experts_per_tok = {moe['top_k']} is more than the {num_experts} experts")
    if architecture in (QWEN2_MOE, QWEN3_MOE):
        step, only_dense = r.int("decoder_sparse_step"), r.get("mlp_only_layers") or []
        if not isinstance(only_dense, list) or not all(isinstance(i, int) for i in only_dense):
            raise ValueError(f"{r.where}: mlp_only_layers = {only_dense!r}: expected a list of layer indices")
        layers = [i for i in range(num_layers) if i not in only_dense and (i + 1) % step == 0]
        if not layers:
            return {"enabled": False}
        moe["every"], moe["first_dense"] = moe_layer_pattern(layers, num_layers, r.where)
    if architecture == QWEN2_MOE:
        moe.update(
            num_shared_experts=1,
            shared_expert_hidden=r.int("shared_expert_intermediate_size"),
            shared_expert_gate=True,
        )
    return moe


def _attention_bias(r: _Reader, architecture: str) -> str:
    if architecture == QWEN2:
        return "qkv"
    if architecture == QWEN2_MOE:
        return "qkv" if r.flag("qkv_bias") else "none"
    if architecture in (MISTRAL, MIXTRAL):
        return "none"
    return "all" if r.flag("attention_bias") else "none"


def describe(hf: dict[str, Any], where: str) -> Pretrained:
    """The architecture ``hf`` (a ``config.json`` mapping) describes; ``where`` names the file in
    errors."""
    architecture = architecture_of(hf, where)
    r = _Reader(hf, architecture, where)
    r.refuse_unless("hidden_act", "silu", "modmoe's MLPs are SwiGLU")
    if architecture == LLAMA:
        r.refuse_unless("mlp_bias", False, "modmoe's MLPs have no biases")
    if architecture == OLMOE:
        r.refuse_unless("clip_qkv", None, "modmoe does not clip queries, keys and values")
    dim, heads, layers = r.int("hidden_size", 8), r.int("num_attention_heads"), r.int("num_hidden_layers")
    kv_heads = r.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else r.int("num_key_value_heads")
    head_dim = r.get("head_dim")
    head_dim = dim // heads if head_dim is None else r.int("head_dim", 2)
    if architecture in (QWEN2, QWEN2_MOE, OLMOE) and head_dim * heads != dim:
        raise ValueError(f"{where}: head_dim = {head_dim} must be hidden_size / num_attention_heads for {architecture}")
    theta, scaling = _rope(r)
    max_positions = r.int("max_position_embeddings")
    model: dict[str, Any] = {
        "vocab_size": r.int("vocab_size", 2),
        "dim": dim,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "ffn_hidden": r.int("intermediate_size"),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": r.number("rms_norm_eps"),
        "tie_embeddings": r.flag("tie_word_embeddings"),
        "attention_bias": _attention_bias(r, architecture),
        "qk_norm": {QWEN3: "head", QWEN3_MOE: "head", OLMOE: "full"}.get(architecture, "none"),
        "moe": _moe(r, architecture, layers) if architecture in MOE_FAMILIES else {"enabled": False},
        "hf_architecture": architecture,
    }
    return Pretrained(architecture, model, max_positions, _sliding_window(r, architecture, layers), hf)
