"""Executed FLOPs of inference, from what the runtime actually ran (its :class:`Trace`).

The unit costs follow ``modmoe.model.flops`` (one multiply-add = 2 FLOPs; matmuls only:
projections, attention scores and values, MLPs and experts, routers, predictor, LM head), so
a whole-sequence prefill of a model without routed blocks counts exactly ``count_flops``'s
forward FLOPs times the tokens (a test holds them together). What differs is that the counts
come from the decisions made: a token that skips a routed block adds only the router's cost
there, and attention counts the keys each query really saw (a routed layer's cache holds only
the tokens that entered it).
"""

from __future__ import annotations

from dataclasses import dataclass

from modmoe.model import ModelArgs, ModelOutput, MoDETransformer
from modmoe.model.trace import LayerTrace, Trace


@dataclass(frozen=True)
class UnitCosts:
    attn_proj: float  # per token: q, k, v, o projections
    attn_pair: float  # per (query, key) pair: scores + weighted values, all heads
    dense_mlp: float  # per token: SwiGLU of blocks without experts
    expert_slot: float  # per token slot computed by one expert
    shared: float  # per token: shared experts
    depth_router: float  # per token scored by a depth router
    predictor: float  # per token scored by the predictor MLP
    lm_head: float  # per token whose logits are computed
    moe_router: dict[int, float]  # per token, by layer (no-op experts widen the gate)

    @classmethod
    def from_config(cls, cfg: ModelArgs) -> UnitCosts:
        D, hd, m, d = cfg.dim, cfg.head_dim, cfg.moe, cfg.depth
        return cls(
            attn_proj=2 * D * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads),
            attn_pair=2 * 2 * cfg.num_heads * hd,
            dense_mlp=3 * 2 * D * cfg.ffn_hidden,
            expert_slot=3 * 2 * D * m.expert_hidden,
            shared=3 * 2 * D * m.shared_hidden + (2 * D if m.shared_hidden and m.shared_expert_gate else 0),
            depth_router=2 * D,
            predictor=2 * D * d.predictor_hidden + 2 * d.predictor_hidden,
            lm_head=2 * D * cfg.vocab_size,
            moe_router={
                i: 2 * D * (m.num_experts + cfg.noop_experts_at(i)) for i in range(cfg.num_layers) if cfg.moe.is_moe(i)
            },
        )


def trace_flops(trace: Trace, cfg: ModelArgs) -> dict[str, float]:
    """Executed forward FLOPs by component (names as in ``modmoe.model.flops``)."""
    u = UnitCosts.from_config(cfg)
    out: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        if value:
            out[name] = out.get(name, 0.0) + value

    for lt in trace.layers:
        add("depth_router", lt.router_tokens * u.depth_router)
        add("depth_predictor", lt.predictor_tokens * u.predictor)
        add("attention_proj", lt.tokens * u.attn_proj)
        add("attention_core", lt.attn_pairs * u.attn_pair)
        if lt.layer in u.moe_router:
            add("moe_router", lt.tokens * u.moe_router[lt.layer])
            add("moe_experts", lt.expert_slots * u.expert_slot)
            add("moe_shared", lt.tokens * u.shared)
        else:
            add("mlp", lt.tokens * u.dense_mlp)
    add("lm_head", trace.lm_head_tokens * u.lm_head)
    return out


def trace_of_sequences(model: MoDETransformer, output: ModelOutput, seq_len: int, rule: str) -> Trace:
    """The :class:`Trace` of a whole-sequence forward (top-k routing, static shapes): what each
    block ran, from the routing details the model returns. ``enter`` is the causal decision
    ``rule`` makes for the same tokens, ``topk`` the top-k membership it is compared with."""
    trace = Trace()
    batch = output.logits.shape[0]
    for i, aux in enumerate(output.layers):
        layer = LayerTrace(i)
        n = seq_len
        if aux.depth is not None:
            sel = aux.depth
            n = sel.index.shape[1]
            layer.enter = model.layers[i].router.decide(sel.logits, sel.predictor_logits, rule)
            layer.topk = sel.topk_mask
            layer.router_tokens = batch * seq_len
            layer.predictor_tokens = layer.router_tokens if rule == "predictor" else 0
        layer.tokens = batch * n
        layer.attn_pairs = batch * n * (n + 1) // 2
        if aux.moe is not None:
            layer.expert_slots = int(aux.moe.dispatched_slots)
        trace.layers.append(layer)
    trace.lm_head_tokens = batch * seq_len
    return trace
