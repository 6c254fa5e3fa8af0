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

from .args import ModelArgs
from .routing import entering_first, membership, membership_bce, router_weight, topk_positions

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


class DepthRouter(nn.Module):
    """``r = w . x`` per token (``proj``) and the optional stop-gradient predictor MLP
    (``predictor.0``, ``predictor.2``)."""

    def __init__(
        self,
        dim: int,
        predictor_hidden: int | None = None,
        weight_kind: str = "raw",
        causal_router: str = "aux_loss",
        bce_detach_input: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight_kind, self.causal_router, self.bce_detach_input = weight_kind, causal_router, bce_detach_input
        self.proj = nn.Linear(dim, 1, bias=False, device=device, dtype=dtype)
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
            args.dim, d.predictor_hidden if d.predictor else None, d.router_weight, d.causal_router, d.bce_detach_input
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> router logits r (...), float32."""
        return self.proj(x.to(self.proj.weight.dtype)).squeeze(-1).float()

    def predictor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> predictor logits (...), float32, from the detached input: the
        predictor learns from the trunk without changing it."""
        return self.predictor(x.detach().to(self.predictor[0].weight.dtype)).squeeze(-1).float()

    def uses_predictor(self, causal_router: str | None = None) -> bool:
        """Whether causal decisions come from the predictor (``causal_router`` None: as trained)."""
        choice = causal_router or self.causal_router
        if choice not in ("aux_loss", "predictor"):
            raise ValueError(f"causal_router = {choice!r}: allowed aux_loss, predictor")
        if choice == "predictor" and self.predictor is None:
            raise ValueError(
                "causal_router = 'predictor': this model was trained without a predictor (depth.predictor = false)"
            )
        return choice == "predictor"

    def causal_decision(self, x: torch.Tensor, logits: torch.Tensor, use_predictor: bool) -> torch.Tensor:
        """(...) bool: the token enters (sigmoid > 0.5 of the router or of the predictor)."""
        decision = self.predictor_logits(x) if use_predictor else logits
        return decision > 0

    def forward(
        self, x: torch.Tensor, k: int, mode: RoutingMode, token_valid: torch.Tensor | None = None
    ) -> DepthSelection:
        """x: (B, T, D) residual stream entering the block; k: tokens per sequence under top-k;
        token_valid: (B, T) bool, False for padding, which is chosen only after every real token."""
        T = x.shape[1]
        logits = self.logits(x)  # (B, T)
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
        decision_logits = predictor_logits if self.causal_router == "predictor" else logits
        causal_enter = decision_logits > 0  # sigmoid > 0.5

        if mode == "topk":
            index, valid = topk_index, None
        else:
            index, valid = entering_first(causal_enter)  # (B, S)
        weight = router_weight(logits.gather(1, index), self.weight_kind)  # (B, S)
        return DepthSelection(
            index, valid, weight, logits, topk_mask, causal_enter, bce, predictor_loss, predictor_logits
        )
