"""Small sweep specs for the sweep tests: the ~0.3M-parameter model of ``runs.small_overrides``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from runs import REPO, small_overrides

from modmoe.config import parse_override
from modmoe.sweep.results import ATTEMPTS
from modmoe.sweep.spec import OWNED_KEYS

TINY = REPO / "configs" / "tiny.yaml"
VARIANTS = [
    {"name": "moe", "overrides": {"model.depth.enabled": False}},
    {"name": "mode", "overrides": {"model.depth.capacity": 0.25}},
]


def common_overrides(data_dir: str, **extra) -> dict:
    """``small_overrides`` as a spec's ``overrides`` (without the keys the sweep owns)."""
    out = {}
    for item in small_overrides(data_dir, Path("unused"), **extra):
        path, value = parse_override(item)
        key = ".".join(path)
        if key not in OWNED_KEYS:
            out[key] = value
    out["logging.plots_every_eval"] = False
    return out


def write_spec(
    path: Path, data_dir: str, runs_root: Path, budgets=(3e10,), variants=VARIANTS, extra: dict | None = None, **fields
) -> Path:
    """A spec of the small model; ``extra`` adds common overrides, ``fields`` other spec fields."""
    common = {**common_overrides(data_dir), **(extra or {})}
    if fields.get("learning_rates"):
        common.pop("optimizer.lr")  # the search sets it
    spec = {
        "name": "small",
        "base_config": str(TINY),
        "budgets": list(budgets),
        "runs_root": str(runs_root),
        "overrides": common,
        "variants": variants,
        **fields,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fake_finished(point, loss: float, cpu_s: float | None = 100.0, wall_s: float = 150.0) -> None:
    """Makes ``point``'s run directory look like a finished run with final top-k loss ``loss``
    (what the trainer and the sweep's runner write), without training."""
    run_dir = point.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(point.config.model_dump(mode="json")))
    final = {"step": point.max_steps, "step_time_s": 0.5, "eval/loss_topk": loss}
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "step_time_s": 0.5}) + "\n" + json.dumps(final) + "\n"
    )
    attempt = {"wall_s": wall_s, "load_1m_start": 1.0, "load_1m_end": 2.0}
    if cpu_s is not None:
        attempt["cpu_s"] = cpu_s
    (run_dir / ATTEMPTS).write_text(json.dumps(attempt) + "\n")
    (run_dir / "COMPLETED").write_text(json.dumps({"step": point.max_steps}))
