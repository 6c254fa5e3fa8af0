"""Process-group set-up from the launcher's environment, and the parallelize step.

Model code knows nothing of this file: parallelism is applied from outside, after the model
is built (DESIGN.md §4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modmoe.model.transformer import MoDETransformer
from modmoe.parallel.config import ParallelConfig


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("config error: trainer.device = 'cuda': no CUDA device is available (use cpu or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig, device_choice: str) -> DistEnv:
    """Reads RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = cfg.comm_backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10), device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world, local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (a copy; no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def parallelize(model: MoDETransformer, env: DistEnv, cfg: ParallelConfig) -> nn.Module:
    """Applies data parallelism. Every MoE layer's balance loss sees the load of the global
    batch (its per-expert counts summed over data-parallel ranks), so a layout gives the
    same losses as one rank holding the whole batch."""
    if not env.distributed:
        return model
    for moe in model.moe_layers():
        moe.load_reducer = all_reduce_sum
    # broadcast_buffers=False: expert-bias buffers are updated identically on every rank from
    # all-reduced loads, so there is nothing to broadcast each step.
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> MoDETransformer:
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
