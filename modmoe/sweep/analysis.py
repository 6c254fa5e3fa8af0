"""What a sweep's results mean, as typed records: each variant's best point at each budget (its
isoFLOP-optimal size and LR, chosen on the first seed), that point's loss over seeds (mean,
standard deviation, min-max), the gap of each variant from the baseline with whether it exceeds
the seed spread, and the equal-time comparison from the sweep's own time records."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from modmoe.sweep.results import PointResult
from modmoe.sweep.spec import SweepSpec

Clock = Literal["cpu", "wall"]


@dataclass(frozen=True)
class SeedSpread:
    """One loss measured at ``n`` seeds."""

    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1 in the denominator); None for n = 1
    low: float  # min over the seeds
    high: float  # max over the seeds

    @classmethod
    def of(cls, values: Sequence[float]) -> SeedSpread:
        if not values:
            raise ValueError("a seed spread needs at least one value")
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(len(values), statistics.fmean(values), std, min(values), max(values))

    def overlaps(self, other: SeedSpread) -> bool:
        """True when the two min-max ranges share a value."""
        return self.low <= other.high and other.low <= self.high


@dataclass(frozen=True)
class VariantBest:
    """A variant's best grid point at one budget: lowest final top-k loss at the first seed over
    sizes and learning rates, so its size is the variant's isoFLOP-optimal size among those tried."""

    budget: float
    variant: str
    point: str  # the grid point's name
    size: str
    lr: float
    steps: int
    loss_topk: float  # at the first seed (the selection)
    seeds: SeedSpread  # the same (size, lr) over every seed that finished, the first included
    grid_finished: int  # grid points of this (budget, variant) with a final loss ...
    grid_total: int  # ... of this many: the best is provisional until they are equal
    size_edge: str | None  # "smallest"/"largest" when the best is at the edge of the sizes tried
    lr_edge: str | None  # "lowest"/"highest" when the best is at the edge of the LRs tried
    best_loss_causal: float | None  # lowest causal-routing loss over the grid (depth-routed variants)
    causal_agreement: float | None  # at the best point (depth-routed variants)
    vs_baseline: float | None  # seed mean / the baseline's seed mean - 1 at this budget

    @property
    def complete(self) -> bool:
        return self.grid_finished == self.grid_total


@dataclass(frozen=True)
class SeedGap:
    """A variant's best against the baseline's best at one budget, over seeds."""

    budget: float
    variant: str
    baseline: str
    variant_loss: SeedSpread
    baseline_loss: SeedSpread
    difference: float  # variant mean - baseline mean (nats/token; negative: the variant is better)
    relative: float  # variant mean / baseline mean - 1
    exceeds_spread: bool | None  # the min-max ranges do not overlap; None with fewer than 2 seeds a side


@dataclass(frozen=True)
class Configuration:
    """One grid point's (budget, size, variant, lr) over the seeds that finished."""

    point: str
    budget: float
    variant: str
    loss: SeedSpread
    cpu_s: float | None  # mean over the seeds; None when a run did not record its CPU time
    wall_s: float  # mean over the seeds


@dataclass(frozen=True)
class TimedLoss:
    """A variant's lowest loss among its configurations that took at most a given time."""

    variant: str
    loss: float | None  # a seed mean; None when none of its configurations fits the time
    point: str | None
    time_s: float | None


@dataclass(frozen=True)
class EqualTimeRow:
    """Which variant reaches the lowest loss within ``time_s`` seconds of one clock."""

    clock: Clock
    time_s: float
    set_by: str  # whose best point's time this is, e.g. "moe at 4e+12"
    entries: list[TimedLoss]
    winner: str | None


def grid_results(results: list[PointResult], budget: float, variant: str) -> list[PointResult]:
    return [r for r in results if r.point.repeat_of is None and r.point.budget == budget and r.point.variant == variant]


def best_grid_result(grid: list[PointResult]) -> PointResult | None:
    """The grid point with the lowest final top-k loss (the first in grid order on a tie);
    None when none has finished."""
    done = [r for r in grid if r.loss_topk is not None]
    return min(done, key=lambda r: (r.loss_topk, r.point.index)) if done else None


def _edge(chosen: float, tried: set[float], low: str, high: str) -> str | None:
    if len(tried) < 2:
        return None
    return low if chosen == min(tried) else high if chosen == max(tried) else None


def seed_losses(results: list[PointResult], grid_point: str) -> list[float]:
    """The final top-k losses of one grid point's (size, lr) at every seed that finished."""
    return [r.loss_topk for r in results if r.point.grid_name == grid_point and r.loss_topk is not None]


def summarize(spec: SweepSpec, results: list[PointResult]) -> list[VariantBest]:
    """Each variant's best point at each budget (where one has finished), budget by budget."""
    out: list[VariantBest] = []
    for budget in spec.budgets:
        bests: dict[str, tuple[PointResult, list[PointResult]]] = {}
        for variant in spec.variant_names:
            grid = grid_results(results, budget, variant)
            top = best_grid_result(grid)
            if top is not None:
                bests[variant] = (top, grid)
        base = bests.get(spec.baseline_name)
        base_mean = SeedSpread.of(seed_losses(results, base[0].point.name)).mean if base else None
        for variant, (top, grid) in bests.items():
            spread = SeedSpread.of(seed_losses(results, top.point.name))
            causal = [r.loss_causal for r in grid if r.loss_causal is not None]
            sizes = {r.point.flops_per_token for r in grid}
            out.append(
                VariantBest(
                    budget=budget,
                    variant=variant,
                    point=top.point.name,
                    size=top.point.size,
                    lr=top.point.lr,
                    steps=top.steps,
                    loss_topk=top.loss_topk,
                    seeds=spread,
                    grid_finished=sum(r.loss_topk is not None for r in grid),
                    grid_total=len(grid),
                    size_edge=_edge(top.point.flops_per_token, sizes, "smallest", "largest"),
                    lr_edge=_edge(top.point.lr, {r.point.lr for r in grid}, "lowest", "highest"),
                    best_loss_causal=min(causal) if top.routed and causal else None,
                    causal_agreement=top.causal_agreement if top.routed else None,
                    vs_baseline=None if base_mean is None else spread.mean / base_mean - 1,
                )
            )
    return out


def seed_gaps(spec: SweepSpec, bests: list[VariantBest]) -> list[SeedGap]:
    """Every non-baseline variant's best against the baseline's best, at each budget both have."""
    base = {b.budget: b for b in bests if b.variant == spec.baseline_name}
    out = []
    for b in bests:
        ref = base.get(b.budget)
        if b.variant == spec.baseline_name or ref is None:
            continue
        both = b.seeds.n >= 2 and ref.seeds.n >= 2
        out.append(
            SeedGap(
                budget=b.budget,
                variant=b.variant,
                baseline=ref.variant,
                variant_loss=b.seeds,
                baseline_loss=ref.seeds,
                difference=b.seeds.mean - ref.seeds.mean,
                relative=b.seeds.mean / ref.seeds.mean - 1,
                exceeds_spread=not b.seeds.overlaps(ref.seeds) if both else None,
            )
        )
    return out


def configurations(results: list[PointResult]) -> list[Configuration]:
    """The finished runs grouped by grid point (its seeds together), in grid order."""
    groups: dict[str, list[PointResult]] = {}
    for r in sorted(results, key=lambda r: r.point.index):
        if r.loss_topk is not None:
            groups.setdefault(r.point.grid_name, []).append(r)
    out = []
    for name, runs in groups.items():
        cpu = [r.cpu_s for r in runs]
        out.append(
            Configuration(
                point=name,
                budget=runs[0].point.budget,
                variant=runs[0].point.variant,
                loss=SeedSpread.of([r.loss_topk for r in runs]),
                cpu_s=None if None in cpu else statistics.fmean(cpu),
                wall_s=statistics.fmean(r.wall_s for r in runs),
            )
        )
    return out


def equal_time(
    spec: SweepSpec, bests: list[VariantBest], configs: list[Configuration], clock: Clock
) -> list[EqualTimeRow]:
    """The time budgets are the times each variant's best point took at each FLOP budget (a seed
    mean, startup and evaluation included); at each, every variant's lowest seed-mean loss over
    all its configurations (any FLOP budget, size, LR) that took at most that long."""

    def time_of(c: Configuration) -> float | None:
        return c.cpu_s if clock == "cpu" else c.wall_s

    by_name = {c.point: c for c in configs}
    budgets: dict[float, str] = {}
    for b in bests:
        t = time_of(by_name[b.point]) if b.point in by_name else None
        if t is not None and t not in budgets:
            budgets[t] = f"{b.variant} at {b.budget:.3g}"
    rows = []
    for t in sorted(budgets):
        entries = []
        for variant in spec.variant_names:
            fits = [c for c in configs if c.variant == variant and (time_of(c) is not None and time_of(c) <= t)]
            top = min(fits, key=lambda c: c.loss.mean) if fits else None
            entries.append(
                TimedLoss(variant, top.loss.mean, top.point, time_of(top))
                if top
                else TimedLoss(variant, None, None, None)
            )
        ranked = [e for e in entries if e.loss is not None]
        winner = min(ranked, key=lambda e: e.loss).variant if ranked else None
        rows.append(EqualTimeRow(clock, t, budgets[t], entries, winner))
    return rows
