"""What the Trainer needs from a backend, and the config keys each backend honours.

A *backend* executes training steps for the :class:`~modmoe.train.loop.Trainer`: it builds the
model with its parallelism and optimizer, runs the forward and backward passes of a step's
micro-batches, steps the optimizer, evaluates, and says how its train state is written into a
checkpoint. The Trainer owns everything around that (data, resume, cadence, metrics, MLflow,
checkpoint commits and retention, stop requests). Backends:

- ``native``: the native model under DDP or FSDP2 (with EP, TP, activation checkpointing);
- ``deepspeed``: the native model under DeepSpeed ZeRO 0-3 (with EP);
- ``megatron``: the MoDE layers hosted by Megatron-Core's ``GPTModel``.

Each backend declares the config keys it honours (:mod:`.keys`); a key set away from its
default that neither the Trainer nor the chosen backend honours is refused before any work
(:func:`modmoe.train.resolve.resolve_job`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

from modmoe.train.backends.keys import HonouredKeys

if TYPE_CHECKING:
    from modmoe.checkpoint.manager import StateIO

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (B, T) int64 on the CPU


@dataclass
class StepStats:
    """What the forward and backward passes of one step report, over the global batch."""

    loss: float
    """Token-mean language-model loss."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Auxiliary losses and router health, by metric name (docs/tracking.md)."""


@dataclass
class PlotData:
    """What the evaluation plots show: expert loads of the last step and, for one validation
    sequence, which tokens each routed block took."""

    expert_layers: list[str]
    expert_loads: np.ndarray | None  # (MoE layers, experts), each row sums to 1
    routing: tuple[list[str], np.ndarray, list[str]] | None  # (token texts, (routed layers, T) bool, layer names)


class Backend(Protocol):
    name: ClassVar[str]
    """Backend name, as error messages and the ``backend`` MLflow tag say it."""
    honoured: ClassVar[HonouredKeys]
    """Config keys this backend implements, besides the Trainer's (:mod:`.keys`)."""

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which rows of a batch it reads)."""
        ...

    def describe(self) -> str:
        """One line: the layout and what the backend chose, for the start of the log."""
        ...

    def layout_tag(self) -> str:
        """Compact layout name for the ``parallel_layout`` MLflow tag."""
        ...

    def forward_backward(self, batches: list[Batch], step: int) -> StepStats:
        """Forward and backward passes of the micro-batches of optimizer step ``step`` (0-based;
        it sets the step's learning rate), gradients accumulated, not yet applied. Collective."""
        ...

    def optimizer_step(self, apply: Callable[[float | None], bool] | None = None) -> float | None:
        """Applies the accumulated gradients (clipping first) and moves the LR schedule;
        returns the global gradient norm (None when the backend cannot tell). With ``apply``
        (only on backends that honour ``trainer.numerics.on_nonfinite=skip``), it is asked with
        the global norm whether to apply the step; if not, the gradients are dropped and
        nothing moves (optimizer, schedule, expert biases)."""
        ...

    def lr(self) -> float:
        """Learning rate of the step the last ``forward_backward`` prepared."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """Backend-specific metrics of the last step (communication volume, expert bias, ...)."""
        ...

    def evaluate(self, batches: list[Batch]) -> dict[str, float]:
        """Validation metrics (``eval/loss_topk`` at least) over fixed batches. Collective."""
        ...

    def plot_data(self, sample: torch.Tensor, decode) -> PlotData:
        """Data of the evaluation plots; ``sample`` is one validation sequence (1, T). Collective."""
        ...

    def state_io(self) -> StateIO:
        """How this backend's train state goes into a checkpoint and comes back."""
        ...

    def close(self) -> None:
        """Releases what the backend set up (process-group state it created, ...)."""
        ...
