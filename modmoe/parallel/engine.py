"""Picks the training engine for ``parallel.dp_backend``."""

from __future__ import annotations

import torch

from modmoe.config import JobConfig
from modmoe.model.transformer import MoDETransformer
from modmoe.parallel.dims import ParallelDims
from modmoe.parallel.parallelize import NativeEngine


def build_engine(
    model: MoDETransformer, dims: ParallelDims, cfg: JobConfig, device: torch.device, autocast_dtype: torch.dtype | None
):
    """DDP/FSDP2 (:class:`NativeEngine`) or DeepSpeed ZeRO; both offer ``module``,
    ``micro_batch``, ``backward``, ``step``, ``lr``, ``comm_metrics`` and ``train_state``."""
    if cfg.parallel.dp_backend == "deepspeed":
        from modmoe.parallel.deepspeed_engine import DeepSpeedEngine  # optional dependency

        return DeepSpeedEngine(model, dims, cfg, device)
    return NativeEngine(model, dims, cfg.parallel, cfg.optimizer, cfg.trainer.max_steps, device, autocast_dtype)
