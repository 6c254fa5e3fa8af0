"""Numerical faults of a training step: non-finite loss or gradient norm, and loss spikes.

Each update is looked at through the next step's loss; the last update, which has no next
step, through the validation loss the run computes after it (:meth:`NonFiniteGuard.decide_final`).

The Trainer gets the step's loss and gradient norm as global values: the backends reduce the
loss sums once per step over the data-parallel ranks (together with the step's other
statistics, so no extra synchronisation), and a NaN or inf on any rank makes the reduced value
non-finite on every rank; the gradient norm is the global norm clipping uses. Every rank
therefore takes the same decision at the same step without another collective.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from modmoe.errors import UserError
from modmoe.train.config import NumericsConfig

Decision = Literal["ok", "skip", "rollback"]
MIN_SPIKE_HISTORY = 8


class NumericalFault(UserError, RuntimeError):
    """Training hit a non-finite loss or gradient norm and the policy says stop; one line."""


def is_finite(value: float | None) -> bool:
    """``None`` (a backend that cannot tell the norm) counts as finite."""
    return value is None or math.isfinite(value)


class NonFiniteGuard:
    """Applies ``trainer.numerics.on_nonfinite`` to each step's loss and gradient norm."""

    def __init__(self, cfg: NumericsConfig) -> None:
        self.cfg = cfg
        self.skipped = 0
        self.rollbacks = 0

    def _stop(self, step: int, what: str, why: str) -> NumericalFault:
        return NumericalFault(
            f"step {step}: {what}; {why} (trainer.numerics.on_nonfinite = {self.cfg.on_nonfinite!r}; "
            "lower optimizer.lr, set optimizer.grad_clip, or use skip/rollback)"
        )

    def decide(self, step: int, loss: float, grad_norm: float | None) -> Decision:
        """``ok``, or what to do with step ``step`` (1-based); raises :class:`NumericalFault`
        when the policy is ``stop`` or its bound is used up."""
        if is_finite(loss) and is_finite(grad_norm):
            return "ok"
        what = f"loss {loss}" + (f", gradient norm {grad_norm}" if grad_norm is not None else "")
        policy = self.cfg.on_nonfinite
        if policy == "stop":
            raise self._stop(step, what, "the run stops without applying or saving the step")
        if policy == "skip":
            if self.skipped >= self.cfg.max_skipped_steps:
                raise self._stop(
                    step, what, f"already skipped {self.skipped} steps (trainer.numerics.max_skipped_steps)"
                )
            self.skipped += 1
            return "skip"
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise self._stop(step, what, f"already rolled back {self.rollbacks} times (trainer.numerics.max_rollbacks)")
        self.rollbacks += 1
        return "rollback"

    def decide_final(self, step: int, val_loss: float) -> Decision:
        """The state after the last update, which no later step's loss will look at: its
        validation loss (global, computed on the updated weights) must be finite. ``ok`` or
        ``rollback``; raises :class:`NumericalFault` under ``stop``, and under ``skip`` too (an
        update already applied cannot be held back)."""
        if is_finite(val_loss):
            return "ok"
        what = f"the last update left the model non-finite (validation loss {val_loss} after it)"
        policy = self.cfg.on_nonfinite
        if policy == "stop":
            raise self._stop(step, what, "the run stops without saving the step or writing COMPLETED")
        if policy == "skip":
            raise self._stop(step, what, "an applied update cannot be skipped; the run stops without saving it")
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise self._stop(step, what, f"already rolled back {self.rollbacks} times (trainer.numerics.max_rollbacks)")
        self.rollbacks += 1
        return "rollback"

    def metrics(self) -> dict[str, float]:
        return {"numerics/skipped_steps": float(self.skipped), "numerics/rollbacks": float(self.rollbacks)}


class LossSpikes:
    """z-score of each loss against the previous ``window`` finite losses."""

    def __init__(self, window: int, threshold: float) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.threshold = threshold

    def update(self, loss: float) -> dict[str, float]:
        """``numerics/loss_zscore`` (0 until there are enough losses) and ``numerics/loss_spike``
        (1 above the threshold); a non-finite loss is a spike and stays out of the window."""
        if not math.isfinite(loss):
            return {"numerics/loss_zscore": 0.0, "numerics/loss_spike": 1.0}
        z = 0.0
        if len(self.history) >= MIN_SPIKE_HISTORY:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
            z = (loss - mean) / std if std > 0 else 0.0
        self.history.append(loss)
        return {"numerics/loss_zscore": z, "numerics/loss_spike": float(z > self.threshold)}
