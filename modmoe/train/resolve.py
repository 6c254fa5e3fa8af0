"""``resolve_job``: every check that spans config sections, done once before any work.

A :class:`~modmoe.config.JobConfig` is valid section by section when it loads; whether it can
run depends on more: the world size, the device, the backend it selects and what that backend
honours, whether the run directory is one a run may write into, and whether the model and its
optimizer state can fit in a rank's memory. ``resolve_job`` decides all of it and returns a :class:`ResolvedJob`, which the
Trainer and the backends use instead of recomputing (the data-parallel degree, the
gradient-accumulation count, the layout). Every problem is a one-line
:class:`~modmoe.config_base.ConfigError` naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from modmoe.config import JobConfig
from modmoe.config_base import ConfigError, field_error
from modmoe.hf.checkpoint import check_pretrained
from modmoe.parallel.dims import ParallelDims
from modmoe.train.backends.keys import BACKEND_KEYS, TRAINER_KEYS, refusal
from modmoe.train.memory_estimate import check_memory
from modmoe.train.run_dir import check_run_dir
from modmoe.train.speed_checks import check_speed_options


@dataclass(frozen=True)
class ResolvedJob:
    """A job config checked against its world size, with what follows from it."""

    cfg: JobConfig
    world_size: int
    device_type: str
    """``cuda`` or ``cpu``: where ``trainer.device`` puts this job."""
    backend: str
    """``native`` (DDP/FSDP2), ``deepspeed`` or ``megatron``."""
    dp: int
    """Data-parallel degree: how many ranks split the global batch."""
    accum_steps: int
    """Micro-batches each rank runs per optimizer step."""
    layout: Any
    """The backend's layout: :class:`ParallelDims` (native, deepspeed) or a ``MegatronPlan``."""


def backend_name(cfg: JobConfig) -> str:
    if cfg.engine == "megatron":
        return "megatron"
    return "deepspeed" if cfg.parallel.dp_backend == "deepspeed" else "native"


def device_type(choice: str) -> str:
    """What ``trainer.device`` means on this machine (without touching any device)."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise field_error("trainer.device", "cuda", "no CUDA device is available (use cpu or auto)")
        return "cuda"
    return "cpu"


def launcher_world_size() -> int:
    """The world size the launcher set (torchrun's ``WORLD_SIZE``; a plain process is 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts into dotted keys; lists and scalars are leaves."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def changed_keys(cfg: JobConfig) -> dict[str, Any]:
    """Every config key whose value differs from the default, with its value."""
    ours, defaults = _leaves(cfg.model_dump(mode="json")), _leaves(JobConfig().model_dump(mode="json"))
    return {key: value for key, value in ours.items() if key not in defaults or defaults[key] != value}


def check_honoured(cfg: JobConfig, backend: str) -> None:
    """A key set away from its default must be honoured by the Trainer or the backend."""
    honoured = TRAINER_KEYS | BACKEND_KEYS[backend]
    for key, value in changed_keys(cfg).items():
        if not honoured.honours(key, value):
            raise ConfigError(refusal(key, value, backend))


def _layout(cfg: JobConfig, backend: str, world_size: int, device: str) -> tuple[Any, int]:
    """The backend's layout and its data-parallel degree."""
    if backend == "megatron":
        from modmoe.engines.megatron.compat import te_available
        from modmoe.engines.megatron.translate import translate

        cpu = device == "cpu"
        precision = "fp32" if cpu and cfg.trainer.precision == "auto" else cfg.trainer.precision
        plan = translate(
            cfg.model,
            cfg.parallel,
            cfg.megatron,
            world_size=world_size,
            seq_len=cfg.data.seq_len,
            precision=precision,
            te_available=te_available() and not cpu,
            device="cpu" if cpu else "cuda",
            grad_clip=cfg.optimizer.grad_clip is not None,
        )
        return plan, plan.layout.dp
    dims = ParallelDims.build(cfg.parallel, cfg.model, world_size, device)
    return dims, dims.dp


def resolve_job(cfg: JobConfig, world_size: int | None = None, device: str | None = None) -> ResolvedJob:
    """Checks ``cfg`` for ``world_size`` ranks (default: the launcher's) on ``device`` (default:
    what ``trainer.device`` picks here); raises a one-line ConfigError for the first problem."""
    world_size = launcher_world_size() if world_size is None else world_size
    device = device_type(cfg.trainer.device) if device is None else device
    backend = backend_name(cfg)
    check_honoured(cfg, backend)
    m, d, tc = cfg.model, cfg.data, cfg.trainer
    if d.seq_len > m.max_seq_len:
        raise field_error("data.seq_len", d.seq_len, f"must be <= model.max_seq_len ({m.max_seq_len})")
    if d.tokenizer is None and d.vocab_size > m.vocab_size:
        raise field_error(
            "model.vocab_size", m.vocab_size, f"must be >= data.vocab_size ({d.vocab_size}), the tokenizer trained"
        )
    if m.from_hf is not None:
        # Every tensor the model needs, with its shape (safetensors headers only). Both engines
        # import it; what the megatron engine cannot express is refused when the job is translated.
        check_pretrained(m)
    if cfg.optimizer.routers_only_steps and not any(
        m.depth.is_routed(i) or m.moe.is_moe(i) for i in range(m.num_layers)
    ):
        raise field_error(
            "optimizer.routers_only_steps",
            cfg.optimizer.routers_only_steps,
            "the model has no routers (enable model.depth or model.moe)",
        )
    layout, dp = _layout(cfg, backend, world_size, device)
    check_speed_options(tc, cfg.parallel, world_size, device)
    if tc.global_batch_size % (tc.micro_batch_size * dp):
        raise field_error(
            "trainer.global_batch_size",
            tc.global_batch_size,
            f"must be a multiple of micro_batch_size * data-parallel ranks ({tc.micro_batch_size} * {dp})",
        )
    accum = tc.global_batch_size // (tc.micro_batch_size * dp)
    check_run_dir(tc.run_dir, cfg.checkpoint.dirname)
    check_memory(cfg, layout, device, world_size)
    return ResolvedJob(cfg, world_size, device, backend, dp, accum, layout)
