"""Small building blocks: rotary position embeddings (with pretrained models' frequency scaling)
and the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import RopeScaling


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(head_dim / 2,) float32: the rotation speed of each pair of channels."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths (beyond the original context / low_freq_factor) slow down by
    # ``factor``, short ones (below original / high_freq_factor) keep their speed, and the band
    # between blends the two linearly in the inverse wavelength.
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    blend = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * slowed / scaling.factor + blend * slowed
    in_band = (wavelength >= original / scaling.high_freq_factor) & (wavelength <= original / scaling.low_freq_factor)
    return torch.where(in_band, blended, slowed)


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """positions (...,) -> rotation angles (..., head_dim / 2), float32."""
    return positions.float()[..., None] * rope_inverse_frequencies(head_dim, theta, scaling, positions.device)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE, looked up by *original* token positions so that a routed
    block, which sees a gathered subsequence, rotates each token as in the full sequence."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        angles = rope_angles(torch.arange(max_seq_len), head_dim, theta, scaling)  # (S, hd/2)
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
    """x: (B, T, H, hd); cos/sin: (B, T, hd/2). Rotates the two halves of each head, in float32."""
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
