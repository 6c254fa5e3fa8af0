"""Executed-FLOPs accounting for any model config (DESIGN.md §1.4).

One multiply-add = 2 FLOPs. Counted: every matmul (projections, attention scores and values,
MLPs and experts, routers, predictor, LM head). Not counted: norms, softmax, RoPE, gathers,
embedding lookups (small next to the matmuls). Attention is causal: a query at index i
multiplies i+1 keys. A staged routed block runs its token-linear work on k = ceil(c*T) of T
tokens (factor k/T ~ c) and its attention among those k only (factor ~ c^2). MoE experts
count top_k slots per token (dropless; integrated no-op slots cost nothing, assuming balanced
routing). Training = 3 x forward (backward ~ 2 x forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import ModelArgs, as_args


@dataclass
class FlopsReport:
    seq_len: int
    per_component: dict[str, float] = field(default_factory=dict)  # forward FLOPs per token

    @property
    def forward_per_token(self) -> float:
        return sum(self.per_component.values())

    @property
    def training_per_token(self) -> float:
        return 3.0 * self.forward_per_token

    def add(self, name: str, flops: float) -> None:
        self.per_component[name] = self.per_component.get(name, 0.0) + flops


def _attention_core(cfg: ModelArgs, n: int) -> float:
    """Scores + weighted values for n causal tokens, all heads, summed over the n queries."""
    pairs = n * (n + 1) / 2
    return 2 * 2 * cfg.num_heads * cfg.head_dim * pairs


def count_flops(cfg: ModelArgs, seq_len: int) -> FlopsReport:
    """Forward FLOPs per token (averaged over a sequence of ``seq_len``) by component."""
    cfg = as_args(cfg)
    T, D, hd = seq_len, cfg.dim, cfg.head_dim
    report = FlopsReport(seq_len=T)
    attn_proj = 2 * D * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o + k, v
    m = cfg.moe
    for i in range(cfg.num_layers):
        routed, use_moe = cfg.layer_kind(i)
        n = cfg.entering_tokens(T) if routed else T  # tokens entering the block
        frac = n / T
        if routed:
            report.add("depth_router", 2 * D * (2 if cfg.depth.bce_detach_input else 1))  # + the BCE's own pass
            if cfg.depth.predictor:
                report.add("depth_predictor", 2 * D * cfg.depth.predictor_hidden + 2 * cfg.depth.predictor_hidden)
        report.add("attention_proj", frac * attn_proj)
        report.add("attention_core", _attention_core(cfg, n) / T)
        if use_moe:
            noop = cfg.noop_experts_at(i)
            real_share = m.num_experts / (m.num_experts + noop)
            report.add("moe_router", frac * 2 * D * (m.num_experts + noop))
            report.add("moe_experts", frac * m.top_k * real_share * 3 * 2 * D * m.expert_hidden)
            if m.shared_hidden:
                report.add("moe_shared", frac * (3 * 2 * D * m.shared_hidden + (2 * D if m.shared_expert_gate else 0)))
        else:
            report.add("mlp", frac * 3 * 2 * D * cfg.ffn_hidden)
    report.add("lm_head", 2 * D * cfg.vocab_size)
    return report


def theoretical_speedup(baseline: ModelArgs, candidate: ModelArgs, seq_len: int) -> float:
    """Training-FLOPs ratio baseline / candidate: the speedup the FLOPs predict."""
    return count_flops(baseline, seq_len).training_per_token / count_flops(candidate, seq_len).training_per_token


def _attention_extras(cfg: ModelArgs) -> int:
    """Parameters of one block's attention biases and q/k norms."""
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    biases = {"none": 0, "qkv": qkv, "all": qkv + cfg.dim}[cfg.attention_bias]
    norms = {"none": 0, "head": 2 * cfg.head_dim, "full": (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim}
    return biases + norms[cfg.qk_norm]


def parameter_counts(cfg: ModelArgs) -> dict[str, int]:
    """Total parameters, parameters active per token (top_k experts, no other experts), and
    the routed experts' parameters (what expert parallelism splits)."""
    cfg = as_args(cfg)
    D, hd, m = cfg.dim, cfg.head_dim, cfg.moe
    experts = 0
    total = active = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D  # embeddings, head, final norm
    for i in range(cfg.num_layers):
        routed, use_moe = cfg.layer_kind(i)
        common = D * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 2 * D + _attention_extras(cfg)
        if routed:
            common += D + (
                D * cfg.depth.predictor_hidden + 2 * cfg.depth.predictor_hidden + 1 if cfg.depth.predictor else 0
            )
        total, active = total + common, active + common
        if use_moe:
            expert = 3 * D * m.expert_hidden
            router = D * (m.num_experts + cfg.noop_experts_at(i))
            shared = 3 * D * m.shared_hidden + (D if m.shared_hidden and m.shared_expert_gate else 0)
            total += router + m.num_experts * expert + shared
            active += router + m.top_k * expert + shared
            experts += m.num_experts * expert
        else:
            total += 3 * D * cfg.ffn_hidden
            active += 3 * D * cfg.ffn_hidden
    return {"total": total, "active": active, "experts": experts}
