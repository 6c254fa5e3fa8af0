"""``TrainState``: model + optimizer + LR scheduler as one DCP ``Stateful``, in a layout-neutral
format that every engine writes and reads.

Checkpoint keys (under the app-state name, e.g. ``train.``)::

    model.<fqn>                         weights and persistent buffers (expert bias)
    optim.state.<fqn>.exp_avg           Adam moments, keyed by the parameter they belong to
    optim.state.<fqn>.exp_avg_sq
    optim.state.<fqn>.step
    lr_scheduler.last_epoch             optimizer steps the schedule has taken

Optimizer param groups and scheduler internals are deliberately not saved: they depend on the
layout (DDP and FSDP2 group parameters by DTensor mesh, DeepSpeed with EP keeps the experts in
a second optimizer), and their hyper-parameters come from the config. Leaving them out is what
lets a checkpoint of one layout (world size, EP, TP, DDP/FSDP2/DeepSpeed, ZeRO stage) resume in
another; the learning rate is recomputed from the schedule at the saved position, exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

MODEL_KEY = "model"
OPTIM_KEY = "optim"
SCHEDULER_KEY = "lr_scheduler"
OPTIM_STATE_KEY = "state"


def schedule_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, torch.Tensor]:
    return {"last_epoch": torch.tensor(scheduler.last_epoch, dtype=torch.int64)}


def load_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    """Puts ``scheduler`` at the saved position and writes the learning rate of that position
    into every param group (the schedule is a closed form of the step, e.g. LambdaLR)."""
    steps = int(state["last_epoch"])
    scheduler.last_epoch = steps
    scheduler._step_count = steps + 1  # noqa: SLF001 (keeps torch's "step() before optimizer" check quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns; it is the closed form here
        lrs = scheduler._get_closed_form_lr() if hasattr(scheduler, "_get_closed_form_lr") else scheduler.get_lr()  # noqa: SLF001
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # noqa: SLF001


class TrainState(Stateful):
    """Gives and takes state dicts keyed by parameter FQNs, the same whether the model is plain,
    DDP-wrapped or FSDP2-sharded (``get_state_dict`` strips wrapper prefixes and keeps shards as
    DTensors), so DCP can reshard them on load."""

    holds_model = True  # its state dict has the model weights under MODEL_KEY (for tools)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        options: StateDictOptions | None = None,
    ) -> None:
        if lr_scheduler is not None and optimizer is None:
            raise ValueError("TrainState: lr_scheduler given without its optimizer")
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.options = options

    def _get(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # Also creates the optimizer's state when it is still empty, so a fresh optimizer
        # offers DCP the tensors to load into.
        return get_state_dict(self.model, [self.optimizer] if self.optimizer is not None else [], options=self.options)

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = self._get()
        state: dict[str, Any] = {MODEL_KEY: model_sd}
        if self.optimizer is not None:
            state[OPTIM_KEY] = {OPTIM_STATE_KEY: optim_sd[OPTIM_STATE_KEY]}
        if self.lr_scheduler is not None:
            state[SCHEDULER_KEY] = schedule_state(self.lr_scheduler)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        optim_sd: dict[str, Any] = {}
        if self.optimizer is not None:
            # The param groups (hyper-parameters, FQN lists) are this layout's own.
            optim_sd = {
                OPTIM_STATE_KEY: state_dict[OPTIM_KEY][OPTIM_STATE_KEY],
                "param_groups": self._get()[1]["param_groups"],
            }
        set_state_dict(
            self.model,
            [self.optimizer] if self.optimizer is not None else [],
            model_state_dict=state_dict[MODEL_KEY],
            optim_state_dict=optim_sd,
            options=self.options,
        )
        if self.lr_scheduler is not None:
            load_schedule(self.lr_scheduler, state_dict[SCHEDULER_KEY])
