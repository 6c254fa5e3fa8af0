"""Expert parallelism: experts sharded over an ``ep`` mesh dimension, tokens moved by all-to-all.

Applied from outside to a :class:`~modmoe.model.moe.GroupedExperts` module. Its parameters
become ``Shard(0)`` DTensors (rank ``i`` of the EP group holds experts
``[i*E/ep, (i+1)*E/ep)``), so state dicts keep the global ``(E, ...)`` identity and DCP
reshards them when EP changes. Two forward hooks wrap the module's own forward:

- dispatch (pre-hook): the rows arrive sorted by global expert with per-expert counts. The
  counts are exchanged first (one small all-to-all) so every rank knows exactly how many rows
  it will receive from whom; then the rows themselves travel, and are regrouped by local expert.
- combine (post-hook): the inverse permutation and the reverse all-to-all bring every output
  row back to the rank and slot it came from.

Both all-to-alls are differentiable: the backward pass sends gradients the reverse way, so an
expert's gradient sums the contributions of every rank of its EP group. Only tokens chosen by
the depth router reach the MoE at all, so under MoD only those are dispatched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from modmoe.model.moe import GroupedExperts


@dataclass
class _InFlight:
    """What the combine step needs from the matching dispatch step."""

    order: torch.Tensor  # (m,) received rows -> sorted by local expert
    rows: int  # rows the caller handed in, dispatched or not (the output has as many)
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank


@dataclass
class A2AStats:
    """Forward all-to-all traffic of this rank, accumulated since the last reset."""

    rows_sent_remote: int = 0  # dispatched rows whose expert lives on another rank
    rows_total: int = 0  # all dispatched rows
    bytes_remote: int = 0  # bytes sent to other ranks, dispatch and combine
    seconds: float = 0.0  # time inside the all-to-all calls

    def reset(self) -> None:
        self.rows_sent_remote = self.rows_total = self.bytes_remote = 0
        self.seconds = 0.0


class ExpertParallel:
    """All-to-all dispatcher of one ``GroupedExperts`` module over ``ep_mesh``."""

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh, stats: A2AStats | None = None) -> None:
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        self.num_experts = experts.w1.shape[0]
        self.local_experts = self.num_experts // self.ep
        self.stats = stats if stats is not None else A2AStats()
        # A stack, not a slot: activation checkpointing re-runs the forward (dispatch, combine)
        # during backward, which nests cleanly on a stack.
        self._in_flight: list[_InFlight] = []
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.register_forward_pre_hook(self._dispatch)
        experts.register_forward_hook(self._combine)

    def _all_to_all(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        out = wait_tensor(all_to_all_single_autograd(rows, out_splits, in_splits, self.group))
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes_remote += (rows.shape[0] - in_splits[self.ep_rank]) * rows.shape[-1] * rows.element_size()
        return out

    def _dispatch(self, _module: nn.Module, args: tuple) -> tuple:
        xs, counts = args  # xs: (M, D) sorted by global expert, dispatched rows first; counts: (E,)
        send_counts = counts.view(self.ep, self.local_experts)  # (ep, E_local) rows per destination expert
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts.view(-1), send_counts.reshape(-1).contiguous(), group=self.group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        self.stats.rows_total += sum(send_splits)
        self.stats.rows_sent_remote += sum(send_splits) - send_splits[self.ep_rank]
        # Only the dispatched rows travel; the MoE's static-shape tail of undispatched rows stays.
        received = self._all_to_all(xs[: sum(send_splits)], recv_splits, send_splits)  # (m, D) by (source, expert)
        local_expert_of_row = torch.arange(self.local_experts, device=xs.device).repeat(self.ep)
        local_expert_of_row = local_expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # (m,)
        order = torch.argsort(local_expert_of_row, stable=True)
        self._in_flight.append(_InFlight(order, xs.shape[0], send_splits, recv_splits))
        return received[order], recv_counts.sum(0)  # rows by local expert, (E_local,) counts

    def _combine(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        flight = self._in_flight.pop()
        unsorted = torch.empty_like(output).index_copy(0, flight.order, output)  # back to (source rank, expert) order
        back = self._all_to_all(unsorted, flight.send_splits, flight.recv_splits)  # (n, D) in the caller's order
        return torch.cat([back, back.new_zeros(flight.rows - back.shape[0], back.shape[1])])  # (M, D)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> A2AStats:
    """Shards every ``GroupedExperts`` of ``model`` over ``ep_mesh``; returns the shared stats."""
    stats = A2AStats()
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            ExpertParallel(module, ep_mesh, stats)
    return stats
