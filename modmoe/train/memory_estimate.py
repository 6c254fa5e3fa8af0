"""How much memory one rank needs at least, checked against the device before any allocation.

Per parameter the training state is 16 bytes: the fp32 weight (4; with bf16 compute the
weights stay fp32 and autocast casts on the fly), its fp32 gradient (4) and Adam's two fp32
moments (8). A layout divides each part:

- tensor and pipeline parallelism split every weight over ``tp * pp`` ranks; expert
  parallelism splits the routed experts over ``ep`` (Megatron: ``ep * etp``) more;
- over the data-parallel ranks, ZeRO-1 and distributed optimizers shard the moments, ZeRO-2
  the gradients too, ZeRO-3 and FSDP2 everything (modmoe's DeepSpeed backend keeps the
  experts of an expert-parallel run outside ZeRO, so they are not sharded);

Activations are counted by a lower bound, which no scheme avoids: every block's input
(``micro_batch x seq_len x dim``, the one tensor activation checkpointing keeps) and the
logits with their gradient (``2 x micro_batch x seq_len x vocab / tp``), in the compute dtype.
The real peak is higher (attention and MLP intermediates, DDP's gradient buckets, allocator
slack), so a refusal means the job cannot fit, while a pass is no promise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil
import torch

from modmoe.config import JobConfig
from modmoe.config_base import ConfigError
from modmoe.model.flops import parameter_counts

GIB = 2**30
log = logging.getLogger("modmoe.train")


@dataclass(frozen=True)
class Split:
    """How many ranks share each part of the training state."""

    tp: int
    pp: int
    expert_split: int  # ep (Megatron: ep * etp), on top of tp * pp
    weights: int  # data-parallel ranks the weights and gradients are sharded over (FSDP2, ZeRO-3)
    grads: int  # ZeRO-2 and up
    moments: int  # ZeRO-1 and up, distributed optimizers
    expert_zero: bool  # whether the experts take part in the data-parallel sharding
    describe: str

    @property
    def dense(self) -> int:
        return self.tp * self.pp

    @property
    def experts(self) -> int:
        return self.dense * self.expert_split


def layout_split(layout) -> Split:
    """The :class:`Split` of a resolved layout: ``ParallelDims`` (native, DeepSpeed) or a
    ``MegatronPlan``."""
    if hasattr(layout, "layout"):  # MegatronPlan
        lay, zero = layout.layout, layout.zero_stage or 0
        moments = lay.dp if layout.optimizer == "distributed" or zero >= 1 else 1
        grads = lay.dp if zero >= 2 else 1
        describe = f"megatron tp{lay.tp} pp{lay.pp} ep{lay.ep} dp{lay.dp}"
        return Split(lay.tp, lay.pp, lay.ep * lay.etp, 1, grads, moments, True, describe)
    dp, zero, backend = layout.dp, layout.zero_stage, layout.dp_backend
    full = backend == "fsdp2" or (backend == "deepspeed" and zero >= 3)
    weights = dp if full else 1
    grads = dp if full or (backend == "deepspeed" and zero >= 2) else 1
    moments = dp if full or (backend == "deepspeed" and zero >= 1) else 1
    expert_zero = backend != "deepspeed" or layout.ep == 1
    zero_text = f" zero-{zero}" if backend == "deepspeed" else ""
    return Split(
        layout.tp,
        1,
        layout.ep,
        weights,
        grads,
        moments,
        expert_zero,
        f"{backend}{zero_text} dp{dp} ep{layout.ep} tp{layout.tp}",
    )


@dataclass(frozen=True)
class MemoryEstimate:
    state_bytes: float  # weights, gradients, Adam moments
    activation_bytes: float
    parameters: int
    split: Split

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes


def _state_bytes(params: float, split_ranks: int, weights: int, grads: int, moments: int) -> float:
    return params / split_ranks * (4 / weights + 4 / grads + 8 / moments)


def estimate(cfg: JobConfig, layout, compute_bytes: int) -> MemoryEstimate:
    """Lower bound of one rank's memory for ``cfg`` under ``layout``; arithmetic only."""
    counts = parameter_counts(cfg.model)
    split = layout_split(layout)
    experts = counts["experts"]
    dense = counts["total"] - experts
    state = _state_bytes(dense, split.dense, split.weights, split.grads, split.moments)
    if split.expert_zero:
        state += _state_bytes(experts, split.experts, split.weights, split.grads, split.moments)
    else:
        state += _state_bytes(experts, split.experts, 1, 1, 1)
    m, tc = cfg.model, cfg.trainer
    tokens = tc.micro_batch_size * cfg.data.seq_len
    layers_here = -(-m.num_layers // split.pp)  # a pipeline stage's blocks
    activations = tokens * (m.dim * layers_here + 2 * m.vocab_size / split.tp) * compute_bytes
    return MemoryEstimate(state, activations, counts["total"], split)


def available_bytes(device_type: str, local_ranks: int) -> tuple[float, str]:
    """What one rank may use, and where the number comes from; touches no device memory."""
    if device_type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        props = torch.cuda.get_device_properties(index)
        return float(props.total_memory), f"{props.name} total memory"
    avail = float(psutil.virtual_memory().available)
    if local_ranks > 1:
        return avail / local_ranks, f"available RAM / {local_ranks} local ranks"
    return avail, "available RAM"


def check_memory(cfg: JobConfig, layout, device_type: str, world_size: int) -> MemoryEstimate:
    """Refuses (``trainer.memory_check: refuse``) or warns when the estimate exceeds what a
    rank has; returns the estimate."""
    tc = cfg.trainer
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device_type == "cuda")
    est = estimate(cfg, layout, 2 if bf16 else 4)
    if tc.memory_check == "off":
        return est
    if tc.memory_available_gib is not None:
        have, source = tc.memory_available_gib * GIB, "trainer.memory_available_gib"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        have, source = available_bytes(device_type, local)
    if est.total_bytes <= have:
        return est
    message = (
        f"config error: the job needs at least {est.total_bytes / GIB:,.1f} GiB per rank "
        f"({est.parameters / 1e9:,.3g}B parameters: weights, gradients and Adam state {est.state_bytes / GIB:,.1f} GiB "
        f"under {est.split.describe}; activations >= {est.activation_bytes / GIB:,.1f} GiB), but a rank has "
        f"{have / GIB:,.1f} GiB ({source}); shrink the model or micro-batch, add ranks or sharding "
        "(parallel.dp_backend: fsdp2, parallel.zero_stage), or set trainer.memory_check: warn"
    )
    if tc.memory_check == "refuse":
        raise ConfigError(message)
    log.warning("%s", message.removeprefix("config error: "))
    return est
