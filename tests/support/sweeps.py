"""Small sweep specs for the sweep tests: the ~0.3M-parameter model of ``runs.small_overrides``."""

from __future__ import annotations

from pathlib import Path

import yaml
from runs import REPO, small_overrides

from modmoe.config import parse_override
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
