"""Tensor parallelism with DTensor: attention heads and MLP/expert hidden units split over ``tp``.

Megatron-style pairs: the first projection of a sub-layer is column-parallel (each rank
computes a slice of heads or hidden units from the replicated input), the second is
row-parallel (partial outputs summed by one all-reduce). Everything else stays replicated:
norms, embeddings, the output head, and in particular the depth router and the MoE gate,
whose top-k decisions must be bit-identical on every TP rank. They are, because their inputs
are replicated and they run the same float ops on each rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from modmoe.model.layers import SwiGLU
from modmoe.model.moe import MoE
from modmoe.model.transformer import MoDETransformer


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradients of all TP ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward sums the partial outputs of all TP ranks; backward passes the gradient through
    (every rank continues with the same replicated activations and loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _swiglu_plan(prefix: str) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel()}


def _shard_experts(moe: MoE, tp_mesh: DeviceMesh) -> None:
    """Stacked expert weights split on the hidden dimension: w1/w3 (E, D, F) on F, w2 (E, F, D)
    on F. The experts then produce partial (n, D) sums, added up after w2."""
    experts, group = moe.experts, tp_mesh.get_group()
    for name, dim in (("w1", 2), ("w3", 2), ("w2", 1)):
        param = getattr(experts, name)
        experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(dim)])))
    local = experts.w1.to_local()  # (E, D, F / tp): the grouped GEMM's size rule applies to the slice
    experts.kernel = experts.best_kernel(local.shape[1], local.shape[2])
    experts.register_forward_pre_hook(lambda _m, args: (_CopyToTP.apply(args[0], group), *args[1:]))
    experts.register_forward_hook(lambda _m, _args, out: _ReduceFromTP.apply(out, group))


def apply_tensor_parallel(model: MoDETransformer, tp_mesh: DeviceMesh) -> None:
    for block in model.layers:
        plan = {
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(),
        }
        if isinstance(block.mlp, SwiGLU):
            plan.update(_swiglu_plan("mlp"))
        elif isinstance(block.mlp, MoE):
            if block.mlp.shared is not None:
                plan.update(_swiglu_plan("mlp.shared"))
            _shard_experts(block.mlp, tp_mesh)
        parallelize_module(block, tp_mesh, plan)
