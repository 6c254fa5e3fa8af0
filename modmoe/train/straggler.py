"""The straggler metric: how unevenly the ranks did their own work of a step.

A step's wall time is the same on every rank (they meet in its collectives), so it cannot show
a slow rank. What differs is how long each rank took for its *own* work before it first met
its peers: from the step's start to its forward pass (``StepWatchdog`` marks it), that is
getting the step's batches and whatever else a rank does alone first. The forward pass itself
meets the peers early (the MoE layers all-reduce their expert loads; a dense model's backward
reduces the gradients), so a fast rank's wait there would hide which rank was slow. One small
all-gather per step brings the ranks' times together; the metric is the slowest rank's time
over the median, and which rank that is.

Limit: a rank slow at computing (a throttled GPU) is not told from the others waiting for it;
that needs device-side timing of the compute, which this does not do. A rank slow to get its
data (a slow filesystem on one node, a stalled data worker) or held up by anything else
before its forward pass is.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def spread(local_s: Sequence[float]) -> dict[str, float]:
    """Metrics of one step's per-rank own-work times (index = rank). The median is the lower
    middle for an even count of ranks, so that with two ranks a slow one is measured against
    the other rather than against the mean of itself and the other."""
    median = statistics.median_low(local_s)
    slowest = max(range(len(local_s)), key=lambda r: local_s[r])
    return {
        "straggler/local_max_s": float(local_s[slowest]),
        "straggler/local_median_s": float(median),
        "straggler/max_over_median": float(local_s[slowest] / median) if median > 0 else 1.0,
        "straggler/slowest_rank": float(slowest),
    }


def gather_local_times(local_s: float, device: torch.device, group: dist.ProcessGroup | None = None) -> list[float]:
    """Every rank's own-work time of this step (one all-gather of one number; alone: ``[local_s]``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [local_s]
    mine = torch.tensor([local_s], dtype=torch.float64, device=device)
    out = torch.empty(dist.get_world_size(group), dtype=torch.float64, device=device)
    # all_gather_single replaces all_gather_into_tensor from torch 2.13 on (same arguments).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)
    return out.tolist()


def straggler_line(step: int, local_s: Sequence[float], factor: float, min_gap_s: float) -> str | None:
    """One line naming the slowest rank, when its own work took over ``factor`` x the median
    over the ranks and at least ``min_gap_s`` more; else None."""
    if len(local_s) < 2:
        return None
    m = spread(local_s)
    slow, median = m["straggler/local_max_s"], m["straggler/local_median_s"]
    if slow <= factor * median or slow - median <= min_gap_s:
        return None
    return (
        f"straggler: step {step}: rank {int(m['straggler/slowest_rank'])} took {slow:.2f} s for its own work "
        f"of the step, {m['straggler/max_over_median']:.1f} x the median {median:.3f} s over {len(local_s)} ranks"
    )


def straggler_metrics(
    step: int,
    local_s: float,
    device: torch.device,
    factor: float,
    min_gap_s: float,
    log: Callable[[str], None] | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Gathers the step's own-work times (every rank calls it) and returns their spread;
    ``log`` (rank 0's) gets :func:`straggler_line` when there is one."""
    times = gather_local_times(local_s, device, group)
    line = straggler_line(step, times, factor, min_gap_s)
    if log is not None and line is not None:
        log(line)
    return spread(times)
