"""What a sweep found (:mod:`modmoe.sweep.analysis`), printed and written: the best point of each
variant at each budget with its seed spread, the gap from the baseline, the equal-time tables,
one row per point, as markdown, CSV and JSON, the isoFLOP plot, and an MLflow summary run in the
sweep's experiment holding them as artifacts."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modmoe.sweep.analysis import (
    EqualTimeRow,
    SeedGap,
    SeedSpread,
    VariantBest,
    configurations,
    equal_time,
    seed_gaps,
    summarize,
)
from modmoe.sweep.plot import VariantCurve, isoflop_plot
from modmoe.sweep.points import tracking_uri
from modmoe.sweep.results import read_result
from modmoe.sweep.seeds import Plan, SeedSlot
from modmoe.sweep.spec import SweepSpec

TABLE_MD, TABLE_CSV, RESULTS_JSON, PLOT_PNG = "sweep.md", "points.csv", "results.json", "isoflop.png"
SUMMARY_RUN = "summary_run.json"  # the MLflow summary run's id, so a new report updates it


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _spread(s: SeedSpread) -> str:
    std = "-" if s.std is None else f"{s.std:.4f}"
    return f"{s.mean:.4f} ± {std} (n={s.n})"


def findings(
    spec: SweepSpec,
    bests: list[VariantBest],
    gaps: list[SeedGap],
    timed: list[EqualTimeRow],
    waiting: list[SeedSlot],
) -> str:
    """What the sweep found, in markdown: what ``--report`` prints and ``sweep.md`` begins with."""
    out = [
        "## Each variant's best point at each budget (its isoFLOP-optimal size and LR)",
        "",
        "Chosen by the final top-k validation loss at the first seed over sizes and LRs; then the same "
        "(size, lr) at every seed: mean ± sample standard deviation (n - 1), min-max and n. "
        "`edge`: the best is the smallest/largest size (or lowest/highest LR) tried, so the optimum may lie "
        "beyond. `grid`: grid points finished of those at this budget and variant (the best is provisional "
        "until all have). `vs baseline`: seed mean against the baseline's.",
        "",
        "| budget | variant | size | lr | edge | steps | loss (first seed) | seeds: mean ± std (n) | min-max | "
        "vs baseline | best loss causal | causal agreement | grid |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in bests:
        edge = ", ".join(e for e in (b.size_edge and f"{b.size_edge} size", b.lr_edge and f"{b.lr_edge} lr") if e)
        vs = "-" if b.vs_baseline is None else f"{b.vs_baseline:+.2%}"
        out.append(
            f"| {b.budget:.3g} | {b.variant} | {b.size} | {b.lr:g} | {edge or '-'} | {b.steps} | "
            f"{b.loss_topk:.4f} | {_spread(b.seeds)} | {b.seeds.low:.4f}-{b.seeds.high:.4f} | {vs} | "
            f"{_fmt(b.best_loss_causal)} | {_fmt(b.causal_agreement, 3)} | {b.grid_finished}/{b.grid_total} |"
        )
    out += [
        "",
        f"## Gap from the baseline's best ({spec.baseline_name}) over seeds",
        "",
        "Gap: the variant's seed mean minus the baseline's (nats/token; negative: the variant is lower). Spread: "
        "sample standard deviation (n - 1) and min-max over the n seeds of each side. The gap exceeds the spread "
        "when the two min-max ranges do not overlap (every seed of one side below every seed of the other); "
        "`-` with fewer than 2 seeds on a side.",
        "",
        "| budget | variant | gap | gap % | variant: mean ± std (n) | variant min-max | baseline: mean ± std (n) | "
        "baseline min-max | gap exceeds spread |",
        "|---:|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for g in gaps:
        v, r = g.variant_loss, g.baseline_loss
        out.append(
            f"| {g.budget:.3g} | {g.variant} | {g.difference:+.4f} | {g.relative:+.2%} | {_spread(v)} | "
            f"{v.low:.4f}-{v.high:.4f} | {_spread(r)} | {r.low:.4f}-{r.high:.4f} | {_fmt(g.exceeds_spread)} |"
        )
    for clock, what in (
        ("cpu", "CPU seconds (user + system of the trainer, all attempts: its time alone on one core per thread)"),
        ("wall", "wall seconds (all attempts; they grow with the machine's load)"),
    ):
        rows = [t for t in timed if t.clock == clock]
        out += [
            "",
            f"## Equal time, in {clock} seconds",
            "",
            f"Time budgets: the time each variant's best point took at each FLOP budget, in {what} (a seed "
            "mean; startup and evaluation included). Each cell: the variant's lowest seed-mean loss among all its "
            "points (any budget, "
            "size, LR) that took at most that long, with the point and its time.",
            "",
            "| time budget s | set by | " + " | ".join(spec.variant_names) + " | lowest |",
            "|---:|---|" + "---:|" * len(spec.variant_names) + "---|",
        ]
        for t in rows:
            cells = ["-" if e.loss is None else f"{e.loss:.4f} ({e.point}, {e.time_s:.0f} s)" for e in t.entries]
            out.append(f"| {t.time_s:.0f} | {t.set_by} | " + " | ".join(cells) + f" | {t.winner or '-'} |")
    if waiting:
        out += ["", "## Seed points waiting for their grid", ""]
        out += [f"- {s.describe()}: {s.grid_finished} of {s.grid_total} grid points finished" for s in waiting]
    return "\n".join(out) + "\n"


def markdown(spec: SweepSpec, found: str, rows: list[dict[str, Any]]) -> str:
    out = [
        f"# Sweep {spec.name}",
        "",
        f"Base config `{spec.base_config}`; baseline variant `{spec.baseline_name}`; budgets in executed "
        "training FLOPs; losses are the final validation loss (nats/token) under top-k and causal routing.",
        "",
        found.rstrip("\n"),
        "",
        "## Every point",
        "",
        "Wall and CPU seconds summed over attempts; load: the mean 1-minute load average at the attempts' "
        "starts and ends.",
        "",
        "| point | seed | params (active) | MFLOP/token | steps | budget used | loss top-k | loss causal | "
        "agreement | wall s | CPU s | load | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['point']} | {r['seed']} | {r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M) | "
            f"{r['train_flops_per_token'] / 1e6:.2f} | {r['steps']}/{r['max_steps']} | {r['budget_used']:.4f} | "
            f"{_fmt(r['loss_topk'])} | {_fmt(r['loss_causal'])} | {_fmt(r['causal_agreement'], 3)} | "
            f"{r['wall_s']:.0f} | {_fmt(r['cpu_s'], 0)} | {_fmt(r['load_1m'], 1)} | {r['status']} |"
        )
    return "\n".join(out) + "\n"


def write_report(spec: SweepSpec, plan: Plan, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Prints what the sweep found (best size and LR per variant and budget, the gap with its seed
    spread, the equal-time tables), writes it with every point's row (markdown, CSV, JSON) and the
    plot into the sweep directory, logs them to the MLflow summary run (when tracking is on), and
    returns their paths."""
    results = [read_result(p) for p in plan.points]
    rows = [r.row() for r in results]
    bests = summarize(spec, results)
    gaps = seed_gaps(spec, bests)
    configs = configurations(results)
    timed = equal_time(spec, bests, configs, "cpu") + equal_time(spec, bests, configs, "wall")
    found = findings(spec, bests, gaps, timed, plan.waiting)
    out_dir = spec.sweep_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (TABLE_MD, TABLE_CSV, RESULTS_JSON, PLOT_PNG)}
    paths[TABLE_MD].write_text(markdown(spec, found, rows))
    with paths[TABLE_CSV].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    results_json = {
        "sweep": spec.name,
        "baseline": spec.baseline_name,
        "seeds": spec.seeds,
        "summary": [asdict(b) for b in bests],
        "gaps": [asdict(g) for g in gaps],
        "equal_time": [asdict(t) for t in timed],
        "waiting": [{"index": s.index, "what": s.describe()} for s in plan.waiting],
        "points": rows,
    }
    paths[RESULTS_JSON].write_text(json.dumps(results_json, indent=1))
    curves = {v: VariantCurve() for v in spec.variant_names}
    for b in bests:
        curves[b.variant].topk.append((b.budget, b.seeds.mean, b.seeds.low, b.seeds.high))
        if b.best_loss_causal is not None:
            curves[b.variant].causal.append((b.budget, b.best_loss_causal))
    scatter = {
        v: [
            (r.row()["executed_flops"], r.loss_topk)
            for r in results
            if r.point.variant == v and r.loss_topk is not None
        ]
        for v in spec.variant_names
    }
    title = f"isoFLOP: {spec.name} (solid: top-k, seed mean and min-max; dashed: causal)"
    isoflop_plot(curves, scatter, title, paths[PLOT_PNG])
    echo(found.rstrip("\n"))
    done = sum(r.status == "finished" for r in results)
    echo(f"report: {done}/{len(results)} points finished; {paths[TABLE_MD]}, {paths[TABLE_CSV]}, {paths[PLOT_PNG]}")
    if plan.grid[0].config.logging.mlflow.enabled:
        _log_summary_run(spec, paths, echo)
    return paths


def _log_summary_run(spec: SweepSpec, paths: dict[str, Path], echo: Callable[[str], None]) -> None:
    from modmoe.tracking import MlflowTracker, TrackingConfig

    summary_dir = spec.sweep_dir() / "summary"
    id_file = summary_dir / SUMMARY_RUN
    run_id = json.loads(id_file.read_text()).get("run_id") if id_file.is_file() else None
    cfg = TrackingConfig(
        tracking_uri=tracking_uri(spec),
        experiment=spec.name,
        run_name=f"{spec.name}-summary",
        tags={"sweep": spec.name, "sweep_role": "summary"},
    )
    with MlflowTracker(cfg, summary_dir, run_id=run_id) as tracker:
        for path in paths.values():
            tracker.log_artifact(path)
        if tracker.run_id:
            id_file.write_text(json.dumps({"run_id": tracker.run_id}) + "\n")
            echo(f"report: MLflow run {tracker.run_id} in experiment {spec.name!r} at {cfg.tracking_uri}")
