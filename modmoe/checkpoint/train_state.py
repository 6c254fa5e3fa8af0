"""``TrainState``: model + optimizer + LR scheduler as one DCP ``Stateful``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

MODEL_KEY = "model"
OPTIM_KEY = "optim"
SCHEDULER_KEY = "lr_scheduler"


class TrainState(Stateful):
    """Gives and takes state dicts keyed by parameter FQNs, the same whether the model is plain,
    DDP-wrapped or FSDP2-sharded (``get_state_dict`` strips wrapper prefixes and keeps shards as
    DTensors), so DCP can reshard them on load. The optimizer state is keyed by FQN too."""

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

    def state_dict(self) -> dict[str, Any]:
        optims = [self.optimizer] if self.optimizer is not None else []
        # Also creates the optimizer's state when it is still empty, so a fresh optimizer
        # offers DCP the tensors to load into.
        model_sd, optim_sd = get_state_dict(self.model, optims, options=self.options)
        state: dict[str, Any] = {MODEL_KEY: model_sd}
        if self.optimizer is not None:
            state[OPTIM_KEY] = optim_sd
        if self.lr_scheduler is not None:
            state[SCHEDULER_KEY] = self.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        optims = [self.optimizer] if self.optimizer is not None else []
        set_state_dict(
            self.model,
            optims,
            model_state_dict=state_dict[MODEL_KEY],
            optim_state_dict=state_dict.get(OPTIM_KEY, {}),
            options=self.options,
        )
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state_dict[SCHEDULER_KEY])
