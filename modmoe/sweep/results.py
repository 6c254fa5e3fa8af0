"""What one point's run directory says: its state, its final validation losses (from
``metrics.jsonl``) and its time records (from the sweep's ``sweep-attempts.jsonl``)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from modmoe.model.flops import parameter_counts
from modmoe.sweep.points import Point, State, SweepError, state

ATTEMPTS = "sweep-attempts.jsonl"  # one line per training attempt: wall and CPU time, exit status, load


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
    load_1m: float | None = None  # mean 1-minute load average at the attempts' starts and ends

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
            "seed": p.seed,
            "grid_point": p.grid_name,
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
            "load_1m": None if self.load_1m is None else round(self.load_1m, 2),
            "status": self.status,
        }


def attempts(point: Point) -> list[dict]:
    path = point.run_dir / ATTEMPTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a crash
        if isinstance(record, dict):
            out.append(record)
    return out


def read_result(point: Point) -> PointResult:
    try:
        status: State | str = state(point)
    except SweepError:
        return PointResult(point, "conflict")
    tries = attempts(point)
    cpu = None if not tries or any("cpu_s" not in a for a in tries) else sum(a["cpu_s"] for a in tries)
    loads = [a[k] for a in tries for k in ("load_1m_start", "load_1m_end") if isinstance(a.get(k), int | float)]
    result = PointResult(
        point,
        status,
        wall_s=sum(a.get("wall_s", 0.0) for a in tries),
        cpu_s=cpu,
        load_1m=statistics.fmean(loads) if loads else None,
    )
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
