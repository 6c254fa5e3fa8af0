"""Process-group set-up from the launcher's environment, and small collective helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from modmoe.config_base import field_error
from modmoe.parallel.config import ParallelConfig


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    setup_group: dist.ProcessGroup | None = None
    """A gloo group with ``parallel.setup_timeout_s`` for :meth:`setup_barrier` (None alone)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup_barrier(self) -> None:
        """Waits for every rank where some rank does long one-time work first (rank 0 preparing
        the data or opening the MLflow run): bounded by ``parallel.setup_timeout_s``, not by the
        collective timeout, which a large corpus's preparation may well exceed."""
        if self.setup_group is not None:
            dist.barrier(group=self.setup_group)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise field_error("trainer.device", "cuda", "no CUDA device is available (use cpu or auto)")
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
        timeout = timedelta(seconds=cfg.timeout_s)
        apply_timeout_to_new_groups(timeout)
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    setup_group = None
    if world > 1:
        setup_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(cfg.setup_timeout_s, cfg.timeout_s)))
    return DistEnv(rank, world, local_rank, device, setup_group)


def apply_timeout_to_new_groups(timeout: timedelta) -> None:
    """Makes ``timeout`` the default of every process group created later without one.

    ``init_process_group``'s timeout covers only the default group: ``new_group`` and the
    groups of a ``DeviceMesh`` (the dp/ep/tp meshes, the checkpoint's gloo group, DeepSpeed's
    groups) fall back to torch's module defaults (30 minutes for gloo, 10 for NCCL), so a rank
    blocked in one of them would outwait the job's timeout. torch reads these module
    attributes at each group's creation (``_get_default_timeout``)."""
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (default: all; a copy; no-op without a process group).
    Differentiable tensors are detached: this is for statistics and routing loads."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (itself without a process group); for small values such
    as a refusal's message, between our own processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
