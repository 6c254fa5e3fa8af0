"""The rules that decide what a MoDE model computes, defined once.

- which blocks are depth-routed and which have experts (from ``every``/``offset``/``first_dense``);
- how many tokens of a sequence enter a staged routed block: ``k = ceil(capacity * T)``;
- how many no-op experts an integrated block adds to its router;
- the RoPE angle tables, looked up by a token's original position.

The training model (``modmoe.model``), the Megatron translation (``modmoe.engines.megatron``) and
the inference runtime (``modmoe.inference.core``) all call these functions. The file imports
only ``math`` and ``torch``, because ``modmoe export`` copies it into every exported directory
as ``modmoe_rules.py``, where the exported modeling code imports it without modmoe installed.
"""

from __future__ import annotations

import math

import torch


def is_routed(layer: int, enabled: bool, every: int, offset: int) -> bool:
    """Whether block ``layer`` has a depth router (staged or integrated)."""
    return enabled and layer % every == offset


def is_moe(layer: int, enabled: bool, every: int, first_dense: int) -> bool:
    """Whether block ``layer``'s MLP is a mixture of experts."""
    return enabled and layer >= first_dense and (layer - first_dense) % every == 0


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """k of top-k depth routing: the tokens of each ``seq_len``-token sequence that enter."""
    return max(1, math.ceil(capacity * seq_len))


def noop_experts_at(routed: bool, integrated: bool, moe: bool, noop_experts: int) -> int:
    """No-op experts in block's MoE router: only integrated MoDE blocks that are routed and MoE."""
    return noop_experts if routed and integrated and moe else 0


def rope_inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(head_dim / 2,) float32: the rotation speed of each pair of channels."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions (...,) -> rotation angles (..., head_dim / 2), float32."""
    return positions.float()[..., None] * rope_inverse_frequencies(head_dim, theta, positions.device)
