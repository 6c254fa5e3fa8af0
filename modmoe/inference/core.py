"""MoDE inference with a ragged KV cache. Imports nothing but torch, the standard library and
the routing rules (``modmoe/model/rules.py``, itself torch-only).

The exporter copies this file verbatim into every exported directory as ``modmoe_core.py``, and
the rules beside it as ``modmoe_rules.py``; the transformers wrapper imports both from there,
modmoe's own runtime from the package. One implementation therefore serves both, and an
exported directory needs no modmoe install.

Semantics are those of the training model (``modmoe.model``) with ``routing="causal"``: in a
routed block every token decides alone whether to enter (``sigmoid(r) > 0.5``, or the
predictor MLP), and the tokens that enter attend among themselves at their original
positions. Generation follows from that: a routed block's KV cache holds only the tokens that
entered it, so every routed layer has its own cache length per sequence. Experts run dropless:
token dropping would make a token's output depend on the rest of its batch, which generation
cannot know. Parameter names and shapes equal the training model's, experts stacked ``(E, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # inside an exported directory, beside this file (transformers copies it along)
    from .modmoe_rules import capacity_tokens, is_moe, is_routed, noop_experts_at, rope_angles
except ImportError:  # inside modmoe
    from modmoe.model.rules import capacity_tokens, is_moe, is_routed, noop_experts_at, rope_angles

CORE_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DepthSpec:
    enabled: bool
    variant: str
    capacity: float
    every: int
    offset: int
    router_weight: str
    causal_router: str
    predictor: bool
    predictor_hidden: int
    noop_experts: int


@dataclass(frozen=True)
class MoESpec:
    enabled: bool
    num_experts: int
    top_k: int
    expert_hidden: int
    num_shared_experts: int
    score: str
    normalize_top_k: bool
    bias_update_rate: float
    every: int
    first_dense: int


_CHOICES = {
    "depth.variant": ("staged", "integrated"),
    "depth.router_weight": ("raw", "sigmoid"),
    "depth.causal_router": ("aux_loss", "predictor"),
    "moe.score": ("softmax", "sigmoid"),
}


@dataclass(frozen=True)
class CoreConfig:
    """The architecture, read from the training config's ``model`` section (a plain dict)."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    depth: DepthSpec
    moe: MoESpec

    @classmethod
    def from_dict(cls, model: dict[str, Any]) -> CoreConfig:
        """Raises ``ValueError`` naming the first missing or unsupported field."""

        def take(names: list[str], data: Any, prefix: str) -> dict[str, Any]:
            if not isinstance(data, dict):
                raise ValueError(f"model config field {prefix.rstrip('.') or 'model'} must be a mapping")
            missing = [n for n in names if n not in data]
            if missing:
                raise ValueError(f"model config is missing field {prefix}{missing[0]}")
            return {n: data[n] for n in names}

        def names(spec) -> list[str]:
            return [f.name for f in fields(spec)]

        top = take([n for n in names(cls) if n not in ("depth", "moe")], model, "")
        cfg = cls(
            **top,
            depth=DepthSpec(**take(names(DepthSpec), model.get("depth"), "depth.")),
            moe=MoESpec(**take(names(MoESpec), model.get("moe"), "moe.")),
        )
        for name, allowed in _CHOICES.items():
            section, key = name.split(".")
            value = getattr(getattr(cfg, section), key)
            if value not in allowed:
                raise ValueError(
                    f"model config field {name} = {value!r} is not supported (allowed: {', '.join(allowed)})"
                )
        if cfg.depth.causal_router == "predictor" and not cfg.depth.predictor:
            raise ValueError("model config field depth.causal_router = 'predictor' needs depth.predictor = true")
        return cfg

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def is_routed(self, i: int) -> bool:
        """Staged depth-routed block (a depth router decides which tokens enter)."""
        d = self.depth
        return d.variant == "staged" and is_routed(i, d.enabled, d.every, d.offset)

    def is_moe(self, i: int) -> bool:
        m = self.moe
        return is_moe(i, m.enabled, m.every, m.first_dense)

    def noop_experts_at(self, i: int) -> int:
        d = self.depth
        routed = is_routed(i, d.enabled, d.every, d.offset)
        return noop_experts_at(routed, d.variant == "integrated", self.is_moe(i), d.noop_experts)

    def topk_tokens(self, seq_len: int) -> int:
        """k of top-k routing over a sequence of ``seq_len`` tokens."""
        return capacity_tokens(self.depth.capacity, seq_len)


# --------------------------------------------------------------------------- cache
class LayerKV:
    """One layer's keys and values, ``(B, capacity, H_kv, hd)``, with a length per sequence."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)

    def _ensure(self, needed: int, like: torch.Tensor) -> None:
        cap = 0 if self.k is None else self.k.shape[1]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 16)  # doubling: amortized O(1) copies per token
        shape = (self.lengths.shape[0], new_cap, like.shape[2], like.shape[3])
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        if self.k is not None:
            k[:, :cap], v[:, :cap] = self.k, self.v
        self.k, self.v = k, v

    def append(
        self, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        """Writes ``k, v`` (n, S, H_kv, hd) of ``rows`` (None = all) after each row's cached
        tokens; only the first ``n_valid`` (n,) of each row count. Returns the lengths before."""
        n, S = k.shape[:2]
        base = self.lengths if rows is None else self.lengths[rows]  # (n,)
        self._ensure(int(base.max()) + S, k)
        row_idx = (torch.arange(n, device=k.device) if rows is None else rows)[:, None].expand(n, S)
        slot_idx = base[:, None] + torch.arange(S, device=k.device)  # (n, S)
        # Padding slots are written too (after the valid ones) and stay beyond the length, so
        # nothing ever reads them; the next append overwrites them.
        self.k[row_idx, slot_idx] = k
        self.v[row_idx, slot_idx] = v
        if rows is None:
            self.lengths = self.lengths + n_valid
        else:
            self.lengths = self.lengths.index_add(0, rows, n_valid)
        return base

    def read(self, rows: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``rows`` up to ``length`` slots: (n, length, H_kv, hd) each."""
        if rows is None:
            return self.k[:, :length], self.v[:, :length]
        return self.k[rows, :length], self.v[rows, :length]

    def select(self, rows: torch.Tensor) -> None:
        self.lengths = self.lengths[rows]
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class RaggedKVCache:
    """KV cache of a batch: one :class:`LayerKV` per block, and each sequence's position."""

    def __init__(self, num_layers: int, batch: int, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.layers = [LayerKV(batch, device) for _ in range(num_layers)]
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) tokens seen

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keeps (and reorders to) the sequences ``rows``: drops finished ones, or follows a
        beam reordering."""
        self.positions = self.positions[rows]
        for layer in self.layers:
            layer.select(rows)


# --------------------------------------------------------------------------- traces
@dataclass
class LayerTrace:
    """What one block executed in one call (useful work only: padding is left out)."""

    layer: int
    tokens: int  # tokens that ran the block (attention + MLP)
    attn_pairs: int  # (query, key) pairs of causal attention among them
    expert_slots: int  # token slots computed by real experts (MoE blocks)
    router_tokens: int  # tokens scored by the depth router (routed blocks)
    predictor_tokens: int  # tokens scored by the predictor MLP
    enter: torch.Tensor | None = None  # (B, S) bool causal decisions (routed blocks)
    topk: torch.Tensor | None = None  # (B, S) bool top-k membership (top-k forward only)


@dataclass
class Trace:
    layers: list[LayerTrace] = field(default_factory=list)
    lm_head_tokens: int = 0


# --------------------------------------------------------------------------- modules
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, hd); cos/sin: (B, S, hd/2). The training model's rotation, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs: (n, D) rows sorted by expert, ``counts[e]`` rows each -> (n, D). Experts with no
        rows are not touched (at decode most of them)."""
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                chunk = xs[start : start + count]  # (n_e, D)
                outs.append((F.silu(chunk @ self.w1[e]) * (chunk @ self.w3[e])) @ self.w2[e])
                start += count
        return torch.cat(outs) if outs else xs[:0]


class MoE(nn.Module):
    def __init__(self, cfg: CoreConfig, noop_experts: int) -> None:
        super().__init__()
        m = cfg.moe
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.score, self.normalize = m.score, m.normalize_top_k or m.score == "sigmoid"
        self.gate = nn.Linear(cfg.dim, m.num_experts + noop_experts, bias=False)
        self.experts = GroupedExperts(m.num_experts, cfg.dim, m.expert_hidden)
        self.shared = SwiGLU(cfg.dim, m.num_shared_experts * m.expert_hidden) if m.num_shared_experts else None
        if m.bias_update_rate > 0:  # auxiliary-loss-free balancing: the bias steers the choice
            self.register_buffer("expert_bias", torch.zeros(m.num_experts + noop_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x: (N, D) -> (N, D), and the number of slots computed by real experts."""
        K = self.top_k
        # Routing decisions are discrete: score in float32 whatever the weights' dtype.
        logits = F.linear(x.float(), self.gate.weight.float())  # (N, Et)
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        topk_experts = choice.topk(K, dim=-1).indices  # (N, K)
        topk_weights = scores.gather(1, topk_experts)
        if self.normalize:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        if x.shape[0] == 1:
            return self._one_token(x, topk_experts[0], topk_weights[0])
        # No-op experts (integrated MoDE) get the sentinel E and are not computed.
        sort_key = torch.where(topk_experts < self.num_experts, topk_experts, self.num_experts).flatten()  # (N*K,)
        counts = torch.bincount(sort_key, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        order = torch.argsort(sort_key, stable=True)[: sum(counts)]  # computed slots, by expert
        token_of_slot = order // K
        out = self.experts(x[token_of_slot], counts)  # (n, D)
        out = out * topk_weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, out)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, sum(counts)

    def _one_token(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Decode of one token: its K experts called directly (fewer ops than the sort and
        scatter above), summed in the same order, so the result is the same."""
        chosen = sorted((e, k) for k, e in enumerate(experts.tolist()) if e < self.num_experts)
        out = torch.zeros_like(x)
        w1, w3, w2 = self.experts.w1, self.experts.w3, self.experts.w2
        for e, k in chosen:
            out = out + ((F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]) * weights[k].to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, len(chosen)


class Attention(nn.Module):
    def __init__(self, cfg: CoreConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x, cos, sin, kv: LayerKV | None, rows: torch.Tensor | None, n_valid: torch.Tensor
    ) -> torch.Tensor:
        """x: (n, S, D) new tokens of ``rows`` (valid ones first, in position order); with
        ``kv`` they attend to the row's cached tokens too and are appended to the cache."""
        n, S, _ = x.shape
        q = apply_rotary(self.wq(x).view(n, S, -1, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(n, S, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(n, S, -1, self.head_dim)
        gqa = k.shape[2] != q.shape[2]
        if kv is None:  # a whole sequence: plain causal attention
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
            )
        else:
            base = kv.append(rows, k, v, n_valid)  # (n,) cached tokens before these
            keys, values = kv.read(rows, int(base.max()) + S)  # (n, L, H_kv, hd)
            L = keys.shape[1]
            if n == 1 and S == 1:  # one row's next token sees every key read: no mask needed
                mask = None
            else:
                # Query s of a row sees the row's cached keys and new keys up to itself. Valid
                # queries come first, so they never see a padding key; a padding query sees itself.
                limit = base[:, None] + torch.arange(S, device=x.device)  # (n, S)
                mask = (torch.arange(L, device=x.device) <= limit[..., None])[:, None]  # (n, 1, S, L)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=gqa
            )
        return self.wo(y.transpose(1, 2).reshape(n, S, -1))


class DepthRouter(nn.Module):
    def __init__(self, cfg: CoreConfig) -> None:
        super().__init__()
        d = cfg.depth
        self.proj = nn.Linear(cfg.dim, 1, bias=False)
        self.predictor = (
            nn.Sequential(nn.Linear(cfg.dim, d.predictor_hidden), nn.SiLU(), nn.Linear(d.predictor_hidden, 1))
            if d.predictor
            else None
        )

    def forward(self, x: torch.Tensor, use_predictor: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, S, D) -> router logits r (B, S) float32, causal decision (B, S) bool."""
        xf = x.float()  # decisions are discrete: float32 whatever the weights' dtype
        logits = F.linear(xf, self.proj.weight.float()).squeeze(-1)
        if not use_predictor:
            return logits, logits > 0  # sigmoid(r) > 0.5
        first, last = self.predictor[0], self.predictor[2]
        h = F.silu(F.linear(xf, first.weight.float(), first.bias.float()))
        decision = F.linear(h, last.weight.float(), last.bias.float()).squeeze(-1)
        return logits, decision > 0


class Block(nn.Module):
    def __init__(self, cfg: CoreConfig, i: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MoE(cfg, cfg.noop_experts_at(i)) if cfg.is_moe(i) else SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.router = DepthRouter(cfg) if cfg.is_routed(i) else None

    def update(self, x, cos, sin, valid, kv, rows, trace: LayerTrace | None) -> torch.Tensor:
        """f(x) for x: (n, S, D) whose first ``valid.sum(1)`` tokens per row are real."""
        n_valid = valid.sum(1)  # (n,)
        attn_out = self.attn(self.attn_norm(x), cos, sin, kv, rows, n_valid)
        hidden = self.mlp_norm(x + attn_out)
        all_valid = bool(valid.all())
        flat = hidden.reshape(-1, hidden.shape[-1]) if all_valid else hidden[valid]  # (N, D) real tokens only
        if isinstance(self.mlp, MoE):
            mlp_flat, slots = self.mlp(flat)
        else:
            mlp_flat, slots = self.mlp(flat), 0
        if all_valid:
            mlp_out = mlp_flat.view_as(hidden)
        else:
            mlp_out = hidden.new_zeros(hidden.shape).index_put((valid,), mlp_flat)
        if trace is not None:
            if kv is None:
                cached = torch.zeros_like(n_valid)
            else:  # keys each row held before these tokens were appended
                cached = (kv.lengths if rows is None else kv.lengths[rows]) - n_valid
            trace.tokens += int(n_valid.sum())
            trace.attn_pairs += int((n_valid * cached + n_valid * (n_valid + 1) // 2).sum())
            trace.expert_slots += slots
        return attn_out + mlp_out


# --------------------------------------------------------------------------- the decoder
class DecoderMixin:
    """The MoDE decoder over modules ``tok_embeddings``, ``layers``, ``norm``, ``output``.

    A mixin so that both a plain ``nn.Module`` (:class:`MoDEDecoder`) and the transformers
    ``PreTrainedModel`` own these parameters at the top level, under the training model's
    names."""

    core_cfg: CoreConfig

    def build_decoder(self, cfg: CoreConfig) -> None:
        self.core_cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int) -> RaggedKVCache:
        return RaggedKVCache(self.core_cfg.num_layers, batch, self.tok_embeddings.weight.device)

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, S) -> cos, sin (B, S, hd/2), float32, as the training model's tables."""
        cfg = self.core_cfg
        angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)  # (B, S, hd/2)
        return angles.cos(), angles.sin()

    def _use_predictor(self, causal_router: str | None) -> bool:
        choice = causal_router or self.core_cfg.depth.causal_router
        if choice not in ("aux_loss", "predictor"):
            raise ValueError(f"causal_router = {choice!r}: allowed aux_loss, predictor")
        if choice == "predictor" and not self.core_cfg.depth.predictor:
            raise ValueError(
                "causal_router = 'predictor': this model was trained without a predictor (depth.predictor = false)"
            )
        return choice == "predictor"

    @torch.no_grad()
    def run_tokens(
        self,
        tokens: torch.Tensor,
        cache: RaggedKVCache,
        valid: torch.Tensor | None = None,
        *,
        causal_router: str | None = None,
        last_only: bool = False,
        trace: Trace | None = None,
    ) -> torch.Tensor:
        """Causal routing. tokens: (B, S) appended after what ``cache`` holds (empty cache:
        prefill; S = 1: one decode step). valid: (B, S) bool, a prefix of each row (right
        padding), None = all. Returns logits (B, S, V), or (B, 1, V) at each row's last valid
        token with ``last_only``."""
        B, S = tokens.shape
        device = tokens.device
        valid = torch.ones(B, S, dtype=torch.bool, device=device) if valid is None else valid
        n_valid = valid.sum(1)  # (B,)
        positions = cache.positions[:, None] + torch.arange(S, device=device)  # (B, S)
        end = int((cache.positions + n_valid).max()) if B else 0
        if end > self.core_cfg.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens does not fit the context (model.max_seq_len = {self.core_cfg.max_seq_len})"
            )
        use_predictor = self._use_predictor(causal_router)
        cos, sin = self.rotary_tables(positions)
        x = self.tok_embeddings(tokens)  # (B, S, D)
        for i, block in enumerate(self.layers):
            lt = LayerTrace(i, 0, 0, 0, 0, 0) if trace is not None else None
            kv = cache.layers[i]
            if block.router is None:
                x = x + block.update(x, cos, sin, valid, kv, None, lt)
            else:
                logits, enter = block.router(x, use_predictor)
                enter = enter & valid
                if lt is not None:
                    lt.router_tokens, lt.enter = int(n_valid.sum()), enter
                    lt.predictor_tokens = lt.router_tokens if use_predictor else 0
                x = self._routed(block, x, cos, sin, logits, enter, kv, lt)
            if trace is not None:
                trace.layers.append(lt)
        cache.positions = cache.positions + n_valid
        if last_only:
            last = (n_valid - 1).clamp_min(0)[:, None, None].expand(-1, 1, x.shape[-1])
            x = x.gather(1, last)  # (B, 1, D)
        if trace is not None:
            trace.lm_head_tokens += B if last_only else int(n_valid.sum())
        return self.output(self.norm(x))

    def _routed(self, block: Block, x, cos, sin, logits, enter, kv: LayerKV | None, lt) -> torch.Tensor:
        """The tokens marked in ``enter`` (B, S) run the block; the rest pass unchanged. Rows in
        which no token enters are not touched at all (at decode: the whole block is skipped)."""
        S, D, half = x.shape[1], x.shape[2], cos.shape[-1]
        rows = enter.any(1).nonzero().squeeze(1)  # (n,)
        if rows.numel() == 0:
            return x
        e = enter[rows]  # (n, S)
        width = int(e.sum(1).max())
        ar = torch.arange(S, device=x.device)
        # Entering tokens first, in position order; the others fill the row up as padding.
        ranked = torch.where(e, ar, ar + S).sort(dim=1).values[:, :width]  # (n, W)
        sel_valid, index = ranked < S, ranked % S
        all_rows = rows.numel() == x.shape[0]
        xr = x if all_rows else x[rows]  # (n, S, D)
        gather_x = index[..., None].expand(-1, -1, D)
        gather_r = index[..., None].expand(-1, -1, half)
        x_sel = xr.gather(1, gather_x)  # (n, W, D)
        cos_r, sin_r = (cos, sin) if all_rows else (cos[rows], sin[rows])
        chosen = logits[rows].gather(1, index)  # (n, W)
        weight = chosen.sigmoid() if self.core_cfg.depth.router_weight == "sigmoid" else chosen
        update = block.update(
            x_sel, cos_r.gather(1, gather_r), sin_r.gather(1, gather_r), sel_valid, kv, None if all_rows else rows, lt
        )
        new_sel = x_sel + weight[..., None].to(x.dtype) * update
        new_sel = torch.where(sel_valid[..., None], new_sel, x_sel)
        out_rows = xr.scatter(1, gather_x, new_sel)
        if all_rows:
            return out_rows
        out = x.clone()
        out[rows] = out_rows
        return out

    @torch.no_grad()
    def run_topk(
        self, tokens: torch.Tensor, *, causal_router: str | None = None, trace: Trace | None = None
    ) -> torch.Tensor:
        """Whole sequences (B, T) under top-k routing (each routed block takes the
        k = ceil(capacity * T) tokens of each sequence with the largest router logits): the
        training forward, which looks at future tokens, so there is no cache. Returns (B, T, V).
        The trace records both the top-k choice and the causal decision of each routed block."""
        B, T = tokens.shape
        if self.core_cfg.max_seq_len < T:
            raise ValueError(
                f"sequence of {T} tokens does not fit the context (model.max_seq_len = {self.core_cfg.max_seq_len})"
            )
        use_predictor = self._use_predictor(causal_router)
        device = tokens.device
        cos, sin = self.rotary_tables(torch.arange(T, device=device).expand(B, T))
        k = self.core_cfg.topk_tokens(T)
        x = self.tok_embeddings(tokens)
        full = torch.ones(B, T, dtype=torch.bool, device=device)
        for i, block in enumerate(self.layers):
            lt = LayerTrace(i, 0, 0, 0, 0, 0) if trace is not None else None
            if block.router is None:
                x = x + block.update(x, cos, sin, full, None, None, lt)
            else:
                logits, enter = block.router(x, use_predictor)
                index = logits.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k)
                topk = torch.zeros(B, T, dtype=torch.bool, device=device).scatter_(1, index, True)
                if lt is not None:
                    lt.router_tokens, lt.enter, lt.topk = B * T, enter, topk
                    lt.predictor_tokens = B * T if use_predictor else 0
                x = self._routed(block, x, cos, sin, logits, topk, None, lt)
            if trace is not None:
                trace.layers.append(lt)
        if trace is not None:
            trace.lm_head_tokens += B * T
        return self.output(self.norm(x))


class MoDEDecoder(DecoderMixin, nn.Module):
    """The decoder as a plain module (modmoe's runtime)."""

    def __init__(self, cfg: CoreConfig) -> None:
        super().__init__()
        self.build_decoder(cfg)

    def forward(self, tokens: torch.Tensor, routing: str = "causal", causal_router: str | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) of whole sequences under ``causal`` or ``topk`` routing."""
        if routing == "topk":
            return self.run_topk(tokens, causal_router=causal_router)
        if routing != "causal":
            raise ValueError(f"routing = {routing!r}: allowed causal, topk")
        return self.run_tokens(tokens, self.new_cache(tokens.shape[0]), causal_router=causal_router)
