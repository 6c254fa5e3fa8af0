"""AdamW with decay on matrices only, warmup + cosine learning-rate schedule, and the frozen trunk
of ``optimizer.routers_only_steps``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from modmoe.train.config import OptimizerConfig

# Parameters that route (the depth router and its predictor, the MoE gate): what trains alone
# during ``optimizer.routers_only_steps``.
_ROUTER_SUFFIXES = (".router.proj.weight", ".mlp.gate.weight")
_ROUTER_PARTS = (".router.predictor.",)


def is_router(name: str) -> bool:
    return name.endswith(_ROUTER_SUFFIXES) or any(part in name for part in _ROUTER_PARTS)


def param_groups(
    params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    split_routers: bool = False,
) -> list[dict]:
    """Decay on matrices only. Parameters are also grouped by DTensor mesh and placement (plain
    tensors form their own group), because one foreach kernel cannot mix them. With
    ``split_routers`` (named parameters), the trunk's groups are marked ``trunk``."""
    groups: dict[tuple, dict] = {}
    for item in params:
        name, p = item if isinstance(item, tuple) else ("", item)
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        layout = (
            (p.device_mesh.mesh_dim_names, str(p.device_mesh.mesh.tolist()), str(p.placements))
            if isinstance(p, DTensor)
            else ()
        )
        trunk = split_routers and not is_router(name)
        group = groups.setdefault(
            (decay, layout, trunk),
            {"params": [], "weight_decay": weight_decay if decay else 0.0, **({"trunk": True} if trunk else {})},
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, params: Iterable[nn.Parameter] | None = None
) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters (or ``params``); with ``routers_only_steps``, the trunk's
    parameters in groups of their own (:class:`FrozenTrunk`)."""
    if params is None:
        groups = param_groups(model.named_parameters(), cfg.weight_decay, split_routers=cfg.routers_only_steps > 0)
    else:
        groups = param_groups(params, cfg.weight_decay)
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
    """One closed form of the step per group: the trunk's is 0 for its ``routers_only_steps``."""
    frozen = cfg.routers_only_steps

    def trunk(step: int) -> float:
        return 0.0 if step < frozen else lr_factor(step, cfg, max_steps)

    def schedule(step: int) -> float:
        return lr_factor(step, cfg, max_steps)

    return LambdaLR(optimizer, [trunk if g.get("trunk") else schedule for g in optimizer.param_groups])


class FrozenTrunk:
    """``optimizer.routers_only_steps``: for the first ``steps`` optimizer steps every parameter
    but the routers keeps its value bit for bit. Its learning rate is 0 (the schedule), so
    neither the update nor AdamW's decoupled weight decay (``p *= 1 - lr * wd``) moves it; its
    gradient is zeroed before clipping, so the clipped norm is the routers' and its Adam moments
    stay exactly 0; at step ``steps`` its Adam state is dropped, so its first real update is
    Adam's first step (not one biased by the frozen steps' count). Works on plain and DTensor
    parameters alike (DDP, FSDP2, EP, TP) and resumes exactly: the state it keeps is the
    optimizer's own."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        self.steps = steps
        self.trunk = [p for name, p in model.named_parameters() if p.requires_grad and not is_router(name)]

    def before_clip(self, step: int) -> None:
        """``step``: the 0-based index of the optimizer step about to be taken."""
        if step < self.steps:
            for p in self.trunk:
                if p.grad is not None:
                    p.grad.zero_()

    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.steps and step == self.steps:
            for p in self.trunk:
                optimizer.state.pop(p, None)
