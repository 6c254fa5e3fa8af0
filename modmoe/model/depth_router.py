"""Mixture-of-Depths router: which tokens of each sequence enter a routed block.

Two routing modes share one output type:
- ``topk``: per sequence, the k tokens with the largest router logits (expert choice over the
  sequence). Static shapes: every sequence selects exactly k tokens.
- ``causal``: each token decides alone (sigmoid(logit) > 0.5, or the predictor), as generation
  must. Sequences select different counts, so selections are padded to the longest one and
  carry a ``valid`` mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modmoe.model.config import ModelConfig

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


class DepthRouter(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.depth
        self.capacity, self.weight_fn, self.causal_router = d.capacity, d.router_weight, d.causal_router
        self.bce_detach_input = d.bce_detach_input
        self.proj = nn.Linear(cfg.dim, 1, bias=False)
        self.predictor = (
            nn.Sequential(nn.Linear(cfg.dim, d.predictor_hidden), nn.SiLU(), nn.Linear(d.predictor_hidden, 1))
            if d.predictor
            else None
        )

    def forward(self, x: torch.Tensor, k: int, mode: RoutingMode) -> DepthSelection:
        """x: (B, T, D) residual stream entering the block."""
        B, T, _ = x.shape
        logits = self.proj(x).squeeze(-1).float()  # (B, T)
        topk_index = logits.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k)
        topk_mask = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, topk_index, True)
        target = topk_mask.float()
        # Detached: the membership loss moves the router's weight only, never the trunk below.
        bce_logits = self.proj(x.detach()).squeeze(-1).float() if self.bce_detach_input else logits  # (B, T)
        bce = F.binary_cross_entropy_with_logits(bce_logits, target)
        predictor_loss, predictor_logits = None, None
        if self.predictor is not None:
            # Stop-gradient: the predictor learns from the trunk without changing it.
            predictor_logits = self.predictor(x.detach()).squeeze(-1).float()  # (B, T)
            predictor_loss = F.binary_cross_entropy_with_logits(predictor_logits, target)
        decision_logits = predictor_logits if self.causal_router == "predictor" else logits
        causal_enter = decision_logits > 0  # sigmoid > 0.5

        if mode == "topk":
            index, valid = topk_index, None
        else:
            positions = torch.arange(T, device=x.device).expand(B, T)
            width = max(int(causal_enter.sum(1).max()), 1)
            # Entering tokens first (in position order), then the others as padding.
            ranked = torch.where(causal_enter, positions, positions + T).sort(dim=1).values[:, :width]
            valid, index = ranked < T, ranked % T  # (B, S)
        chosen = logits.gather(1, index)  # (B, S)
        weight = chosen.sigmoid() if self.weight_fn == "sigmoid" else chosen
        return DepthSelection(index, valid, weight, logits, topk_mask, causal_enter, bce, predictor_loss)
