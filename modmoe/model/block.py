"""A transformer block, optionally depth-routed (MoD) and/or with an MoE MLP.

Two ways to run it, the same computation:
- ``forward``: whole sequences with static shapes (training, the trainer's evaluation, the
  export's training mode): top-k routing, or causal routing with padded selections;
- ``forward_cached``: tokens appended to a ragged KV cache (generation), causal routing, only
  real tokens computed; a row in which no token enters a routed block does not touch it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from .args import ModelArgs
from .attention import Attention
from .depth_router import DepthRouter, DepthSelection, RoutingMode
from .kv_cache import LayerKV
from .layers import SwiGLU
from .moe import MoE, MoEAux
from .routing import apply_update, entering_first, gather_tokens, router_weight, scatter_tokens
from .trace import LayerTrace


@dataclass
class BlockAux:
    moe: MoEAux | None = None
    depth: DepthSelection | None = None


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_index: int) -> None:
        super().__init__()
        routed, use_moe = args.layer_kind(layer_index)
        self.layer_index = layer_index
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mlp = MoE(args, args.noop_experts_at(layer_index)) if use_moe else SwiGLU(args.dim, args.ffn_hidden)
        self.router = DepthRouter.from_args(args) if routed else None

    # ------------------------------------------------------------------ whole sequences
    def residual_update(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, MoEAux | None]:
        """f(x): what the block adds to the residual stream. x: (B, S, D)."""
        attn_out = self.attn(self.attn_norm(x), cos, sin, valid)
        hidden = self.mlp_norm(x + attn_out)
        if isinstance(self.mlp, MoE):
            mlp_out, moe_aux = self.mlp(hidden, valid)
        else:
            mlp_out, moe_aux = self.mlp(hidden), None
        return attn_out + mlp_out, moe_aux

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k: int,
        mode: RoutingMode,
        token_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BlockAux]:
        """x: (B, T, D); cos/sin: (B, T, hd/2) at the tokens' positions; k: tokens per sequence
        entering a routed block (top-k mode); token_valid: (B, T) bool, False for trailing padding."""
        if self.router is None:
            update, moe_aux = self.residual_update(x, cos, sin, None)
            return x + update, BlockAux(moe=moe_aux)

        with record_function("mod_router"):
            sel = self.router(x, k, mode, token_valid)
        with record_function("mod_gather_scatter"):
            x_sel = gather_tokens(x, sel.index)  # (B, S, D)
            cos_sel, sin_sel = gather_tokens(cos, sel.index), gather_tokens(sin, sel.index)  # (B, S, hd/2)
        update, moe_aux = self.residual_update(x_sel, cos_sel, sin_sel, sel.valid)
        with record_function("mod_gather_scatter"):
            # Padding slots point at skipping tokens: they are written back unchanged, and
            # skipped tokens are copied bit for bit; only the selected rows are replaced.
            out = scatter_tokens(x, sel.index, apply_update(x_sel, update, sel.weight, sel.valid))
        return out, BlockAux(moe=moe_aux, depth=sel)

    # ------------------------------------------------------------------ generation
    def residual_update_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        valid: torch.Tensor,
        cache: LayerKV,
        rows: torch.Tensor | None,
        trace: LayerTrace | None,
    ) -> torch.Tensor:
        """f(x) for x: (n, S, D) of cache ``rows`` whose first ``valid.sum(1)`` tokens per row
        are real; the MLP runs on the real tokens only."""
        n_valid = valid.sum(1)  # (n,)
        attn_out = self.attn.forward_cached(self.attn_norm(x), cos, sin, cache, rows, n_valid)
        hidden = self.mlp_norm(x + attn_out)
        all_valid = bool(valid.all())
        flat = hidden.reshape(-1, hidden.shape[-1]) if all_valid else hidden[valid]  # (N, D) real tokens only
        if isinstance(self.mlp, MoE):
            mlp_flat, slots = self.mlp.forward_tokens(flat)
        else:
            mlp_flat, slots = self.mlp(flat), 0
        mlp_out = (
            mlp_flat.view_as(hidden) if all_valid else hidden.new_zeros(hidden.shape).index_put((valid,), mlp_flat)
        )
        if trace is not None:
            cached = (cache.lengths if rows is None else cache.lengths[rows]) - n_valid  # keys held before
            trace.tokens += int(n_valid.sum())
            trace.attn_pairs += int((n_valid * cached + n_valid * (n_valid + 1) // 2).sum())
            trace.expert_slots += slots
        return attn_out + mlp_out

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        valid: torch.Tensor,
        cache: LayerKV,
        rule: str,
        seen: torch.Tensor,
        trace: LayerTrace | None,
    ) -> torch.Tensor:
        """x: (B, S, D) appended after what ``cache`` holds; valid: (B, S) bool, a prefix of each
        row; rule: the causal decision rule; seen: (B,) tokens each row had before these."""
        if self.router is None:
            return x + self.residual_update_cached(x, cos, sin, valid, cache, None, trace)
        logits = self.router.logits(x)  # (B, S) float32
        predictor_logits = self.router.predictor_logits(x) if rule == "predictor" else None
        enter = self.router.decide(logits, predictor_logits, rule, cache.scores, seen, valid) & valid
        if rule == "prefix_rank":
            cache.append_scores(logits, seen)
        if trace is not None:
            trace.router_tokens, trace.enter = int(valid.sum()), enter
            trace.predictor_tokens = trace.router_tokens if rule == "predictor" else 0
        rows = enter.any(1).nonzero().squeeze(1)  # (n,) rows in which a token enters
        if rows.numel() == 0:
            return x
        all_rows = rows.numel() == x.shape[0]
        index, sel_valid = entering_first(enter if all_rows else enter[rows])  # (n, W)
        xr, cos_r, sin_r = (x, cos, sin) if all_rows else (x[rows], cos[rows], sin[rows])
        x_sel = gather_tokens(xr, index)  # (n, W, D)
        update = self.residual_update_cached(
            x_sel,
            gather_tokens(cos_r, index),
            gather_tokens(sin_r, index),
            sel_valid,
            cache,
            None if all_rows else rows,
            trace,
        )
        weight = router_weight((logits if all_rows else logits[rows]).gather(1, index), self.router.weight_kind)
        out_rows = scatter_tokens(xr, index, apply_update(x_sel, update, weight, sel_valid))
        if all_rows:
            return out_rows
        out = x.clone()
        out[rows] = out_rows
        return out
