"""The non-finite policy's decisions and bounds, and the loss-spike z-score."""

from __future__ import annotations

import math

import pytest

from modmoe.train.config import NumericsConfig
from modmoe.train.numerics import LossSpikes, NonFiniteGuard, NumericalFault, is_finite


def test_finite_steps_pass_and_stop_names_the_step():
    guard = NonFiniteGuard(NumericsConfig())
    assert guard.decide(1, 2.5, 0.3) == "ok" and guard.decide(2, 2.5, None) == "ok"
    with pytest.raises(NumericalFault) as err:
        guard.decide(3, math.nan, 1.0)
    assert "step 3: loss nan" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NumericalFault, match="gradient norm inf"):
        guard.decide(4, 1.0, math.inf)


@pytest.mark.parametrize(("policy", "bound"), [("skip", "max_skipped_steps"), ("rollback", "max_rollbacks")])
def test_skip_and_rollback_are_bounded(policy, bound):
    guard = NonFiniteGuard(NumericsConfig(on_nonfinite=policy, **{bound: 2}))
    assert [guard.decide(s, math.nan, None) for s in (1, 2)] == [policy, policy]
    assert guard.decide(3, 1.0, 1.0) == "ok"
    with pytest.raises(NumericalFault, match=bound):
        guard.decide(4, math.inf, None)
    assert guard.metrics()["numerics/skipped_steps" if policy == "skip" else "numerics/rollbacks"] == 2


def test_spike_zscore_over_the_window():
    spikes = LossSpikes(window=20, threshold=6.0)
    for i in range(20):
        out = spikes.update(3.0 + 0.01 * (i % 3))
        assert out["numerics/loss_spike"] == 0.0
    assert spikes.update(3.005)["numerics/loss_zscore"] == pytest.approx(0.0, abs=1.0)
    jump = spikes.update(5.0)
    assert jump["numerics/loss_zscore"] > 100 and jump["numerics/loss_spike"] == 1.0
    assert spikes.update(math.nan)["numerics/loss_spike"] == 1.0 and len(spikes.history) == 20
    assert is_finite(None) and not is_finite(math.nan)


def test_issue24_17_the_last_update_is_looked_at_through_the_validation_loss():
    """No step follows the last update, so its loss is never seen: the validation loss after it
    is. Stop and skip end the run (an applied update cannot be held back); rollback rolls back."""
    for policy in ("stop", "skip"):
        guard = NonFiniteGuard(NumericsConfig(on_nonfinite=policy))
        assert guard.decide_final(5, 3.2) == "ok"
        with pytest.raises(NumericalFault) as err:
            guard.decide_final(5, math.nan)
        assert "step 5: the last update left the model non-finite (validation loss nan" in str(err.value)
    guard = NonFiniteGuard(NumericsConfig(on_nonfinite="rollback", max_rollbacks=1))
    assert guard.decide_final(5, math.inf) == "rollback" and guard.rollbacks == 1
    with pytest.raises(NumericalFault, match="max_rollbacks"):
        guard.decide_final(5, math.nan)
