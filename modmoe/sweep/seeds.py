"""A sweep's plan: the grid (every budget, size, variant and LR at the first seed), then the
further seeds of each variant's best grid point at each budget.

Which point is best is known only once that variant's grid at that budget has finished, so a
seed point is a *slot* until then. Slots have fixed indices after the grid's (budget, variant,
seed order), so ``--point INDEX`` names the same slot before and after its point is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from modmoe.config import read_config_file
from modmoe.sweep.analysis import best_grid_result, grid_results
from modmoe.sweep.points import Point, SweepError, point_at, tracking_uri
from modmoe.sweep.results import read_result
from modmoe.sweep.spec import SweepSpec


@dataclass(frozen=True)
class SeedSlot:
    """A further seed of one variant's best grid point at one budget."""

    index: int
    budget: float
    variant: str
    seed: int
    point: Point | None  # None while the grid of (budget, variant) has not finished
    grid_finished: int  # grid points of (budget, variant) with a final loss ...
    grid_total: int  # ... of this many

    def describe(self) -> str:
        return f"seed {self.seed} of the best {self.budget:.3g} {self.variant} point"


@dataclass(frozen=True)
class Plan:
    grid: list[Point]
    slots: list[SeedSlot]

    @property
    def seed_points(self) -> list[Point]:
        return [s.point for s in self.slots if s.point is not None]

    @property
    def waiting(self) -> list[SeedSlot]:
        return [s for s in self.slots if s.point is None]

    @property
    def points(self) -> list[Point]:
        """Every point known now, in index order: the grid, then the seed points."""
        return self.grid + self.seed_points

    def run_order(self) -> list[Point]:
        """Budget by budget: the grid's points, then the seed points (so a stopped study has its
        smaller budget complete first)."""
        rank = {b: i for i, b in enumerate(sorted({p.budget for p in self.grid}))}
        return sorted(self.points, key=lambda p: (rank[p.budget], p.repeat_of is not None, p.index))

    def find(self, key: str) -> Point:
        """A point by index (a Slurm array task id) or by name; a slot whose point is not known
        yet is an error saying what it waits for."""
        for slot in self.slots:
            if key == str(slot.index) and slot.point is None:
                raise SweepError(
                    f"sweep error: --point {key}: {slot.describe()} waits for that grid "
                    f"({slot.grid_finished} of {slot.grid_total} points finished)"
                )
        for p in self.points:
            if key in (str(p.index), p.name):
                return p
        total = len(self.grid) + len(self.slots)
        raise SweepError(
            f"sweep error: --point {key}: no such point (0..{total - 1} or a name such as {self.grid[0].name})"
        )


def make_plan(spec: SweepSpec, grid: list[Point]) -> Plan:
    """The grid and its seed slots, each slot's point filled in where its grid has finished
    (read from the run directories now)."""
    extra = (spec.seeds or [])[1:]
    if not extra:
        return Plan(grid, [])
    results = [read_result(p) for p in grid]
    base = read_config_file(spec.base_config)
    uri = tracking_uri(spec)
    slots: list[SeedSlot] = []
    for budget in spec.budgets:
        for variant in spec.variant_names:
            cell = grid_results(results, budget, variant)
            finished = sum(r.loss_topk is not None for r in cell)
            best = best_grid_result(cell) if finished == len(cell) else None
            for seed in extra:
                index = len(grid) + len(slots)
                point = None
                if best is not None:
                    b = best.point
                    lr = b.lr if spec.learning_rates else None
                    point = point_at(spec, base, uri, index, budget, b.size, variant, lr, seed=seed)
                slots.append(SeedSlot(index, budget, variant, seed, point, finished, len(cell)))
    return Plan(grid, slots)
