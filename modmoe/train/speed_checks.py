"""Checks of the speed options (compile, CUDA graphs, FP8) against the layout and the device,
made when the job is resolved, before any work; each problem is one line naming the field."""

from __future__ import annotations

import torch

from modmoe.config_base import field_error
from modmoe.parallel.config import ParallelConfig
from modmoe.train.config import TrainerConfig


def check_speed_options(trainer: TrainerConfig, parallel: ParallelConfig, world_size: int, device: str) -> None:
    """``device``: the device type training will run on (``cpu`` or ``cuda``)."""
    if trainer.cuda_graphs:
        if parallel.ep > 1:
            raise field_error(
                "trainer.cuda_graphs",
                True,
                f"needs parallel.ep = 1 (got {parallel.ep}): its all-to-all sizes come from the host",
            )
        if device != "cuda":
            raise field_error("trainer.cuda_graphs", True, f"needs a CUDA device (training runs on {device})")
        if world_size > 1:
            raise field_error(
                "trainer.cuda_graphs",
                True,
                f"built for one process on one GPU (world size {world_size}): DDP/FSDP2 communication is not captured",
            )
    if trainer.fp8 != "none":
        if parallel.tp > 1:
            raise field_error(
                "trainer.fp8", trainer.fp8, f"needs parallel.tp = 1 (got {parallel.tp}): float8 TP is not built"
            )
        if device != "cuda":
            raise field_error(
                "trainer.fp8",
                trainer.fp8,
                f"needs a CUDA GPU with FP8 GEMMs (training runs on {device}; torchao's CPU emulation is for tests)",
            )
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise field_error(
                "trainer.fp8",
                trainer.fp8,
                f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no FP8 GEMM; needs 8.9+ (Ada, Hopper, Blackwell)",
            )
