"""AdamW with decay on matrices only, and warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from modmoe.train.config import OptimizerConfig


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay on matrices only. Parameters are also grouped by DTensor mesh and placement (plain
    tensors form their own group), because one foreach kernel cannot mix them."""
    groups: dict[tuple, dict] = {}
    for p in params:
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        layout = (
            (p.device_mesh.mesh_dim_names, str(p.device_mesh.mesh.tolist()), str(p.placements))
            if isinstance(p, DTensor)
            else ()
        )
        group = groups.setdefault((decay, layout), {"params": [], "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, params: Iterable[nn.Parameter] | None = None
) -> torch.optim.AdamW:
    groups = param_groups(model.parameters() if params is None else params, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_factor(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
