"""A transformer block, optionally depth-routed (MoD) and/or with an MoE MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from modmoe.model.attention import Attention
from modmoe.model.config import ModelConfig
from modmoe.model.depth_router import DepthRouter, DepthSelection, RoutingMode
from modmoe.model.layers import SwiGLU
from modmoe.model.moe import MoE, MoEAux


@dataclass
class BlockAux:
    moe: MoEAux | None = None
    depth: DepthSelection | None = None


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        routed, use_moe = cfg.layer_kind(layer_index)
        self.layer_index = layer_index
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MoE(cfg, cfg.noop_experts_at(layer_index)) if use_moe else SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.router = DepthRouter(cfg) if routed else None

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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: int, mode: RoutingMode
    ) -> tuple[torch.Tensor, BlockAux]:
        """x: (B, T, D); cos/sin: (B, T, hd/2) at the tokens' positions; k: tokens per sequence
        entering a routed block (top-k mode)."""
        if self.router is None:
            update, moe_aux = self.residual_update(x, cos, sin, None)
            return x + update, BlockAux(moe=moe_aux)

        with record_function("mod_router"):
            sel = self.router(x, k, mode)
        with record_function("mod_gather_scatter"):
            D, half = x.shape[-1], cos.shape[-1]
            gather_x = sel.index[..., None].expand(-1, -1, D)  # (B, S, D)
            gather_r = sel.index[..., None].expand(-1, -1, half)  # (B, S, hd/2)
            x_sel = x.gather(1, gather_x)  # (B, S, D)
            cos_sel, sin_sel = cos.gather(1, gather_r), sin.gather(1, gather_r)
        update, moe_aux = self.residual_update(x_sel, cos_sel, sin_sel, sel.valid)
        with record_function("mod_gather_scatter"):
            new_sel = x_sel + sel.weight[..., None].to(x.dtype) * update
            if sel.valid is not None:  # padding slots point at skipping tokens: write them back unchanged
                new_sel = torch.where(sel.valid[..., None], new_sel, x_sel)
            # Skipped tokens are copied bit for bit; only the selected rows are replaced.
            out = x.scatter(1, gather_x, new_sel)
        return out, BlockAux(moe=moe_aux, depth=sel)
