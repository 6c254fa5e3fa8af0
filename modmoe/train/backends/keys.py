"""Which config keys the Trainer and each backend honour.

A key set away from its default must be honoured by the Trainer or by the chosen backend;
otherwise :func:`modmoe.train.resolve.check_honoured` refuses the config in one line before
any work, rather than letting a setting be silently ignored. A new config key is therefore
refused everywhere until the code that implements it is declared here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HonouredKeys:
    """A set of dotted config keys: a key is in it when it equals one of ``keys`` or lies below
    one (``"model"`` covers ``model.depth.capacity``). An entry ``key=value`` honours that one
    value only (``trainer.numerics.on_nonfinite=skip``)."""

    keys: tuple[str, ...]

    def _entries(self, key: str):
        for entry in self.keys:
            name, sep, value = entry.partition("=")
            if key == name or key.startswith(name + "."):
                yield value if sep else None

    def __contains__(self, key: str) -> bool:
        """Whether some value of ``key`` is honoured."""
        return any(True for _ in self._entries(key))

    def honours(self, key: str, value: object) -> bool:
        """Whether ``key`` set to ``value`` is honoured."""
        return any(only is None or only == str(value) for only in self._entries(key))

    def __or__(self, other: HonouredKeys) -> HonouredKeys:
        return HonouredKeys(self.keys + other.keys)


# Keys the Trainer implements itself, whatever the backend: data, the loop's cadence,
# checkpoint commits and retention, tracking, the process group.
TRAINER_KEYS = HonouredKeys(
    (
        "engine",
        "data",
        "trainer.max_steps",
        "trainer.run_dir",
        "trainer.seed",
        "trainer.global_batch_size",
        "trainer.micro_batch_size",
        "trainer.eval_every",
        "trainer.eval_batches",
        "trainer.log_every",
        "trainer.device",
        "trainer.progress_bar",
        "trainer.deterministic",
        "trainer.watchdog",
        "checkpoint.interval_steps",
        "checkpoint.interval_minutes",
        "checkpoint.keep_last",
        "checkpoint.keep_every",
        "checkpoint.dirname",
        "logging.mlflow",
        "logging.peak_tflops_per_device",
        "parallel.comm_backend",
        # Numerical faults: the Trainer decides, stops and rolls back for every backend;
        # skipping a step needs the backend (below).
        "trainer.numerics.on_nonfinite=rollback",
        "trainer.numerics.max_skipped_steps",
        "trainer.numerics.max_rollbacks",
        "trainer.numerics.spike_window",
        "trainer.numerics.spike_zscore",
        "trainer.memory_check",
        "trainer.memory_available_gib",
        "parallel.timeout_s",
        "parallel.setup_timeout_s",
    )
)

# The optimizer keys every backend implements (AdamW, the schedule, clipping).
OPTIMIZER_KEYS = (
    "optimizer.lr",
    "optimizer.min_lr_ratio",
    "optimizer.warmup_steps",
    "optimizer.schedule",
    "optimizer.weight_decay",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
    "optimizer.grad_clip",
)

# The native model under DeepSpeed: every model, optimizer and layout setting; not the
# Megatron-only section. Not: skipping a step (DeepSpeed applies the update inside its backward
# at the accumulation boundary, before the step's gradient norm is known), training the routers
# alone (DeepSpeed keeps the gradients in its own flat partitions).
DEEPSPEED_KEYS = HonouredKeys(
    ("model", *OPTIMIZER_KEYS, "parallel", "trainer.precision", "checkpoint.async_save", "logging.plots_every_eval")
)

# The native model under DDP/FSDP2: the same, holding back a non-finite step, and a frozen trunk.
NATIVE_KEYS = DEEPSPEED_KEYS | HonouredKeys(("trainer.numerics.on_nonfinite=skip", "optimizer.routers_only_steps"))

# Megatron-Core: the model (translate refuses, in one line, what Megatron cannot express),
# the optimizer, the shared parallel degrees and its own section. Not: asynchronous checkpoint
# saves (dist_checkpointing writes synchronously here), skipping a step (Megatron's optimizer
# clips and applies in one call).
MEGATRON_KEYS = HonouredKeys(
    (
        "model",
        *OPTIMIZER_KEYS,
        "megatron",
        "trainer.precision",
        "parallel.dp",
        "parallel.ep",
        "parallel.tp",
        "parallel.dp_backend",
        "parallel.zero_stage",
        "parallel.deepspeed_extra",
        "parallel.activation_checkpointing",
        "logging.plots_every_eval",
    )
)

# The speed steps of the native parallelize step (modmoe/parallel/compile.py, fp8.py): applied
# under DDP/FSDP2 only, so DeepSpeed and Megatron refuse them.
SPEED_KEYS = HonouredKeys(("trainer.compile", "trainer.compile_backend", "trainer.cuda_graphs", "trainer.fp8"))

BACKEND_KEYS: dict[str, HonouredKeys] = {
    "native": NATIVE_KEYS | SPEED_KEYS,
    "deepspeed": DEEPSPEED_KEYS,
    "megatron": MEGATRON_KEYS,
}


def refusal(key: str, value: object, backend: str) -> str:
    """The one-line refusal of a key that neither the Trainer nor ``backend`` honours."""
    return (
        f"config error: {key} = {value!r}: not honoured by the {backend} backend (the keys each backend "
        "honours: docs/architecture.md); remove it or pick a backend that implements it"
    )
