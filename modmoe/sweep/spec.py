"""What a sweep is: ``modmoe sweep SPEC.yaml`` reads one :class:`SweepSpec` (typed, one docstring
per field) and turns it into points (:mod:`modmoe.sweep.points`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from modmoe.config import parse_override, read_config_file, set_dotted
from modmoe.config_base import ConfigError, ConfigModel, field_error, validate_config
from modmoe.launch.config import check_sbatch_options, check_slurm_time

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$"
MAX_SEEDS = 100

# Keys the sweep sets itself for every point: an override of one would silently undo the
# FLOP budget, the schedule rule, the LR search or the one-experiment bookkeeping.
OWNED_KEYS = (
    "trainer.max_steps",
    "trainer.run_dir",
    "trainer.eval_every",
    "optimizer.warmup_steps",
    "logging.mlflow.experiment",
    "logging.mlflow.run_name",
    "logging.mlflow.tags",
    "logging.mlflow.tracking_uri",
)


class SweepArm(ConfigModel):
    """A named set of config overrides: one variant (what is compared) or one model size."""

    name: str = Field(pattern=NAME_PATTERN, max_length=40)
    """Short name; it appears in point names, run directories, MLflow tags and the table."""

    overrides: dict[str, Any] = {}
    """Dotted config keys and their values, e.g. ``{model.depth.enabled: false}``; applied on
    top of the base config and the spec's common ``overrides``."""


class ScheduleRule(ConfigModel):
    """How each point's schedule follows from its own step count (the same rule for every point)."""

    warmup_fraction: float = Field(default=0.05, ge=0.0, le=0.5)
    """Linear warmup over ``round(warmup_fraction * max_steps)`` steps; the cosine then decays
    to ``optimizer.min_lr_ratio * lr`` at ``max_steps``."""

    evaluations: int = Field(default=1, ge=1, le=1000)
    """Evaluations per point, evenly spaced, the last at the final step (the trainer also
    evaluates after its first step). The table uses the final one."""

    min_steps: int = Field(default=10, ge=1)
    """A point whose budget buys fewer optimizer steps than this is an error: its loss would say
    nothing about the variant."""


class SlurmSettings(ConfigModel):
    """How ``modmoe sweep SPEC --slurm`` asks Slurm for the job array (one task per point)."""

    partition: str | None = Field(default=None, pattern=NAME_PATTERN)
    """Slurm partition; ``None`` = the cluster's default."""

    time: str = "04:00:00"
    """Time limit of one array task (one point), in Slurm's syntax (MM, HH:MM:SS, D-HH:MM, ...)."""

    cpus_per_task: int = Field(default=1, ge=1, le=4096)
    """CPUs per point (``--cpus-per-task``); ``threads`` defaults to it under Slurm."""

    gpus_per_task: int = Field(default=0, ge=0, le=64)
    """GPUs per point (``--gpus-per-task``); 0 = CPU."""

    max_parallel: int | None = Field(default=None, ge=1)
    """At most this many points run at once (``--array=...%N``); ``None`` = as Slurm schedules."""

    signal_grace_s: int = Field(default=120, ge=10, le=65535)
    """Seconds before the time limit at which Slurm sends USR1, so the point checkpoints and
    exits; submitting the sweep again resumes it."""

    sbatch_args: list[str] = []
    """Extra ``#SBATCH`` options for the array and the report job, e.g. ``--account=proj``."""

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        return check_slurm_time(value)

    @field_validator("sbatch_args")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        return check_sbatch_options(value)


class SweepSpec(ConfigModel):
    """A grid of training runs, each trained to a fixed budget of executed training FLOPs."""

    name: str = Field(pattern=NAME_PATTERN, max_length=80)
    """Name of the sweep: its directory under ``runs_root`` and its MLflow experiment."""

    base_config: Path
    """Training config (YAML) every point starts from; a relative path is taken relative to the
    spec file."""

    overrides: dict[str, Any] = {}
    """Dotted config keys applied to every point (data, batch size, checkpoint interval, ...)."""

    budgets: list[float] = Field(min_length=1)
    """Training-FLOP budgets, each > 0 (executed FLOPs as ``modmoe.model.flops`` counts them:
    3 x forward). A point trains ``floor(budget / (training FLOPs per token x tokens per
    step))`` steps, so a model that executes fewer FLOPs per token (MoD) trains more steps."""

    variants: list[SweepArm] = Field(min_length=1)
    """What is compared (e.g. MoE-only, MoDE at two capacities, integrated MoDE): one curve each
    in the plot."""

    sizes: list[SweepArm] = [SweepArm(name="base")]
    """Model sizes (overrides of ``model.*`` typically); at each budget the table reports each
    variant's best size, which is how an isoFLOP curve is read."""

    learning_rates: list[float] | None = None
    """Peak learning rates tried at every (budget, size, variant); the best counts. The same
    search for every variant, so none is tuned more than another. ``None`` = the base config's
    ``optimizer.lr``."""

    seeds: list[int] | None = None
    """Seeds of the runs (``trainer.seed``: initialisation and data order). The grid of sizes and
    learning rates runs at the first; once a variant's grid at a budget has finished, its best
    point (lowest final top-k loss) runs again at each further seed, so the report can give each
    variant's best loss a seed mean and spread. ``None`` = the base config's seed, one run per point."""

    baseline: str | None = None
    """Variant the others are compared with in the summary; ``None`` = the first variant."""

    schedule: ScheduleRule = ScheduleRule()
    """Warmup, evaluations and the step floor, derived per point from its own step count."""

    runs_root: Path = Path("runs/sweeps")
    """Parent of the sweep directory ``<runs_root>/<name>``, which holds one run directory per
    point, the table, the plot and (by default) the MLflow database. Relative to the working
    directory."""

    tracking_uri: str | None = None
    """MLflow tracking URI shared by all points; ``None`` = ``MLFLOW_TRACKING_URI`` when set,
    else ``sqlite:///<sweep dir>/mlflow.db`` (use a server when points run on several nodes)."""

    threads: int | None = Field(default=None, ge=1, le=4096)
    """``OMP_NUM_THREADS`` of each point; ``None`` = inherited (under Slurm:
    ``slurm.cpus_per_task``)."""

    slurm: SlurmSettings = SlurmSettings()
    """The job array of ``--slurm``."""

    @field_validator("budgets", "learning_rates")
    @classmethod
    def _positive_unique(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if any(v <= 0 for v in value):
            raise PydanticCustomError("positive", "every entry must be > 0")
        if len(set(value)) != len(value):
            raise PydanticCustomError("distinct", "entries must be distinct")
        return sorted(value)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not 1 <= len(value) <= MAX_SEEDS:
            raise PydanticCustomError("seed_count", f"give 1 to {MAX_SEEDS} seeds")
        if any(v < 0 for v in value):
            raise PydanticCustomError("seed_sign", "every seed must be >= 0")
        if len(set(value)) != len(value):
            raise PydanticCustomError("distinct", "entries must be distinct")
        return value  # the order matters: the grid runs at the first

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        for field, arms in (("variants", self.variants), ("sizes", self.sizes)):
            names = [a.name for a in arms]
            if len(set(names)) != len(names):
                raise field_error(field, names, "names must be distinct")
        if self.baseline is not None and self.baseline not in [v.name for v in self.variants]:
            raise field_error("baseline", self.baseline, f"must name a variant ({', '.join(self.variant_names)})")
        owned = [(f"overrides.{k}", k) for k in self.overrides]
        owned += [
            (f"{f}.{a.name}.overrides.{k}", k)
            for f in ("variants", "sizes")
            for a in getattr(self, f)
            for k in a.overrides
        ]
        for where, key in owned:
            searched = (key == "optimizer.lr" and self.learning_rates is not None) or (
                key == "trainer.seed" and self.seeds is not None
            )
            if key in OWNED_KEYS or searched:
                raise field_error(
                    where, "…", "is set by the sweep for every point (budget, schedule, LR search, seeds, tracking)"
                )
            if key.startswith("data.") and not where.startswith("overrides."):
                raise field_error(where, "…", "every point trains on the same data: set data.* in the common overrides")
        return self

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.variants[0].name

    def sweep_dir(self) -> Path:
        return (self.runs_root / self.name).resolve()


def load_spec(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Reads and validates a spec file, with ``sets`` (``--set KEY=VALUE``) applied first; one-line
    :class:`ConfigError` on any problem. ``overrides.KEY=VALUE`` sets the common override ``KEY``
    (a dotted config key), any other key a spec field (``runs_root=/big/disk``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep error: spec file {p} does not exist")
    data = read_config_file(p)  # bounded YAML, a mapping
    for item in sets:
        keys, value = parse_override(item)
        if keys[0] == "overrides" and len(keys) > 1:
            common = data.setdefault("overrides", {})
            if not isinstance(common, dict):
                raise field_error("overrides", common, "must be a mapping of dotted config keys")
            common[".".join(keys[1:])] = value
        else:
            set_dotted(data, ".".join(keys), value, source=f"--set {item}")
    spec = validate_config(SweepSpec, data)
    base = spec.base_config if spec.base_config.is_absolute() else p.resolve().parent / spec.base_config
    if not base.is_file():
        raise field_error("base_config", str(spec.base_config), f"no such file ({base})")
    return spec.model_copy(update={"base_config": base.resolve()})
