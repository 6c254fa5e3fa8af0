"""The job config: one typed section per component, loaded from YAML with ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from modmoe.checkpoint.config import CheckpointConfig
from modmoe.config_base import ConfigError, ConfigModel, validate_config
from modmoe.config_yaml import MAX_BYTES, MAX_DEPTH, parse_yaml
from modmoe.data.config import DataConfig
from modmoe.engines.megatron.config import MegatronConfig
from modmoe.hf.config import apply_pretrained
from modmoe.model_config import ModelConfig
from modmoe.parallel.config import ParallelConfig
from modmoe.tracking.config import TrackingConfig
from modmoe.train.config import OptimizerConfig, TrainerConfig


class LoggingConfig(ConfigModel):
    """Where metrics go besides RUN_DIR/metrics.jsonl."""

    mlflow: TrackingConfig = TrackingConfig()
    """MLflow tracking (rank 0 logs; embedded default: sqlite in the run directory)."""

    plots_every_eval: bool = True
    """Log the expert-load heatmap and the depth-routing map as PNG artifacts at each evaluation."""

    peak_tflops_per_device: float | None = Field(default=None, gt=0.0)
    """Dense bf16 peak of one device in TFLOP/s, the denominator of ``mfu``. ``None`` = look the
    GPU up by name (H100 SXM and H200 989, H100 PCIe 756, A100 312, ...: modmoe/train/throughput.py);
    on CPU, or on a GPU the table does not know, MFU is then not logged."""


class JobConfig(ConfigModel):
    """Everything a training run needs."""

    engine: Literal["native", "megatron"] = "native"
    """Training engine: ``native`` (plain PyTorch, runs everywhere incl. CPU; parallelism from
    ``parallel``) or ``megatron`` (Megatron-Core ``GPTModel`` hosting the MoDE layers; needs the
    ``megatron`` extra, settings in ``megatron``; see docs/megatron.md)."""

    megatron: MegatronConfig = MegatronConfig()
    """Megatron-only settings (pp, cp, etp, sequence parallelism, dispatcher, FP8); used when
    ``engine: megatron``."""

    model: ModelConfig = ModelConfig()
    """The network."""

    data: DataConfig = DataConfig()
    """Corpus, tokenizer, shards and sampling."""

    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer and learning-rate schedule."""

    trainer: TrainerConfig = TrainerConfig()
    """The training loop."""

    parallel: ParallelConfig = ParallelConfig()
    """Process layout."""

    logging: LoggingConfig = LoggingConfig()
    """Experiment tracking."""

    checkpoint: CheckpointConfig = CheckpointConfig()
    """Sharded checkpoints in RUN_DIR/checkpoints."""

    @model_validator(mode="before")
    @classmethod
    def _pretrained(cls, data: Any) -> Any:
        """``model.from_hf``: the fields left unset come from the checkpoint (modmoe/hf/config.py)."""
        return apply_pretrained(data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``model.num_layers=4`` -> (["model", "num_layers"], 4); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config error: --set {item!r}: expected key=value, e.g. model.num_layers=4")
    path = key.strip().split(".")
    if len(path) > MAX_DEPTH or not all(part.strip() for part in path):
        raise ConfigError(f"config error: --set {key.strip()!r}: expected dotted section and field names")
    value = parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    return path, value


def set_dotted(data: dict[str, Any], key: str, value: Any, source: str | None = None) -> dict[str, Any]:
    """Sets ``data["model"]["num_layers"] = value`` for ``key = "model.num_layers"``, creating
    sections on the way; ``source`` names the override in errors (default ``--set KEY``)."""
    path = key.strip().split(".")
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {source or '--set ' + key}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        set_dotted(data, ".".join(path), value, source=f"--set {item}")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (not validated yet), read bounded (see config_yaml)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config error: config file {p} does not exist")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config error: config file {p}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config error: config file {p}: not UTF-8 text (byte {err.start})") from None
    data = parse_yaml(text, str(p))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Reads a YAML config (None = all defaults), applies overrides, validates."""
    data = read_config_file(path) if path is not None else {}
    return validate_config(JobConfig, apply_overrides(data, list(overrides)))


def dump_config(cfg: JobConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
