"""A sweep's points: one training config per (budget, size, variant, learning rate), trained to
the budget's executed training FLOPs, and where each stands (new, interrupted, finished).

The run directory is the contract with the trainer (``modmoe train``): it writes
``config.yaml`` when it starts, ``metrics.jsonl`` as it goes, checkpoints, and ``COMPLETED`` when
the last step is done; ``--resume auto`` continues from the newest valid checkpoint.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modmoe.config import JobConfig, read_config_file, set_dotted
from modmoe.config_base import ConfigError, validate_config
from modmoe.model.flops import count_flops
from modmoe.nested import first_difference
from modmoe.sweep.spec import SweepSpec

COMPLETED = "COMPLETED"  # written by the trainer after its last step
RECORDED_CONFIG = "config.yaml"  # written by the trainer when it starts
# Parts of a config that do not change what a run computes: a recorded run still counts as this
# point when only these differ (a new MLflow server, another checkpoint interval, no progress bar).
_NOT_COMPARED = (("logging",), ("checkpoint",), ("trainer", "progress_bar"))

State = Literal["new", "interrupted", "finished"]


class SweepError(ConfigError):
    """A sweep problem (bad budget, a run directory that belongs to another config, ...): one line."""


@dataclass(frozen=True)
class Point:
    index: int
    name: str
    budget: float
    size: str
    variant: str
    lr: float
    config: JobConfig
    flops_per_token: float  # executed training FLOPs per token (3 x forward)
    tokens_per_step: int
    repeat_of: str | None = None  # a seed point: the name of the grid point it repeats at another seed
    # The config keys the sweep sets for this point (the base config's, the spec's overrides, what
    # the sweep owns), dotted: what a recorded run must agree with. A key left at its default is
    # not compared, so a later modmoe that changes a default still recognises its earlier points.
    set_keys: tuple[str, ...] = ()

    @property
    def seed(self) -> int:
        return self.config.trainer.seed

    @property
    def grid_name(self) -> str:
        """The (budget, size, variant, lr) this point measures: its own name for a grid point."""
        return self.repeat_of or self.name

    @property
    def max_steps(self) -> int:
        return self.config.trainer.max_steps

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def run_dir(self) -> Path:
        return Path(self.config.trainer.run_dir)

    @property
    def executed_flops(self) -> float:
        """Training FLOPs of all ``max_steps`` steps (<= budget, within one step of it)."""
        return self.max_steps * self.flops_per_step


def budget_label(budget: float) -> str:
    """``5e12``, ``1.5e13``: the budget in point names and tags."""
    mantissa, exponent = f"{budget:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def steps_for_budget(budget: float, flops_per_step: float) -> int:
    """Whole optimizer steps the budget pays for: executed <= budget < executed + one step."""
    # The tolerance keeps float rounding (0.3 / 0.1 = 2.9999999999999996) from costing a step.
    return math.floor(budget / flops_per_step * (1 + 1e-9))


def tracking_uri(spec: SweepSpec) -> str:
    return spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{spec.sweep_dir() / 'mlflow.db'}"


def expand(spec: SweepSpec) -> list[Point]:
    """The grid: every (budget, size, variant, learning rate) at the first seed, in a fixed order;
    raises :class:`ConfigError` naming the point and field for any config or budget problem.
    (The further seeds of each variant's best point: :mod:`modmoe.sweep.seeds`.)"""
    base = read_config_file(spec.base_config)
    uri = tracking_uri(spec)
    points: list[Point] = []
    for budget in spec.budgets:
        for size in spec.sizes:
            for variant in spec.variants:
                for lr in spec.learning_rates or [None]:
                    points.append(point_at(spec, base, uri, len(points), budget, size.name, variant.name, lr))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError("sweep error: budgets: two budgets share a name at 4 significant digits; space them further")
    return points


def point_at(
    spec: SweepSpec,
    base: dict[str, Any],
    uri: str,
    index: int,
    budget: float,
    size: str,
    variant: str,
    lr: float | None,
    seed: int | None = None,
) -> Point:
    """One point: the base config, the common, size and variant overrides, then what the sweep
    sets (LR, seed, budget, schedule, tracking). ``seed`` = None: the grid's (the first of
    ``seeds``); another seed makes a seed point named ``<grid name>_s<seed>``."""
    grid_name = f"{budget_label(budget)}_{size}_{variant}" + (f"_lr{lr:g}" if lr is not None else "")
    first_seed = spec.seeds[0] if spec.seeds else None
    repeat_of = grid_name if seed is not None and seed != first_seed else None
    name = f"{grid_name}_s{seed}" if repeat_of else grid_name
    seed = first_seed if seed is None else seed
    data = copy.deepcopy(base)
    size_arm = next(a for a in spec.sizes if a.name == size)
    variant_arm = next(a for a in spec.variants if a.name == variant)
    for where, overrides in (
        ("overrides", spec.overrides),
        (f"sizes.{size}.overrides", size_arm.overrides),
        (f"variants.{variant}.overrides", variant_arm.overrides),
    ):
        for key, value in overrides.items():
            set_dotted(data, key, value, source=f"sweep {where}.{key}")
    if lr is not None:
        set_dotted(data, "optimizer.lr", lr)
    if seed is not None:
        set_dotted(data, "trainer.seed", seed)
    return _resolve(spec, index, name, budget, size, variant, data, uri, repeat_of)


def _resolve(
    spec: SweepSpec,
    index: int,
    name: str,
    budget: float,
    size: str,
    variant: str,
    data: dict,
    uri: str,
    repeat_of: str | None,
) -> Point:
    def validated(what: str) -> JobConfig:
        try:
            return validate_config(JobConfig, data)
        except ConfigError as err:
            raise SweepError(f"sweep point {name}{what}: {err}") from None

    probe = validated("")
    flops_per_token = count_flops(probe.model, probe.data.seq_len).training_per_token
    tokens_per_step = probe.trainer.global_batch_size * probe.data.seq_len
    steps = steps_for_budget(budget, flops_per_token * tokens_per_step)
    if steps < spec.schedule.min_steps:
        raise SweepError(
            f"sweep error: budgets: {budget:g} FLOPs buy point {name} only {steps} step(s) of "
            f"{flops_per_token * tokens_per_step:.3g} FLOPs (schedule.min_steps = {spec.schedule.min_steps})"
        )
    rule = spec.schedule
    owned = {
        "trainer.max_steps": steps,
        "optimizer.warmup_steps": round(rule.warmup_fraction * steps),
        "trainer.eval_every": math.ceil(steps / rule.evaluations) if rule.evaluations > 1 else 0,
        "trainer.run_dir": str(spec.sweep_dir() / name),
        "logging.mlflow.experiment": spec.name,
        "logging.mlflow.run_name": name,
        "logging.mlflow.tracking_uri": uri,
        "logging.mlflow.tags": {
            "sweep": spec.name,
            "sweep_point": name,
            "budget": f"{budget:.6g}",
            "variant": variant,
            "size": size,
            "lr": f"{probe.optimizer.lr:g}",
            "max_steps": str(steps),
            "seed": str(probe.trainer.seed),
            "grid_point": repeat_of or name,
        },
    }
    for key, value in owned.items():
        set_dotted(data, key, value)
    cfg = validated(" (with the sweep's budget and schedule)")
    return Point(
        index,
        name,
        budget,
        size,
        variant,
        cfg.optimizer.lr,
        cfg,
        flops_per_token,
        tokens_per_step,
        repeat_of,
        tuple(sorted(_leaf_keys(data))),
    )


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of a nested mapping's leaves (a mapping value of a free-form field, such as
    the MLflow tags, counts as one leaf)."""
    if not isinstance(data, dict) or not data or prefix.endswith("tags"):
        return [prefix] if prefix else []
    return [key for name, value in data.items() for key in _leaf_keys(value, f"{prefix}.{name}" if prefix else name)]


def _at(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for path in _NOT_COMPARED:
        node = out
        for part in path[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with the current defaults filled in for the keys it lacks: a run written
    by an earlier modmoe, before a key existed, ran with what that key's default now means. One
    that no longer validates is compared as it is, so the difference names the key."""
    try:
        return validate_config(JobConfig, copy.deepcopy(recorded)).model_dump(mode="json")
    except ConfigError:
        return recorded


def state(point: Point) -> State:
    """``finished`` (COMPLETED, and the recorded config is this point's), ``interrupted``
    (started with this config, not finished: the trainer resumes it from its newest
    checkpoint), or ``new``. A run directory holding another config is an error: the sweep
    never trains over a run it cannot account for, and never deletes one."""
    recorded_file = point.run_dir / RECORDED_CONFIG
    if not recorded_file.is_file():
        if (point.run_dir / COMPLETED).exists():
            raise SweepError(
                f"sweep error: point {point.name}: {point.run_dir} says COMPLETED but records no config; move it away"
            )
        return "new"
    try:
        recorded = read_config_file(recorded_file)  # bounded YAML, as every config is read
    except ConfigError:
        recorded = None
    if not isinstance(recorded, dict):
        raise SweepError(f"sweep error: {recorded_file}: not a readable config; move the run directory away")
    ours, theirs = comparable(point.config.model_dump(mode="json")), comparable(with_defaults(recorded))
    if point.set_keys:  # what the sweep sets, not every default of the modmoe that ran it
        ours, theirs = ({k: _at(c, k) for k in point.set_keys} for c in (ours, theirs))
    diff = first_difference(theirs, ours)
    if diff is not None:
        key, theirs, ours = diff
        raise SweepError(
            f"sweep error: point {point.name}: {point.run_dir} holds a run with {key} = {theirs!r}, the spec "
            f"gives {ours!r}; move that directory away or change runs_root"
        )
    return "finished" if (point.run_dir / COMPLETED).is_file() else "interrupted"
