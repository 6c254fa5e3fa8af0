"""Grouped-query causal self-attention over scaled-dot-product attention, for whole sequences
(training, evaluation, a prefill without cache) and for tokens appended to a ragged KV cache
(generation). Optional q/k/v (and output) biases, and q/k RMSNorm per head (Qwen3) or over the
whole projection (OLMoE), so pretrained families load without a second attention class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .kv_cache import LayerKV
from .layers import apply_rotary


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        qkv_bias, out_bias = args.attention_bias in ("qkv", "all"), args.attention_bias == "all"
        q_width, kv_width = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q_width, bias=qkv_bias)
        self.wk = nn.Linear(args.dim, kv_width, bias=qkv_bias)
        self.wv = nn.Linear(args.dim, kv_width, bias=qkv_bias)
        self.wo = nn.Linear(q_width, args.dim, bias=out_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm != "none":
            norm_width = (args.head_dim, args.head_dim) if args.qk_norm == "head" else (q_width, kv_width)
            self.q_norm = nn.RMSNorm(norm_width[0], eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(norm_width[1], eps=args.norm_eps)

    def _heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: (B, S, D) -> queries (B, S, H, hd), keys and values (B, S, H_kv, hd), queries and
        keys rotated. Head counts come from the projections' outputs (-1), not the config: under
        tensor parallelism each rank holds num_heads / tp of them."""
        B, S, _ = x.shape
        queries, keys, values = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries, keys, values = (t.view(B, S, -1, self.head_dim) for t in (queries, keys, values))
        if self.qk_norm == "head":
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        return apply_rotary(queries, cos, sin), apply_rotary(keys, cos, sin), values

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole sequences. x: (B, S, D) tokens in increasing position order; cos/sin: (B, S,
        hd/2) at their original positions. key_valid: (B, S) bool for padded selections (None:
        all valid). Causality is by index, which equals causality by position because the
        tokens are sorted by position."""
        B, S, _ = x.shape
        queries, keys, values = (t.transpose(1, 2) for t in self._heads(x, cos, sin))  # (B, H, S, hd)
        gqa = keys.shape[1] != queries.shape[1]
        if key_valid is None:
            y = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            # A padded query still sees itself so that no softmax row is empty (its output
            # is discarded by the caller).
            mask = (causal & key_valid[:, None, :]) | torch.eye(S, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKV,
        rows: torch.Tensor | None,
        n_valid: torch.Tensor,
    ) -> torch.Tensor:
        """New tokens appended to a cache. x: (n, S, D) of cache ``rows`` (None: all rows), the
        first ``n_valid`` (n,) of each row real and in position order; they attend to the row's
        cached keys and to each other causally, and are written to the cache."""
        n, S, _ = x.shape
        queries, new_keys, new_values = self._heads(x, cos, sin)
        gqa = new_keys.shape[2] != queries.shape[2]
        before = cache.append(rows, new_keys, new_values, n_valid)  # (n,) cached keys before these
        keys, values = cache.read(rows, int(before.max()) + S)  # (n, L, H_kv, hd)
        L = keys.shape[1]
        if n == 1 and S == 1:  # one row's next token sees every key read: no mask needed
            mask = None
        else:
            # Query s of a row sees the row's cached keys and new keys up to itself. Valid
            # queries come first, so they never see a padding key; a padding query sees itself.
            limit = before[:, None] + torch.arange(S, device=x.device)  # (n, S)
            mask = (torch.arange(L, device=x.device) <= limit[..., None])[:, None]  # (n, 1, S, L)
        y = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=gqa
        )
        return self.wo(y.transpose(1, 2).reshape(n, S, -1))
