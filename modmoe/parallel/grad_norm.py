"""Gradient-norm clipping over parameters that may be DTensors on different meshes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def _mesh_key(t: torch.Tensor):
    return (id(t.device_mesh), t.placements) if isinstance(t, DTensor) else None


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Returns the global L2 norm of all gradients (over every shard on every rank) and, if
    ``max_norm`` is set, scales them so that it is at most ``max_norm``. Gradients are grouped
    by mesh and placement because one norm kernel cannot mix them; each group's norm is made
    whole (``full_tensor`` sums the squares of sharded parts) before the groups are combined."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    if max_norm is not None:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].device), foreach=True)
    return total
