"""What a sweep found: one row per point (read from its run directory), the best loss of each
variant at each budget, a markdown table, CSV and JSON, the isoFLOP plot, and an MLflow
summary run in the sweep's experiment holding them as artifacts."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modmoe.model.flops import parameter_counts
from modmoe.sweep.plot import isoflop_plot
from modmoe.sweep.points import Point, State, SweepError, state, tracking_uri
from modmoe.sweep.runner import attempts
from modmoe.sweep.spec import SweepSpec

TABLE_MD, TABLE_CSV, RESULTS_JSON, PLOT_PNG = "sweep.md", "points.csv", "results.json", "isoflop.png"
SUMMARY_RUN = "summary_run.json"  # the MLflow summary run's id, so a new report updates it


@dataclass
class PointResult:
    point: Point
    status: State | str
    steps: int = 0
    loss_topk: float | None = None
    loss_causal: float | None = None
    causal_agreement: float | None = None
    wall_s: float = 0.0  # all attempts, as measured around `modmoe train`
    cpu_s: float | None = None  # CPU time of all attempts (None when an attempt did not record it)
    step_time_s: float = 0.0  # sum of the trainer's step times (training only)

    @property
    def routed(self) -> bool:
        """True when the model decides per token with a depth router (so causal != top-k)."""
        d = self.point.config.model.depth
        return d.enabled and d.variant == "staged"

    def row(self) -> dict[str, Any]:
        p, counts = self.point, parameter_counts(self.point.config.model)
        return {
            "point": p.name,
            "budget": p.budget,
            "size": p.size,
            "variant": p.variant,
            "lr": p.lr,
            "params_total": counts["total"],
            "params_active": counts["active"],
            "train_flops_per_token": p.flops_per_token,
            "tokens_per_step": p.tokens_per_step,
            "max_steps": p.max_steps,
            "steps": self.steps,
            "executed_flops": self.steps * p.flops_per_step,
            "budget_used": self.steps * p.flops_per_step / p.budget,
            "loss_topk": self.loss_topk,
            "loss_causal": self.loss_causal,
            "causal_agreement": self.causal_agreement,
            "wall_s": round(self.wall_s, 1),
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 1),
            "step_time_s": round(self.step_time_s, 1),
            "status": self.status,
        }


def read_result(point: Point) -> PointResult:
    try:
        status: State | str = state(point)
    except SweepError:
        return PointResult(point, "conflict")
    tries = attempts(point)
    cpu = None if not tries or any("cpu_s" not in a for a in tries) else sum(a["cpu_s"] for a in tries)
    result = PointResult(point, status, wall_s=sum(a.get("wall_s", 0.0) for a in tries), cpu_s=cpu)
    metrics = point.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return result
    final_eval = None
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        result.steps = max(result.steps, int(record.get("step", 0)))
        result.step_time_s += float(record.get("step_time_s", 0.0))
        if "eval/loss_topk" in record:
            final_eval = record
    if status == "finished" and final_eval is not None and final_eval.get("step") == point.max_steps:
        result.loss_topk = final_eval["eval/loss_topk"]
        result.loss_causal = final_eval.get("eval/loss_causal")
        result.causal_agreement = final_eval.get("eval/causal_agreement")
    return result


def summarize(spec: SweepSpec, results: list[PointResult]) -> list[dict[str, Any]]:
    """Per budget and variant: the best top-k and causal loss over sizes and learning rates, and
    the relative difference of the best top-k loss from the baseline's at that budget."""
    rows = []
    for budget in spec.budgets:
        best: dict[str, dict[str, Any]] = {}
        for variant in spec.variant_names:
            done = [
                r
                for r in results
                if r.point.budget == budget and r.point.variant == variant and r.loss_topk is not None
            ]
            if not done:
                continue
            top = min(done, key=lambda r: r.loss_topk)
            causal = min(done, key=lambda r: r.loss_causal if r.loss_causal is not None else float("inf"))
            best[variant] = {
                "budget": budget,
                "variant": variant,
                "best_loss_topk": top.loss_topk,
                "best_point": top.point.name,
                "size": top.point.size,
                "lr": top.point.lr,
                "steps": top.steps,
                "best_loss_causal": causal.loss_causal if top.routed else None,
                "causal_agreement": top.causal_agreement if top.routed else None,
                "runs": len(done),
                "wall_s_mean": sum(r.wall_s for r in done) / len(done),
            }
        base = best.get(spec.baseline_name)
        for row in best.values():
            row["vs_baseline"] = row["best_loss_topk"] / base["best_loss_topk"] - 1 if base else None
            row["at_or_below_baseline"] = None if base is None else row["best_loss_topk"] <= base["best_loss_topk"]
            rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(spec: SweepSpec, summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    out = [
        f"# Sweep {spec.name}",
        "",
        f"Base config `{spec.base_config}`; baseline variant `{spec.baseline_name}`; budgets in executed "
        "training FLOPs; losses are the final validation loss (nats/token) under top-k and causal routing.",
        "",
        "## Best loss of each variant at each budget (over sizes and learning rates)",
        "",
        "| budget | variant | best loss top-k | vs baseline | at or below baseline | best loss causal | "
        "causal agreement | size | lr | steps | runs | mean wall s |",
        "|---:|---|---:|---:|:-:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary:
        vs = "-" if r["vs_baseline"] is None else f"{r['vs_baseline']:+.2%}"
        out.append(
            f"| {r['budget']:.3g} | {r['variant']} | {_fmt(r['best_loss_topk'])} | {vs} | "
            f"{_fmt(r['at_or_below_baseline'])} | {_fmt(r['best_loss_causal'])} | {_fmt(r['causal_agreement'], 3)} | "
            f"{r['size']} | {r['lr']:g} | {r['steps']} | {r['runs']} | {r['wall_s_mean']:.0f} |"
        )
    out += [
        "",
        "## Every point",
        "",
        "| point | params (active) | MFLOP/token | steps | budget used | loss top-k | loss causal | agreement | "
        "wall s | CPU s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['point']} | {r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M) | "
            f"{r['train_flops_per_token'] / 1e6:.2f} | {r['steps']}/{r['max_steps']} | {r['budget_used']:.4f} | "
            f"{_fmt(r['loss_topk'])} | {_fmt(r['loss_causal'])} | {_fmt(r['causal_agreement'], 3)} | "
            f"{r['wall_s']:.0f} | {_fmt(r['cpu_s'], 0)} | {r['status']} |"
        )
    return "\n".join(out) + "\n"


def write_report(spec: SweepSpec, points: list[Point], echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Writes the table (markdown, CSV, JSON) and the plot into the sweep directory, logs them to
    the MLflow summary run (when tracking is on), and returns their paths."""
    results = [read_result(p) for p in points]
    rows = [r.row() for r in results]
    summary = summarize(spec, results)
    out_dir = spec.sweep_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (TABLE_MD, TABLE_CSV, RESULTS_JSON, PLOT_PNG)}
    paths[TABLE_MD].write_text(markdown(spec, summary, rows))
    with paths[TABLE_CSV].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths[RESULTS_JSON].write_text(
        json.dumps({"sweep": spec.name, "baseline": spec.baseline_name, "summary": summary, "points": rows}, indent=1)
    )
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {
        v: {"topk": [], "causal": []} for v in spec.variant_names
    }
    for r in summary:
        curves[r["variant"]]["topk"].append((r["budget"], r["best_loss_topk"]))
        if r["best_loss_causal"] is not None:
            curves[r["variant"]]["causal"].append((r["budget"], r["best_loss_causal"]))
    scatter = {
        v: [
            (r.row()["executed_flops"], r.loss_topk)
            for r in results
            if r.point.variant == v and r.loss_topk is not None
        ]
        for v in spec.variant_names
    }
    isoflop_plot(curves, scatter, f"isoFLOP: {spec.name} (solid: top-k routing, dashed: causal)", paths[PLOT_PNG])
    done = sum(r.status == "finished" for r in results)
    echo(f"report: {done}/{len(results)} points finished; {paths[TABLE_MD]}, {paths[TABLE_CSV]}, {paths[PLOT_PNG]}")
    if points[0].config.logging.mlflow.enabled:
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
