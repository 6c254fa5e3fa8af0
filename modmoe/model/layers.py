"""Small building blocks: rotary embeddings and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modmoe.model.rules import rope_angles


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE, looked up by *original* token positions so that a routed
    block, which sees a gathered subsequence, rotates each token as in the full sequence."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        angles = rope_angles(torch.arange(max_seq_len), head_dim, theta)  # (S, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, T) long -> cos, sin: (B, T, hd/2). ``max_position``: the largest
        position when the caller knows it (training: T - 1), which spares reading the tensor
        back from the device; otherwise the positions are checked on the host."""
        if max_position is None and positions.numel():
            max_position = int(positions.max())
        if max_position is not None and max_position >= self.cos.shape[0]:
            raise ValueError(f"position {max_position} >= model.max_seq_len ({self.cos.shape[0]})")
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd); cos/sin: (B, T, hd/2). Rotates the two halves of each head."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd/2)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
