"""Which source each sample of the global stream comes from.

Weights are normalised (Megatron-style). Source ``i``'s ``k``-th sample is due at time
``(k + 0.5) / w_i``, and the stream takes samples in order of due time (ties: the lower source
index). This is the sequential form of Sainte-Laguë/Webster apportionment: after any ``n``
samples, source ``i`` has contributed within one sample of ``w_i * n`` for two sources (and
within a few for many). It is deterministic, has no random state, and the counts at any
position can be computed directly (:func:`counts_at`), so a resume needs only the position.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from modmoe.data.config import MAX_WEIGHT_RATIO


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights that sum to 1. Scaled by the largest first, so that weights near the float
    maximum (``1e308``) do not overflow the sum."""
    if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"blend weights {list(weights)}: each must be a finite number > 0")
    top = max(weights)
    if top / min(weights) > MAX_WEIGHT_RATIO:
        raise ValueError(f"blend weights {list(weights)}: the largest is more than {MAX_WEIGHT_RATIO:g} times the smallest")
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def _due(k: int, weight: float) -> float:
    return (k + 0.5) / weight


class BlendSchedule:
    """The source index of every sample, from a given position on."""

    def __init__(self, weights: Sequence[float], counts: Sequence[int] | None = None) -> None:
        self.weights = normalise(weights)
        self.counts = list(counts) if counts is not None else [0] * len(self.weights)
        self._heap = [(_due(c, w), i) for i, (c, w) in enumerate(zip(self.counts, self.weights))]
        heapq.heapify(self._heap)

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` samples as (source, that source's sample number)."""
        out = []
        for _ in range(n):
            _, i = self._heap[0]
            out.append((i, self.counts[i]))
            self.counts[i] += 1
            heapq.heapreplace(self._heap, (_due(self.counts[i], self.weights[i]), i))
        return out


def _count_due_by(weight: float, t: float) -> int:
    """How many of one source's samples are due at or before ``t`` (exact: the same float
    comparisons the schedule makes)."""
    k = max(0, math.floor(t * weight - 0.5) + 1)  # estimate, then correct by the real test
    while k > 0 and _due(k - 1, weight) > t:
        k -= 1
    while _due(k, weight) <= t:
        k += 1
    return k


def counts_at(weights: Sequence[float], position: int) -> list[int]:
    """Samples drawn from each source in the first ``position`` samples of the stream, without
    replaying it (used to start a stream mid-way, e.g. from a checkpoint that recorded none)."""
    w = normalise(weights)
    if position <= 0:
        return [0] * len(w)
    # The position-th sample is due at some time T; find the largest t with fewer than
    # `position` samples due by t, bisecting over the floats between two bounds.
    lo, hi = 0.0, (position + 1) / min(w)
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(_count_due_by(x, mid) for x in w) < position:
            lo = mid
        else:
            hi = mid
    # Every sample due by lo is taken; those due exactly at hi (the next float) fill the rest
    # in source order, which is the schedule's tie rule.
    counts = [_count_due_by(x, lo) for x in w]
    for i, x in enumerate(w):
        if sum(counts) == position:
            break
        if _due(counts[i], x) == hi:
            counts[i] += 1
    assert sum(counts) == position, (counts, position)
    return counts
