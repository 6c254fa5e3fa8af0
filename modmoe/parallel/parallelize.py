"""The parallelize step: the native model made parallel (EP, TP, activation checkpointing, FSDP2).

Order, as in torchtitan: tensor parallel, expert parallel, (FP8 linear layers,) activation
checkpointing, compile, then data parallel (DDP or FSDP2) last, because FSDP2 shards whatever
parameters the earlier steps left.
The model object is changed in place: its parameters may become DTensors, but their names do
not change, so checkpoints stay layout independent.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from modmoe.model.moe import GroupedExperts
from modmoe.model.transformer import MoDETransformer
from modmoe.parallel.activation_checkpoint import apply_activation_checkpointing
from modmoe.parallel.compile import apply_compile
from modmoe.parallel.config import ParallelConfig
from modmoe.parallel.dims import DP, EDP, EP, TP, ParallelDims
from modmoe.parallel.distributed import all_reduce_sum
from modmoe.parallel.expert_parallel import A2AStats, apply_expert_parallel
from modmoe.parallel.fp8 import apply_fp8
from modmoe.parallel.tensor_parallel import apply_tensor_parallel


class SpeedOptions(Protocol):
    """The speed choices the parallelize step applies (``trainer.compile``, ``compile_backend``,
    ``cuda_graphs``, ``fp8`` of the trainer section, which parallel/ does not import)."""

    compile: str
    compile_backend: str
    cuda_graphs: bool
    fp8: str


def expert_param_names(model: nn.Module) -> list[str]:
    return [
        f"{mod_name}.{p_name}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, GroupedExperts)
        for p_name, _ in mod.named_parameters(recurse=False)
    ]


def apply_model_parallelism(
    model: MoDETransformer,
    dims: ParallelDims,
    cfg: ParallelConfig,
    trainer: SpeedOptions | None = None,
) -> A2AStats | None:
    """TP, EP, FP8, activation checkpointing, compile and the global-batch load reducer (not
    data parallel). ``trainer`` carries the compile / CUDA-graph / FP8 choices (None: none;
    :func:`modmoe.train.speed_checks.check_speed_options` has checked them for this layout)."""
    if dims.distributed:
        # The balance loss sees the expert load of the global batch: per-expert counts summed
        # over the ranks that split it (TP peers hold the same tokens and are not counted twice).
        reducer = partial(all_reduce_sum, group=dims.dp_group)
        for moe in model.moe_layers():
            moe.load_reducer = reducer
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.dense_mesh[TP])
    a2a = apply_expert_parallel(model, dims.expert_mesh[EP]) if dims.ep > 1 else None
    if trainer is not None and trainer.fp8 != "none":
        apply_fp8(model, trainer.fp8)
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if trainer is not None and trainer.compile != "off":
        # Expected graph breaks: EP reads its all-to-all sizes on the host, TP's collectives sit
        # in autograd functions, and FSDP2's per-block hooks are never traced (a whole-model
        # graph breaks at each block). Every other layout must compile whole.
        fsdp_model = cfg.dp_backend == "fsdp2" and dims.distributed and trainer.compile == "model"
        fullgraph = dims.ep == 1 and dims.tp == 1 and not fsdp_model
        apply_compile(model, trainer.compile, trainer.compile_backend, trainer.cuda_graphs, fullgraph)
    return a2a


def apply_fsdp(
    model: MoDETransformer, dims: ParallelDims, cfg: ParallelConfig, param_dtype: torch.dtype | None
) -> None:
    """FSDP2: each block is one all-gather unit; expert weights are sharded separately over the
    expert-data-parallel ranks (EP already split them over ``ep``)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = cfg.zero_stage == 3
    dense_mesh = dims.dense_mesh[DP]
    for block in model.layers:
        for module in block.modules():
            if isinstance(module, GroupedExperts) and dims.ep > 1:
                fully_shard(module, mesh=dims.expert_mesh[EDP], mp_policy=policy, reshard_after_forward=reshard)
                # Each expert's gradient already sums its whole EP group's tokens; the reduce-
                # scatter over edp adds the rest, and dividing by dp makes it the global mean.
                module.set_gradient_divide_factor(float(dims.dp))
        fully_shard(block, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard)


@contextlib.contextmanager
def fsdp_no_sync(model: FSDPModule):
    """FSDP2's counterpart of DDP's ``no_sync``: accumulate gradients without reducing them."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def reduce_expert_grads(params: list[nn.Parameter], dims: ParallelDims) -> None:
    """EP outside FSDP2 (DDP, DeepSpeed): each expert slice's gradient already sums its EP
    group's tokens; sum it over the ranks holding the same slice and divide by dp, which makes
    it the same global mean as the dense gradients."""
    if not params:
        return
    group = dims.expert_mesh[EDP].get_group() if dims.edp > 1 else None
    for p in params:
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if group is not None:
            dist.all_reduce(local, group=group)
        local.div_(dims.dp)


def a2a_metrics(a2a: A2AStats | None) -> dict[str, float]:
    """This rank's expert-parallel traffic since the last call (forward dispatch + combine; the
    backward pass moves the same volume again), then resets the counters."""
    if a2a is None:
        return {}
    out = {
        "ep/a2a_forward_mb": a2a.bytes_remote / 1e6,
        "ep/a2a_remote_fraction": a2a.rows_sent_remote / max(1, a2a.rows_total),
        "ep/a2a_forward_time_s": a2a.seconds,
    }
    a2a.reset()
    return out
