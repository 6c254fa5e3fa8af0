"""What generation executed, block by block: the records ``modmoe generate`` turns into FLOPs and
entry rates. The model fills them only when a caller passes a :class:`Trace`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerTrace:
    """What one block executed in one call (useful work only: padding is left out)."""

    layer: int
    tokens: int = 0  # tokens that ran the block (attention + MLP)
    attn_pairs: int = 0  # (query, key) pairs of causal attention among them
    expert_slots: int = 0  # (token, expert) slots computed by real experts (MoE blocks)
    router_tokens: int = 0  # tokens scored by the depth router (routed blocks)
    predictor_tokens: int = 0  # tokens scored by the predictor MLP
    enter: torch.Tensor | None = None  # (B, S) bool causal decisions (routed blocks)
    topk: torch.Tensor | None = None  # (B, S) bool top-k membership (top-k forward only)


@dataclass
class Trace:
    layers: list[LayerTrace] = field(default_factory=list)
    lm_head_tokens: int = 0
