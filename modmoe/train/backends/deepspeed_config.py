"""The DeepSpeed config implied by modmoe's config, for both engines that run under DeepSpeed
(the native model with ZeRO 0-3, and Megatron's ``GPTModel`` with ZeRO 1-2).

Batch sizes, accumulation, ZeRO stage, clipping and precision come from modmoe's own config, so
there is no second file to keep in sync; ``parallel.deepspeed_extra`` merges further keys, and
keys modmoe sets itself are refused there. The optimizer is always a torch AdamW that modmoe
builds and passes in (DeepSpeed's fused Adam kernels need CUDA builds), with modmoe's schedule.
"""

from __future__ import annotations

from typing import Any

from modmoe.config import JobConfig
from modmoe.config_base import ConfigError

# Keys modmoe derives from its own config; setting them in deepspeed_extra would disagree.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_optimization.stage",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def _merge(base: dict, extra: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if path in OWNED_KEYS:
            raise ConfigError(
                f"config error: parallel.deepspeed_extra.{path}: set by modmoe from its own config "
                f"(owned keys: {', '.join(OWNED_KEYS)})"
            )
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def deepspeed_config(cfg: JobConfig, accum_steps: int, zero_stage: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for ``accum_steps`` micro-batches per rank and step."""
    tc = cfg.trainer
    base = {
        "train_batch_size": tc.global_batch_size,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": cfg.optimizer.grad_clip or 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # A torch AdamW is passed in (DeepSpeed's fused Adam kernels need CUDA builds).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merge(base, cfg.parallel.deepspeed_extra)
