"""Seeds and what the report concludes, without training: the best grid point of each variant at
each budget, its further seeds (slots until its grid has finished, then points), the order a
local sweep trains them in, the seed spread and the gap's verdict, and the equal-time tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweeps import fake_finished, write_spec

from modmoe.config_base import ConfigError
from modmoe.sweep import SweepError, expand, load_spec, make_plan, state
from modmoe.sweep import runner as sweep_runner
from modmoe.sweep.analysis import Configuration, SeedSpread, VariantBest, equal_time, seed_gaps, summarize
from modmoe.sweep.report import write_report
from modmoe.sweep.results import read_result

SIZES = [{"name": "d32", "overrides": {"model.dim": 32}}, {"name": "d64", "overrides": {"model.dim": 64}}]
# First-seed losses of the grid: moe is best at d64 lr 0.01, mode at d32 lr 0.003.
GRID_LOSSES = {
    "d32_moe_lr0.003": 5.2,
    "d32_moe_lr0.01": 5.1,
    "d64_moe_lr0.003": 5.05,
    "d64_moe_lr0.01": 5.0,
    "d32_mode_lr0.003": 4.7,
    "d32_mode_lr0.01": 4.9,
    "d64_mode_lr0.003": 4.8,
    "d64_mode_lr0.01": 4.85,
}


def _spec(tmp_path: Path, **fields):
    fields = {"budgets": [3e10], "sizes": SIZES, "learning_rates": [0.003, 0.01], "seeds": [7, 8, 9], **fields}
    no_mlflow = {"logging.mlflow.enabled": False}
    return load_spec(
        write_spec(tmp_path / "spec.yaml", str(tmp_path / "data"), tmp_path / "runs", extra=no_mlflow, **fields)
    )


def _grid_loss(name: str) -> float:
    return GRID_LOSSES[name.split("_", 1)[1]]


@pytest.mark.parametrize(
    "fields, where",
    [
        ({"seeds": [1, 1]}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
        ({"seeds": []}, "seeds"),
        ({"variants": [{"name": "a", "overrides": {"trainer.seed": 3}}]}, "variants.a.overrides.trainer.seed"),
    ],
)
def test_bad_seeds_give_one_line_naming_the_field(tmp_path: Path, fields: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand(_spec(tmp_path, **fields))
    assert "\n" not in str(info.value) and where in str(info.value), info.value


def test_the_grid_runs_at_the_first_seed_and_keeps_its_names(tmp_path: Path) -> None:
    grid = expand(_spec(tmp_path))
    assert len(grid) == 8 and {p.seed for p in grid} == {7} and all(p.repeat_of is None for p in grid)
    assert grid[0].name == "3e10_d32_moe_lr0.003" and grid[0].config.logging.mlflow.tags["seed"] == "7"
    # Without seeds a point keeps the base config's seed, and the spec's --set reaches the points.
    plain = expand(_spec(tmp_path, seeds=None))
    assert [p.name for p in plain] == [p.name for p in grid] and plain[0].seed == 1234
    moved = load_spec(tmp_path / "spec.yaml", ["runs_root=/elsewhere", "overrides.trainer.eval_batches=3"])
    assert moved.sweep_dir() == Path("/elsewhere/small") and moved.overrides["trainer.eval_batches"] == 3


def test_seed_points_follow_the_best_grid_point_once_its_grid_has_finished(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    grid = expand(spec)
    plan = make_plan(spec, grid)
    assert [s.index for s in plan.slots] == [8, 9, 10, 11] and plan.seed_points == []
    with pytest.raises(
        SweepError, match=r"--point 10: seed 8 of the best 3e\+10 mode point waits for that grid \(0 of 4"
    ):
        plan.find("10")
    for p in grid:
        if p.variant == "moe":
            fake_finished(p, _grid_loss(p.name))
    fake_finished(next(p for p in grid if p.name == "3e10_d32_mode_lr0.003"), 4.7)
    plan = make_plan(spec, grid)
    moe_seeds = plan.seed_points
    # moe's grid has finished: its best (d64, lr 0.01) runs at seeds 8 and 9; mode's still waits (1 of 4).
    assert [p.name for p in moe_seeds] == ["3e10_d64_moe_lr0.01_s8", "3e10_d64_moe_lr0.01_s9"]
    assert [p.index for p in moe_seeds] == [8, 9] and [s.grid_finished for s in plan.waiting] == [1, 1]
    best = next(p for p in grid if p.name == "3e10_d64_moe_lr0.01")
    for p, seed in zip(moe_seeds, (8, 9)):
        assert p.repeat_of == best.name and p.seed == seed and p.lr == 0.01 and p.size == "d64"
        assert p.max_steps == best.max_steps and p.config.model == best.config.model
        assert p.config.logging.mlflow.tags["grid_point"] == best.name
        assert state(p) == "new" and plan.find(str(p.index)) == p == plan.find(p.name)
    # The run order: the grid of the budget, then its seed points.
    assert [p.name for p in plan.run_order()][-2:] == [p.name for p in moe_seeds]


def test_a_local_sweep_trains_each_budgets_grid_then_its_seeds(tmp_path: Path, monkeypatch) -> None:
    spec = _spec(tmp_path, budgets=[3e10, 9e10], sizes=SIZES[:1], learning_rates=[0.003, 0.01])
    grid = expand(spec)
    trained: list[str] = []

    def fake_run_point(spec, point, echo):
        trained.append(point.name)
        if state(point) != "finished":
            fake_finished(point, _grid_loss(point.grid_name) + point.seed / 100)
        return 0

    monkeypatch.setattr(sweep_runner, "run_point", fake_run_point)
    monkeypatch.setattr(sweep_runner, "prepare_data_once", lambda points, echo: None)
    assert sweep_runner.run_local(spec, grid, print) == []
    grid_3, grid_9 = [p.name for p in grid[:4]], [p.name for p in grid[4:]]
    seeds_3 = [
        "3e10_d32_moe_lr0.01_s8",
        "3e10_d32_moe_lr0.01_s9",
        "3e10_d32_mode_lr0.003_s8",
        "3e10_d32_mode_lr0.003_s9",
    ]
    seeds_9 = [n.replace("3e10", "9e10") for n in seeds_3]
    assert trained == grid_3 + seeds_3 + grid_9 + seeds_9
    assert all(state(p) == "finished" for p in make_plan(spec, grid).points)


def test_spread_arithmetic_and_whether_the_gap_exceeds_it() -> None:
    s = SeedSpread.of([4.0, 4.2, 4.1])
    assert s.n == 3 and s.mean == pytest.approx(4.1) and s.std == pytest.approx(0.1)  # n - 1 denominator
    assert (s.low, s.high) == (4.0, 4.2)
    one = SeedSpread.of([5.0])
    assert one.std is None and one.low == one.high == 5.0
    assert s.overlaps(SeedSpread.of([4.2, 4.5])) and not s.overlaps(SeedSpread.of([4.21, 4.5]))
    with pytest.raises(ValueError):
        SeedSpread.of([])

    def best(variant: str, losses: list[float]) -> VariantBest:
        spread = SeedSpread.of(losses)
        return VariantBest(
            1e12, variant, f"p_{variant}", "d64", 0.003, 10, losses[0], spread, 2, 2, None, None, None, None, None
        )

    class Spec:
        baseline_name = "moe"

    gaps = seed_gaps(
        Spec(), [best("moe", [5.0, 5.1, 5.05]), best("a", [4.8, 4.9, 4.85]), best("b", [4.95, 5.0]), best("c", [4.0])]
    )
    by = {g.variant: g for g in gaps}
    assert by["a"].difference == pytest.approx(-0.2) and by["a"].relative == pytest.approx(4.85 / 5.05 - 1)
    assert by["a"].exceeds_spread is True  # 4.8-4.9 below 5.0-5.1
    assert by["b"].exceeds_spread is False  # 4.95-5.0 touches 5.0
    assert by["c"].exceeds_spread is None  # one seed: no spread to compare with


def test_best_point_per_variant_is_chosen_on_the_first_seed_with_its_seed_spread(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    grid = expand(spec)
    for p in grid:
        fake_finished(p, _grid_loss(p.name))
    seeds = make_plan(spec, grid).seed_points
    seed_loss = {"moe": (5.02, 5.04), "mode": (4.72, 4.68)}
    for p in seeds:
        fake_finished(p, seed_loss[p.variant][p.seed - 8])
    results = [read_result(p) for p in grid + seeds]
    # A seed point's lower loss does not move the choice: it is made on the first seed.
    fake_finished(next(p for p in grid if p.name == "3e10_d32_moe_lr0.003"), 5.2)
    bests = {b.variant: b for b in summarize(spec, results)}
    moe, mode = bests["moe"], bests["mode"]
    assert (moe.point, moe.size, moe.lr, moe.loss_topk) == ("3e10_d64_moe_lr0.01", "d64", 0.01, 5.0)
    assert (mode.point, mode.size, mode.lr) == ("3e10_d32_mode_lr0.003", "d32", 0.003)
    assert moe.seeds == SeedSpread.of([5.0, 5.02, 5.04]) and mode.seeds == SeedSpread.of([4.7, 4.72, 4.68])
    assert (moe.size_edge, moe.lr_edge) == ("largest", "highest")  # the optimum may lie beyond both
    assert (mode.size_edge, mode.lr_edge) == ("smallest", "lowest")
    assert moe.complete and mode.vs_baseline == pytest.approx(4.7 / 5.02 - 1)
    gap = seed_gaps(spec, list(bests.values()))[0]
    assert gap.exceeds_spread is True and gap.difference == pytest.approx(4.7 - 5.02)


def test_equal_time_tables_take_each_variants_lowest_loss_within_each_time() -> None:
    def config(point: str, variant: str, loss: float, cpu: float | None, wall: float) -> Configuration:
        return Configuration(point, 1.0, variant, SeedSpread.of([loss]), cpu, wall)

    configs = [
        config("small_moe", "moe", 5.0, 100.0, 300.0),
        config("big_moe", "moe", 4.5, 300.0, 500.0),
        config("small_mode", "mode", 4.8, 150.0, 200.0),
        config("big_mode", "mode", 4.3, 400.0, 450.0),
    ]
    spread = SeedSpread.of([0.0])
    bests = [
        VariantBest(1.0, "moe", "small_moe", "d", 0.1, 1, 5.0, spread, 1, 1, None, None, None, None, None),
        VariantBest(1.0, "mode", "small_mode", "d", 0.1, 1, 4.8, spread, 1, 1, None, None, None, None, None),
        VariantBest(2.0, "moe", "big_moe", "d", 0.1, 1, 4.5, spread, 1, 1, None, None, None, None, None),
        VariantBest(2.0, "mode", "big_mode", "d", 0.1, 1, 4.3, spread, 1, 1, None, None, None, None, None),
    ]

    class Spec:
        variant_names = ["moe", "mode"]

    cpu = equal_time(Spec(), bests, configs, "cpu")
    assert [(r.time_s, r.set_by, r.winner) for r in cpu] == [
        (100.0, "moe at 1", "moe"),  # mode's cheapest point took 150 s: nothing of mode fits
        (150.0, "mode at 1", "mode"),
        (300.0, "moe at 2", "moe"),  # 4.5 within 300 s against mode's 4.8
        (400.0, "mode at 2", "mode"),
    ]
    assert cpu[0].entries[1].loss is None and cpu[2].entries[0].point == "big_moe"
    wall = equal_time(Spec(), bests, configs, "wall")
    assert [(r.time_s, r.winner) for r in wall] == [(200.0, "mode"), (300.0, "mode"), (450.0, "mode"), (500.0, "mode")]
    # A point without a CPU record is left out of the CPU table only.
    configs[1] = config("big_moe", "moe", 4.5, None, 500.0)
    assert [r.time_s for r in equal_time(Spec(), bests, configs, "cpu")] == [100.0, 150.0, 400.0]


def test_report_prints_the_best_sizes_the_gap_with_its_spread_and_equal_time(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    grid = expand(spec)
    for p in grid:
        fake_finished(p, _grid_loss(p.name), cpu_s=100.0 + p.index, wall_s=200.0 + p.index)
    plan = make_plan(spec, grid)
    for p in plan.seed_points:
        fake_finished(p, _grid_loss(p.repeat_of) + (p.seed - 8.5) / 100, cpu_s=120.0, wall_s=220.0)
    printed: list[str] = []
    paths = write_report(spec, make_plan(spec, grid), printed.append)
    text = "\n".join(printed)
    assert "| 3e+10 | moe | d64 | 0.01 | largest size, highest lr | " in text
    assert "| 3e+10 | mode | d32 | 0.003 | smallest size, lowest lr | " in text
    assert "4.7000 ± 0.0050 (n=3) | 4.6950-4.7050 |" in text  # mode: 4.70, 4.695, 4.705
    assert "| 3e+10 | mode | -0.3000 | -6.00% | " in text and text.count("| yes |") == 1
    assert "## Equal time, in cpu seconds" in text and "## Equal time, in wall seconds" in text
    results = json.loads(paths["results.json"].read_text())
    assert results["gaps"][0]["exceeds_spread"] is True and results["seeds"] == [7, 8, 9]
    assert {r["load_1m"] for r in results["points"]} == {1.5}
    assert "| 3e10_d64_moe_lr0.01_s8 | 8 |" in paths["sweep.md"].read_text()
