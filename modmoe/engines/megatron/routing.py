"""Depth routing (MoD) on Megatron's ``[s, b, h]`` layout, as pure functions.

Semantics are those of ``modmoe.model.block.TransformerBlock`` in top-k mode: per sequence
(column ``b``) the ``k = ceil(capacity * s)`` tokens with the largest router logits enter the
layer, in position order, keeping their original positions for RoPE; the layer's residual
update ``f`` is scaled by the router weight ``r`` and added (``x + r * f(x)``); every other
token is copied bit for bit.

Sequence parallelism (SP). Under SP each of the ``W`` tensor-parallel ranks holds the
contiguous slice ``[w*s/W, (w+1)*s/W)`` of every sequence, and the inner layer expects the
same layout for its own (routed) sequence of ``k`` tokens. Top-k is taken as follows:

1. Each rank computes the logits of its own tokens ``[s/W, b]`` and all-gathers them (one
   float per token, no gradient): every rank holds the same ``[s, b]`` logits and takes the
   same global per-sequence top-k, so the result equals the non-SP one exactly.
2. The routed sequence (chosen tokens in position order) is split like any SP sequence: rank
   ``w`` runs routed rows ``[w*k/W, (w+1)*k/W)``. To fill them, each rank packs its own chosen
   tokens (at most ``m = min(k, s/W)`` per sequence, a static bound) into ``[m, b, h]``; the
   packs are all-gathered to ``[W*m, b, h]`` and each rank takes its rows from there.
3. The inner layer's updates for the local rows ``[k/W, b, h]`` are all-gathered to
   ``[k, b, h]``; each rank applies ``x + r * f`` to the chosen tokens it owns, with its own
   router weights, so the router's gradient stays local (Megatron then all-reduces the
   router's weight gradient over TP like any sequence-parallel norm weight).

Both all-gathers are differentiable (their backward is a reduce-scatter). Without SP (``group``
is None) the same code runs with ``W = 1`` and no communication. ``k`` must be a multiple of
``W`` (checked by the config translation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from modmoe.model.routing import apply_update, gather_tokens, membership, scatter_tokens, topk_positions


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: [s, b, *rest], index: [n, b] -> [n, b, *rest] (row ``index[i, j]`` of column ``j``)."""
    return gather_tokens(x, index, token_dim=0)


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0; backward: each rank's slice of the summed gradient (reduce-scatter).
    torch.distributed.nn's all_gather emulates that backward on gloo with a scatter addressed by
    group rank as if it were a global rank, which fails in any group without global rank 0."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.new_empty(x.shape[0] * dist.get_world_size(group), *x.shape[1:])
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty(grad.shape[0] // world, *grad.shape[1:])
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_seq(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenates every rank's ``x`` along dim 0; differentiable (backward: reduce-scatter)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherSeq.apply(x, group)


def all_gather_logits(logits: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """[s/W, b] -> [s, b], detached: the top-k choice itself carries no gradient."""
    if group is None or dist.get_world_size(group) == 1:
        return logits.detach()
    world = dist.get_world_size(group)
    out = logits.new_empty(logits.shape[0] * world, *logits.shape[1:])
    dist.all_gather_into_tensor(out, logits.detach().contiguous(), group=group)
    return out


@dataclass
class RoutedRows:
    """Where one rank's routed tokens come from and go back to (see the module docstring).

    ``index``/``mask`` describe whole sequences and are the same on every rank; the rest is
    this rank's part. With ``world = 1``: pack = index, rows = 0..k-1."""

    index: Tensor  # [k, b] long: positions of the routed tokens, increasing (global)
    mask: Tensor  # [s, b] bool: top-k membership (global)
    pack: Tensor  # [m, b] long: local positions, this rank's chosen tokens first (position order)
    pack_valid: Tensor  # [m, b] bool: pack row is a chosen token (the rest is padding)
    pack_row: Tensor  # [m, b] long: routed row of each pack row (clamped for padding rows)
    source: Tensor  # [k/W, b] long: row of the all-gathered packs [W*m] holding each local row
    rank: int
    world: int

    @property
    def local_rows(self) -> int:
        """s/W: tokens of each sequence held by this rank."""
        return self.mask.shape[0] // self.world

    @property
    def local_mask(self) -> Tensor:
        """[s/W, b] bool: membership of this rank's own tokens."""
        n = self.local_rows
        return self.mask[self.rank * n : (self.rank + 1) * n]

    @property
    def local_index(self) -> Tensor:
        """[k/W, b]: global positions of the routed rows this rank runs (for RoPE, masks)."""
        k_local = self.index.shape[0] // self.world
        return self.index[self.rank * k_local : (self.rank + 1) * k_local]


def plan_routed_rows(logits: Tensor, k: int, rank: int = 0, world: int = 1) -> RoutedRows:
    """logits: [s, b] of whole sequences (all ranks' slices in rank order) -> RoutedRows."""
    s, b = logits.shape
    if s % world or k % world or not 1 <= k <= s:
        raise ValueError(f"routing: s = {s} and k = {k} must be multiples of the SP world size {world}, 1 <= k <= s")
    s_local, k_local, m = s // world, k // world, min(k, s // world)
    dev = logits.device
    index = topk_positions(logits, k, token_dim=0)  # [k, b]
    mask = membership(index, s, token_dim=0)
    counts = mask.view(world, s_local, b).sum(1)  # [W, b] chosen tokens in each rank's slice
    first_row = counts.cumsum(0) - counts  # [W, b] routed row of each slice's first chosen token

    own = mask[rank * s_local : (rank + 1) * s_local]  # [s/W, b]
    pos = torch.arange(s_local, device=dev)[:, None].expand(s_local, b)
    ranked = torch.where(own, pos, pos + s_local).sort(dim=0).values[:m]  # chosen first, in order
    pack, pack_valid = ranked % s_local, ranked < s_local  # [m, b] each
    pack_row = (first_row[rank] + torch.arange(m, device=dev)[:, None]).clamp(max=k - 1)  # [m, b]

    owner = index // s_local  # [k, b] rank holding each routed row's token
    row = torch.arange(k, device=dev)[:, None]
    source = owner * m + (row - first_row.gather(0, owner))  # [k, b] row in the gathered packs
    return RoutedRows(
        index, mask, pack, pack_valid, pack_row, source[rank * k_local : (rank + 1) * k_local], rank, world
    )


def gather_routed(x: Tensor, plan: RoutedRows, group: dist.ProcessGroup | None = None) -> Tensor:
    """x: [s/W, b, h] local tokens -> [k/W, b, h] the routed tokens this rank runs."""
    packed = gather_rows(x, plan.pack)  # [m, b, h]
    packed = all_gather_seq(packed, group if plan.world > 1 else None)  # [W*m, b, h]
    return gather_rows(packed, plan.source)


def scatter_routed(
    x: Tensor, plan: RoutedRows, update: Tensor, weight: Tensor, group: dist.ProcessGroup | None = None
) -> Tensor:
    """x: [s/W, b, h]; update: [k/W, b, h] = f(x) of this rank's rows; weight: [s/W, b] router
    weights of the local tokens -> [s/W, b, h] with ``x + r * f`` on the chosen tokens and
    every other row of ``x`` untouched."""
    full = all_gather_seq(update, group if plan.world > 1 else None)  # [k, b, h]
    upd = gather_rows(full, plan.pack_row)  # [m, b, h]
    x_pack = gather_rows(x, plan.pack)  # [m, b, h]
    r = weight.gather(0, plan.pack)  # [m, b]
    new = apply_update(x_pack, upd, r, plan.pack_valid)  # padding rows are written back unchanged
    return scatter_tokens(x, plan.pack, new, token_dim=0)


def gather_rotary(freqs: Tensor, index: Tensor) -> Tensor:
    """freqs: Megatron's RoPE angles [s, 1, 1, d] at positions 0..s-1; index: [k, b] ->
    [k, b, 1, d]: each routed token keeps the angles of its original position."""
    return freqs[:, 0, 0, :][index].unsqueeze(2)


def gather_attention_mask(mask: Tensor, index: Tensor) -> Tensor:
    """mask: [b or 1, 1, s, s] bool (True = masked, Megatron's convention); index: [k, b] ->
    [b, 1, k, k]: the mask among the routed tokens of each sequence."""
    k, b = index.shape
    s = mask.shape[-1]
    rows = mask[:, 0].expand(b, s, s)  # [b, s, s]
    idx = index.t()  # [b, k]
    rows = rows.gather(1, idx[:, :, None].expand(b, k, s))  # [b, k, s]
    return rows.gather(2, idx[:, None, :].expand(b, k, k)).unsqueeze(1)
