"""Memory of a training step: resident set size of the process (CPU) and peak allocated CUDA
memory, each the maximum over all ranks (the rank closest to running out is the one to watch)."""

from __future__ import annotations

import psutil
import torch
import torch.distributed as dist

GIB = 2**30


def start_step(device: torch.device) -> None:
    """Resets the CUDA peak, so the value read after the step covers this step only."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def step_memory(device: torch.device) -> dict[str, float]:
    """``memory/cpu_rss_gib`` and, on CUDA, ``memory/gpu_peak_allocated_gib`` (since
    ``start_step``). Collective when a process group exists: every rank must call it."""
    values = {"memory/cpu_rss_gib": float(psutil.Process().memory_info().rss)}
    if device.type == "cuda":
        values["memory/gpu_peak_allocated_gib"] = float(torch.cuda.max_memory_allocated(device))
    # float64 on the step's device: NCCL reduces device tensors only, and byte counts need > 24 bits.
    maxed = _max_over_ranks(torch.tensor(list(values.values()), dtype=torch.float64, device=device)).tolist()
    return {key: value / GIB for key, value in zip(values, maxed)}
