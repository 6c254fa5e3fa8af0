"""Grouped-query causal self-attention over scaled-dot-product attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modmoe.model.config import ModelConfig
from modmoe.model.layers import apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, S, D) tokens in increasing position order; cos/sin: (B, S, hd/2) at their
        original positions. key_valid: (B, S) bool for padded selections (None: all valid).
        Causality is by index, which equals causality by position because the tokens are
        sorted by position."""
        B, S, _ = x.shape
        # Head counts come from the projections' outputs (-1), not the config: under tensor
        # parallelism each rank holds num_heads / tp of them.
        q = apply_rotary(self.wq(x).view(B, S, -1, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(B, S, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        gqa = k.shape[1] != q.shape[1]
        if key_valid is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            # A padded query still sees itself so that no softmax row is empty (its output
            # is discarded by the caller).
            mask = (causal & key_valid[:, None, :]) | torch.eye(S, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))
