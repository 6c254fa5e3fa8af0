"""Mixture-of-Depths router: which tokens of each sequence enter a routed block.

Two routing modes share one output type:
- ``topk``: per sequence, the k tokens with the largest router logits (expert choice over the
  sequence). Static shapes: every sequence selects exactly k tokens.
- ``causal``: each token decides alone (sigmoid(logit) > 0.5, or the predictor), as generation
  must. Sequences select different counts, so selections are padded to the longest one and
  carry a ``valid`` mask.

Routing decisions are discrete, so the router and the predictor return float32 logits, and they
take their input in their weights' dtype (the export keeps these weights in float32 while the rest
may be bf16). Both are called as modules, never through their weight tensors: ZeRO-3 and FSDP2
make a weight whole only around its own module's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .args import CAUSAL_ROUTERS, ModelArgs
from .routing import (
    PRIOR_QUANTILES,
    entering_first,
    membership,
    membership_bce,
    prefix_rank_enter,
    quantile_sums,
    router_weight,
    topk_positions,
)

PRIOR_MIN_WEIGHT = 0.05  # weight of the newest step in the prior's running quantiles (after the first steps)

RoutingMode = Literal["topk", "causal"]


@dataclass
class DepthSelection:
    index: torch.Tensor  # (B, S) long: positions of the selected tokens, increasing
    valid: torch.Tensor | None  # (B, S) bool, None when every slot is a real selection
    weight: torch.Tensor  # (B, S) what scales the block output of each selected token
    logits: torch.Tensor  # (B, T) router logits r
    topk_mask: torch.Tensor  # (B, T) bool: membership of the per-sequence top-k
    causal_enter: torch.Tensor  # (B, T) bool: the causal decision
    bce_loss: torch.Tensor  # () BCE of logits against top-k membership
    predictor_loss: torch.Tensor | None  # () BCE of the stop-gradient predictor
    predictor_logits: torch.Tensor | None = None  # (B, T) the predictor's logits, when it exists
    # (Q + 1,) the batch's per-row logit quantiles summed over rows, then the row count: what a
    # training step moves the prefix-rank prior toward (training with a prior only)
    quantile_sums: torch.Tensor | None = None


class DepthRouter(nn.Module):
    """``r = w . x`` per token (``proj``), the optional stop-gradient predictor MLP
    (``predictor.0``, ``predictor.2``), and for ``prefix_rank`` the running quantiles of the
    router logits seen in training (``prior_quantiles``, a buffer: the population prior)."""

    def __init__(
        self,
        dim: int,
        predictor_hidden: int | None = None,
        weight_kind: str = "raw",
        causal_router: str = "aux_loss",
        bce_detach_input: bool = False,
        capacity: float = 0.125,
        prior_tokens: float = 32.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight_kind, self.causal_router, self.bce_detach_input = weight_kind, causal_router, bce_detach_input
        self.capacity, self.prior_tokens = capacity, prior_tokens
        self.proj = nn.Linear(dim, 1, bias=False, device=device, dtype=dtype)
        if causal_router == "prefix_rank":
            self.register_buffer("prior_quantiles", torch.zeros(PRIOR_QUANTILES, device=device))
            self.register_buffer("prior_updates", torch.zeros((), device=device))
        else:
            self.prior_quantiles = self.prior_updates = None
        self.predictor = None
        if predictor_hidden is not None:
            self.predictor = nn.Sequential(
                nn.Linear(dim, predictor_hidden, device=device, dtype=dtype),
                nn.SiLU(),
                nn.Linear(predictor_hidden, 1, device=device, dtype=dtype),
            )

    @classmethod
    def from_args(cls, args: ModelArgs) -> DepthRouter:
        d = args.depth
        return cls(
            args.dim,
            d.predictor_hidden if d.predictor else None,
            d.router_weight,
            d.causal_router,
            d.bce_detach_input,
            d.capacity,
            d.prefix_prior_tokens,
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> router logits r (...), float32."""
        return self.proj(x.to(self.proj.weight.dtype)).squeeze(-1).float()

    def predictor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> predictor logits (...), float32, from the detached input: the
        predictor learns from the trunk without changing it."""
        return self.predictor(x.detach().to(self.predictor[0].weight.dtype)).squeeze(-1).float()

    def causal_rule(self, causal_router: str | None = None) -> str:
        """The rule causal decisions follow (``causal_router`` None: the one the model was trained
        for); a rule the model lacks the parts for is a ``ValueError``."""
        rule = causal_router or self.causal_router
        if rule not in CAUSAL_ROUTERS:
            raise ValueError(f"causal_router = {rule!r}: allowed {', '.join(CAUSAL_ROUTERS)}")
        if rule == "predictor" and self.predictor is None:
            raise ValueError(
                "causal_router = 'predictor': this model was trained without a predictor (depth.predictor = false)"
            )
        if rule == "prefix_rank" and self.prior_quantiles is None:
            raise ValueError(
                "causal_router = 'prefix_rank': this model was trained without its logit prior "
                "(train it with depth.causal_router = prefix_rank)"
            )
        return rule

    @torch.no_grad()
    def observe(self, sums: torch.Tensor) -> None:
        """After an applied optimizer step: moves the population prior toward the step's mean
        per-row logit quantiles, from ``quantile_sums`` added up over its micro-batches and ranks
        (Q + 1,). The caller skips held-back steps, so a non-finite batch never reaches the prior."""
        if self.prior_quantiles is None or float(sums[-1]) == 0:
            return
        points = (sums[:-1] / sums[-1]).to(self.prior_quantiles)  # (Q,)
        if not bool(torch.isfinite(points).all()):
            return  # a non-finite step someone chose to apply still leaves the prior usable
        weight = (1.0 / (self.prior_updates + 1)).clamp_min(PRIOR_MIN_WEIGHT)
        self.prior_quantiles.lerp_(points, weight)
        self.prior_updates += 1

    def decide(
        self,
        logits: torch.Tensor,
        predictor_logits: torch.Tensor | None,
        rule: str,
        history: torch.Tensor | None = None,
        history_len: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, S) bool: the causal decision of ``rule`` for tokens with router ``logits`` (B, S);
        ``history``/``history_len``: the row's earlier logits, which ``prefix_rank`` ranks against."""
        if rule == "predictor":
            return predictor_logits > 0
        if rule == "prefix_rank":
            return prefix_rank_enter(
                logits, self.capacity, self.prior_quantiles, self.prior_tokens, history, history_len, valid
            )
        return logits > 0  # sigmoid(r) > 0.5

    def forward(
        self, x: torch.Tensor, k: int, mode: RoutingMode, token_valid: torch.Tensor | None = None
    ) -> DepthSelection:
        """x: (B, T, D) residual stream entering the block; k: tokens per sequence under top-k;
        token_valid: (B, T) bool, False for padding, which is chosen only after every real token."""
        T = x.shape[1]
        logits = self.logits(x)  # (B, T)
        sums = None
        if self.training and self.prior_quantiles is not None:
            sums = quantile_sums(logits, token_valid, self.prior_quantiles.numel())  # (Q + 1,)
        ranked = logits if token_valid is None else logits.masked_fill(~token_valid, float("-inf"))
        topk_index = topk_positions(ranked, k)  # (B, k)
        topk_mask = membership(topk_index, T)
        # Detached: the membership loss moves the router's weight only, never the trunk below.
        bce_logits = self.logits(x.detach()) if self.bce_detach_input else logits  # (B, T)
        bce = membership_bce(bce_logits, topk_mask)
        predictor_loss, predictor_logits = None, None
        if self.predictor is not None:
            predictor_logits = self.predictor_logits(x)  # (B, T)
            predictor_loss = membership_bce(predictor_logits, topk_mask)
        causal_enter = self.decide(logits, predictor_logits, self.causal_router, valid=token_valid)  # (B, T)

        if mode == "topk":
            index, valid = topk_index, None
        else:
            index, valid = entering_first(causal_enter)  # (B, S)
        weight = router_weight(logits.gather(1, index), self.weight_kind)  # (B, S)
        return DepthSelection(
            index, valid, weight, logits, topk_mask, causal_enter, bce, predictor_loss, predictor_logits, sums
        )
