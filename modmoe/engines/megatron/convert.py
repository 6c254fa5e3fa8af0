"""Native model state dict <-> Megatron-Core ``GPTModel`` state dict (unsharded, TP = EP = 1).

Both directions come from one table of rules built from the ``ModelConfig``, so they cannot
drift apart, and a round trip is bit-identical (only views, transposes and concatenations).

Megatron's layout, per layer ``i`` (``decoder.layers.{i}.``):

- ``self_attention.linear_qkv.weight``: ``[(H + 2*KV) * hd, D]``, grouped by KV head: for
  each group ``g`` its ``H/KV`` query heads, then key ``g``, then value ``g`` (the native model
  keeps separate ``wq``, ``wk``, ``wv``; query head ``j`` reads KV head ``j // (H/KV)`` in both);
  its ``bias`` (q/k/v biases, ``add_qkv_bias``) is grouped the same way. ``linear_proj.bias``
  (native ``wo.bias``, Llama's ``attention_bias``) and the per-head q/k RMSNorm weights
  ``q_layernorm.weight`` / ``k_layernorm.weight`` (``qk_layernorm``, Qwen3) are the native ones.
- ``linear_fc1.weight`` of a SwiGLU MLP (dense, shared expert, each expert): ``[2F, D]`` =
  ``[gate; up]`` = native ``[w1; w3]``; ``linear_fc2.weight`` = native ``w2``. Native experts
  are stacked ``(E, D, F)`` matrices used as ``x @ w``, so expert ``e`` transposes.
- experts: ``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`` (SequentialMLP, local or
  TE linears) or ``mlp.experts.linear_fc{1,2}.weight{e}`` (TE grouped GEMM); router
  ``mlp.router.weight [E, D]`` and, with aux-loss-free balancing, ``mlp.router.expert_bias``.
- norms: local specs have ``input_layernorm`` / ``pre_mlp_layernorm``; Transformer Engine
  fuses the attention norm into ``linear_qkv.layer_norm_weight`` and a dense MLP's norm into
  ``linear_fc1.layer_norm_weight`` (MoE layers keep ``pre_mlp_layernorm``).
- the depth router of a routed layer: ``depth_router.proj.weight`` and
  ``depth_router.predictor.{0,2}.{weight,bias}``, with ``prefix_rank`` the buffers
  ``depth_router.prior_quantiles`` and ``prior_updates`` (names as native ``router.*``).

Model level: ``embedding.word_embeddings.weight``, ``decoder.final_layernorm.weight``,
``output_layer.weight`` (absent with tied embeddings). Megatron's ``*._extra_state`` entries
(FP8 metadata of TE modules) carry no weights and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from modmoe.model_config import ModelConfig

Fn = Callable[..., tuple[Tensor, ...]]
RuleKind = Literal["same", "qkv", "gated", "experts"]


@dataclass(frozen=True)
class MegatronLayout:
    """Which Megatron module flavour the state dict is for."""

    fused_norms: bool = False  # Transformer Engine layers (LayerNormLinear)
    grouped_experts: bool = False  # TEGroupedMLP (moe grouped GEMM with TE)

    @classmethod
    def for_plan(cls, use_te: bool, grouped_gemm: bool) -> MegatronLayout:
        return cls(fused_norms=use_te, grouped_experts=use_te and grouped_gemm)


@dataclass(frozen=True)
class Rule:
    """How some native tensors become some Megatron tensors (unsharded) and back."""

    native: tuple[str, ...]
    megatron: tuple[str, ...]
    to_megatron: Fn
    to_native: Fn
    kind: RuleKind = "same"
    """How the Megatron tensors lie over the native ones, which tells a loader the part of the
    native tensors that a rank's slice of a Megatron tensor needs: ``same`` (one tensor, the same
    layout), ``qkv`` (query, key and value rows grouped by KV head), ``gated`` (``[gate; up]``
    rows), ``experts`` (per expert ``e``, ``[gate_e; up_e]`` then ``down_e``, from stacked
    ``(E, D, F)`` / ``(E, F, D)`` tensors). Every ``to_megatron`` takes any contiguous part of its
    inputs along those axes (KV groups, hidden rows, experts) and makes the same part of its outputs."""


def _same(*t: Tensor) -> tuple[Tensor, ...]:
    return t


def _rename(native: str, megatron: str) -> Rule:
    return Rule((native,), (megatron,), _same, _same)


def _qkv_rule(cfg: ModelConfig, native: str, megatron: str, part: str = "weight") -> Rule:
    """Weights ``[rows, D]`` or biases ``[rows]``; any whole number of KV groups (a rank's part)."""
    a = cfg.to_args()
    hd, per = a.head_dim, a.num_heads // a.num_kv_heads

    def pack(wq: Tensor, wk: Tensor, wv: Tensor) -> tuple[Tensor]:
        rest = wq.shape[1:]
        groups = wk.shape[0] // hd
        q = wq.reshape(groups, per, hd, *rest)  # query heads grouped by the KV head they read
        k, v = wk.reshape(groups, 1, hd, *rest), wv.reshape(groups, 1, hd, *rest)
        return (torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * hd, *rest),)

    def unpack(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rest = qkv.shape[1:]
        g = qkv.reshape(-1, per + 2, hd, *rest)
        return g[:, :per].reshape(-1, *rest), g[:, per].reshape(-1, *rest), g[:, per + 1].reshape(-1, *rest)

    names = tuple(f"{native}.{n}.{part}" for n in ("wq", "wk", "wv"))
    return Rule(names, (megatron,), pack, unpack, kind="qkv")


def _swiglu_rules(native: str, megatron: str) -> Iterator[Rule]:
    """A native SwiGLU module (w1, w3, w2 Linear layers) <-> Megatron MLP (linear_fc1/2)."""
    yield Rule(
        (f"{native}.w1.weight", f"{native}.w3.weight"),
        (f"{megatron}.linear_fc1.weight",),
        lambda w1, w3: (torch.cat([w1, w3], dim=0),),
        lambda fc1: tuple(fc1.chunk(2, dim=0)),
        kind="gated",
    )
    yield _rename(f"{native}.w2.weight", f"{megatron}.linear_fc2.weight")


def _expert_rule(native: str, megatron: str, num_experts: int, layout: MegatronLayout) -> Rule:
    E = num_experts
    if layout.grouped_experts:
        fc1 = tuple(f"{megatron}.linear_fc1.weight{e}" for e in range(E))
        fc2 = tuple(f"{megatron}.linear_fc2.weight{e}" for e in range(E))
    else:
        fc1 = tuple(f"{megatron}.local_experts.{e}.linear_fc1.weight" for e in range(E))
        fc2 = tuple(f"{megatron}.local_experts.{e}.linear_fc2.weight" for e in range(E))

    def pack(w1: Tensor, w3: Tensor, w2: Tensor) -> tuple[Tensor, ...]:
        # native (E, D, F) used as x @ w  ->  Megatron [2F, D] / [D, F] used as x @ w.T; any run
        # of experts (a rank's): the outputs are its fc1s, then its fc2s
        ups = tuple(torch.cat([w1[e].t(), w3[e].t()], dim=0) for e in range(w1.shape[0]))
        return ups + tuple(w2[e].t() for e in range(w2.shape[0]))

    def unpack(*mats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ups, downs = mats[: len(mats) // 2], mats[len(mats) // 2 :]
        w1 = torch.stack([u.chunk(2, dim=0)[0].t() for u in ups])
        w3 = torch.stack([u.chunk(2, dim=0)[1].t() for u in ups])
        return w1, w3, torch.stack([d.t() for d in downs])

    names = tuple(f"{native}.{n}" for n in ("w1", "w3", "w2"))
    return Rule(names, fc1 + fc2, pack, unpack, kind="experts")


def _layer_rules(cfg: ModelConfig, i: int, layout: MegatronLayout) -> Iterator[Rule]:
    n, m = f"layers.{i}", f"decoder.layers.{i}"
    routed, use_moe = cfg.to_args().layer_kind(i)
    attn_norm = (
        f"{m}.self_attention.linear_qkv.layer_norm_weight" if layout.fused_norms else f"{m}.input_layernorm.weight"
    )
    yield _rename(f"{n}.attn_norm.weight", attn_norm)
    yield _qkv_rule(cfg, f"{n}.attn", f"{m}.self_attention.linear_qkv.weight")
    if cfg.attention_bias != "none":
        yield _qkv_rule(cfg, f"{n}.attn", f"{m}.self_attention.linear_qkv.bias", part="bias")
    yield _rename(f"{n}.attn.wo.weight", f"{m}.self_attention.linear_proj.weight")
    if cfg.attention_bias == "all":
        yield _rename(f"{n}.attn.wo.bias", f"{m}.self_attention.linear_proj.bias")
    if cfg.qk_norm == "head":
        yield _rename(f"{n}.attn.q_norm.weight", f"{m}.self_attention.q_layernorm.weight")
        yield _rename(f"{n}.attn.k_norm.weight", f"{m}.self_attention.k_layernorm.weight")
    fused_mlp_norm = layout.fused_norms and not use_moe
    mlp_norm = f"{m}.mlp.linear_fc1.layer_norm_weight" if fused_mlp_norm else f"{m}.pre_mlp_layernorm.weight"
    yield _rename(f"{n}.mlp_norm.weight", mlp_norm)
    if use_moe:
        e = cfg.moe
        yield _rename(f"{n}.mlp.gate.weight", f"{m}.mlp.router.weight")
        if e.bias_update_rate > 0:
            yield _rename(f"{n}.mlp.expert_bias", f"{m}.mlp.router.expert_bias")
        yield _expert_rule(f"{n}.mlp.experts", f"{m}.mlp.experts", e.num_experts, layout)
        if e.num_shared_experts:
            yield from _swiglu_rules(f"{n}.mlp.shared", f"{m}.mlp.shared_experts")
            if e.shared_expert_gate:
                yield _rename(f"{n}.mlp.shared_gate.weight", f"{m}.mlp.shared_experts.gate_weight")
    else:
        yield from _swiglu_rules(f"{n}.mlp", f"{m}.mlp")
    if routed:
        yield _rename(f"{n}.router.proj.weight", f"{m}.depth_router.proj.weight")
        if cfg.depth.predictor:
            for part in ("0.weight", "0.bias", "2.weight", "2.bias"):
                yield _rename(f"{n}.router.predictor.{part}", f"{m}.depth_router.predictor.{part}")
        if cfg.depth.causal_router == "prefix_rank":  # the logit prior (buffers)
            for part in ("prior_quantiles", "prior_updates"):
                yield _rename(f"{n}.router.{part}", f"{m}.depth_router.{part}")


def _rules(cfg: ModelConfig, layout: MegatronLayout) -> list[Rule]:
    rules = [_rename("tok_embeddings.weight", "embedding.word_embeddings.weight")]
    for i in range(cfg.num_layers):
        rules.extend(_layer_rules(cfg, i, layout))
    rules.append(_rename("norm.weight", "decoder.final_layernorm.weight"))
    if not cfg.tie_embeddings:
        rules.append(_rename("output.weight", "output_layer.weight"))
    return rules


def conversion_rules(cfg: ModelConfig, layout: MegatronLayout | None = None) -> list[Rule]:
    """Every rule of the model, in model order (the tied output weight has none: it is the
    embedding)."""
    _check_supported(cfg)
    return _rules(cfg, layout or MegatronLayout())


def _check_supported(cfg: ModelConfig) -> None:
    if any(cfg.to_args().noop_experts_at(i) for i in range(cfg.num_layers)):
        raise ValueError("convert: integrated MoDE (no-op experts) has no Megatron counterpart")
    if cfg.qk_norm == "full":
        raise ValueError("convert: q/k RMSNorm over the whole projection (qk_norm 'full') has no Megatron counterpart")


def _apply(state: dict[str, Tensor], rules: list[Rule], forward: bool, what: str) -> tuple[dict[str, Tensor], set[str]]:
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        src, dst = (rule.native, rule.megatron) if forward else (rule.megatron, rule.native)
        missing = [k for k in src if k not in state]
        if missing:
            raise KeyError(f"convert: {what} state dict has no {missing[0]!r}")
        fn = rule.to_megatron if forward else rule.to_native
        for key, value in zip(dst, fn(*(state[k] for k in src)), strict=True):
            out[key] = value.contiguous().clone()
        used.update(src)
    return out, used


def native_to_megatron(
    state: dict[str, Tensor], cfg: ModelConfig, layout: MegatronLayout | None = None
) -> dict[str, Tensor]:
    """A native ``MoDETransformer`` state dict -> the ``GPTModel`` state dict (no ``_extra_state``);
    ``layout`` defaults to local modules."""
    _check_supported(cfg)
    out, used = _apply(state, _rules(cfg, layout or MegatronLayout()), True, "native")
    if cfg.tie_embeddings:
        if "output.weight" in state and not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            raise ValueError(
                "convert: model.tie_embeddings is set but output.weight differs from tok_embeddings.weight"
            )
        used.add("output.weight")
    extra = sorted(set(state) - used)
    if extra:
        raise KeyError(f"convert: native key {extra[0]!r} has no Megatron counterpart ({len(extra)} unmatched)")
    return out


def megatron_to_native(
    state: dict[str, Tensor], cfg: ModelConfig, layout: MegatronLayout | None = None
) -> dict[str, Tensor]:
    """A ``GPTModel`` state dict -> the native ``MoDETransformer`` state dict."""
    _check_supported(cfg)
    weights = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out, used = _apply(weights, _rules(cfg, layout or MegatronLayout()), False, "Megatron")
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    extra = sorted(set(weights) - used)
    if extra:
        raise KeyError(f"convert: Megatron key {extra[0]!r} has no native counterpart ({len(extra)} unmatched)")
    return out


def load_into_megatron(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """``load_state_dict`` that tolerates only missing ``_extra_state`` entries."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise KeyError(
            f"convert: Megatron model and state dict disagree on {first!r} "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)"
        )
