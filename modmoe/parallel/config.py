"""Configuration of how training is spread over processes."""

from __future__ import annotations

from typing import Literal

from modmoe.config_base import ConfigModel


class ParallelConfig(ConfigModel):
    """Process layout. The world size comes from the launcher (torchrun sets WORLD_SIZE)."""

    dp_backend: Literal["ddp"] = "ddp"
    """How data-parallel ranks share gradients: ``ddp`` (PyTorch DistributedDataParallel)."""

    comm_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: ``auto`` = nccl on CUDA, gloo on CPU."""
