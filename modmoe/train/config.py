"""Configuration of the optimizer, the LR schedule and the training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from modmoe.config_base import ConfigModel, field_error

FLOAT32_MAX = 3.4028234663852886e38  # the optimizer applies lr * update to float32 weights


class OptimizerConfig(ConfigModel):
    """AdamW with linear warmup and cosine decay."""

    lr: float = Field(default=3e-3, gt=0.0, le=FLOAT32_MAX)
    """Peak learning rate (at most the largest float32, which the optimizer multiplies by)."""

    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Final learning rate as a fraction of ``lr`` (end of the cosine)."""

    warmup_steps: int = Field(default=20, ge=0)
    """Steps of linear warmup from 0 to ``lr``."""

    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warmup: cosine to ``min_lr_ratio * lr`` at ``trainer.max_steps``, or constant."""

    weight_decay: float = Field(default=0.1, ge=0.0, le=FLOAT32_MAX)
    """Decoupled weight decay, applied to matrices only (not norms, not router biases)."""

    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""

    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    """AdamW beta2."""

    eps: float = Field(default=1e-8, gt=0.0)
    """AdamW epsilon."""

    grad_clip: float | None = Field(default=1.0, gt=0.0)
    """Clip the global gradient norm to this value (null = no clipping)."""

    routers_only_steps: int = Field(default=0, ge=0)
    """For the first N optimizer steps only the routers train (the depth routers with their
    predictors, and the MoE gates); every other weight keeps its value exactly: its gradient is
    zeroed before clipping (so the norm is the routers'), its learning rate, and with it its
    weight decay, is 0, and its Adam moments start fresh at step N. Meant for a pretrained model
    that was just MoD-ified or upcycled (docs/pretrained.md). Native backend (DDP, FSDP2, EP, TP)."""


class NumericsConfig(ConfigModel):
    """What a non-finite loss or gradient norm does, and loss-spike detection. The loss and the
    gradient norm are global values (reduced over the ranks once per step, with the step's other
    statistics), so every rank sees the same fault at the same step and acts alike."""

    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    """``stop``: end the run with a one-line error and a non-zero exit, saving nothing of the
    failing step. ``skip``: do not apply the step (its gradients are dropped, the optimizer and
    the LR schedule do not move; its batches are consumed), at most ``max_skipped_steps`` times
    in a run, then stop. ``rollback``: reload the newest valid checkpoint and go on with the data
    after the failing step (the window since that checkpoint is skipped), at most
    ``max_rollbacks`` times, then stop. ``skip`` needs a backend that can hold back an optimizer
    step (the native one); every backend can ``stop`` and ``rollback``."""

    max_skipped_steps: int = Field(default=10, ge=1)
    """With ``on_nonfinite: skip``: how many steps a run may skip before it stops."""

    max_rollbacks: int = Field(default=3, ge=1)
    """With ``on_nonfinite: rollback``: how many times a run may roll back before it stops."""

    spike_window: int = Field(default=100, ge=8)
    """Finite losses of the previous steps that a step's loss is compared with (z-score over
    their mean and standard deviation); the first 8 steps have no score."""

    spike_zscore: float = Field(default=6.0, gt=0.0)
    """A loss more than this many standard deviations above the window's mean is a spike
    (``numerics/loss_spike`` = 1). Spikes are logged, not acted on."""


class WatchdogConfig(ConfigModel):
    """Hang and straggler detection on every rank (modmoe/train/watchdog.py, straggler.py)."""

    enabled: bool = True
    """Run the watchdog thread that dumps stacks when a step overruns (the step times and the
    straggler metric are measured either way)."""

    factor: float = Field(10.0, gt=1)
    """A step overruns when it has taken longer than this many times the median of the
    recent steps."""

    floor_s: float = Field(60.0, gt=0)
    """...and longer than this many seconds, so short steps' jitter (an evaluation, a
    checkpoint save) does not count as a hang."""

    window: int = Field(50, ge=1)
    """How many recent steps the median is taken over."""

    warmup_steps: int = Field(3, ge=1)
    """Steps timed before the watchdog judges any (the first steps compile and warm caches)."""

    check_every_s: float = Field(1.0, gt=0)
    """How often the watchdog thread looks at the step in flight."""

    straggler_factor: float = Field(2.0, gt=1)
    """Log a straggler line when the slowest rank's own work took longer than this many times
    the median over the ranks (and at least ``straggler_min_s`` longer)."""

    straggler_min_s: float = Field(0.5, ge=0)
    """Absolute margin the slowest rank must exceed the median by before it is logged."""


class TrainerConfig(ConfigModel):
    """The training loop."""

    max_steps: int = Field(default=300, ge=1)
    """Optimizer steps to train for."""

    run_dir: str = "runs/tiny"
    """Directory of this run: resolved config, metrics.jsonl, logs, checkpoints."""

    seed: int = 1234
    """Seed of parameter init, data order and every other random choice."""

    global_batch_size: int = Field(default=16, ge=1)
    """Sequences per optimizer step, over all ranks (independent of the layout)."""

    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass on one rank. Gradient accumulation steps =
    global_batch_size / (micro_batch_size * data-parallel ranks)."""

    eval_every: int = Field(default=100, ge=0)
    """Evaluate every N steps and at the end (0 = only at the end)."""

    eval_batches: int = Field(default=4, ge=1)
    """Validation batches per evaluation, each of ``global_batch_size`` sequences (evaluated in
    micro-batches over the data-parallel ranks), so every layout evaluates the same sequences."""

    log_every: int = Field(default=1, ge=1)
    """Write metrics every N steps."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype under autocast; weights and optimizer state stay fp32. ``auto`` = bf16 on
    CUDA devices that support it, fp32 on CPU."""

    compile: Literal["off", "blocks", "model"] = "off"
    """``torch.compile`` of the native model, applied by the parallelize step after tensor
    parallel, expert parallel and activation checkpointing, before DDP/FSDP2 (torchtitan's
    order): ``blocks`` compiles each block (shorter compile; DDP and FSDP2 still overlap their
    communication block by block), ``model`` the whole forward. Only top-k routing is compiled;
    causal-routing evaluation runs eagerly. Native engine with DDP or FSDP2."""

    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """What ``compile`` hands the traced graphs to: ``inductor`` (generated kernels: the fast
    one) or ``aot_eager`` (forward and backward traced exactly as for inductor, then run with
    the eager kernels: the same graph-break and host-sync checks in seconds, for tests and
    debugging)."""

    cuda_graphs: bool = False
    """Replay the compiled forward and backward as CUDA graphs (inductor's ``reduce-overhead``):
    no kernel-launch cost per op, possible because a top-k MoDE step has static shapes and no
    host sync. Needs ``compile`` blocks or model with inductor, one CUDA device in a single
    process, and no expert parallelism; refused on CPU."""

    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """FP8 training of the linear layers through torchao float8 (the ``gpu`` extra), applied from
    outside the model: attention and dense/shared-expert MLP projections become ``Float8Linear``
    with ``tensorwise`` (one scale per tensor) or ``rowwise`` (one per row: more accurate,
    somewhat slower) dynamic scaling. The depth router, the MoE gate, the predictor, norms,
    the LM head and the routed experts stay in the compute precision. Needs a CUDA GPU with
    FP8 (compute capability 8.9+), native engine with DDP or FSDP2, no tensor parallel."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: ``auto`` = cuda when available."""

    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 (only when attached to a terminal, unless forced by
    MODMOE_PROGRESS=1)."""

    deterministic: bool = True
    """Use deterministic algorithms (exact resume and layout comparisons)."""

    numerics: NumericsConfig = NumericsConfig()
    """Non-finite losses and gradients, loss spikes."""

    memory_check: Literal["refuse", "warn", "off"] = "refuse"
    """Before any allocation, estimate each rank's memory (weights, gradients, Adam state, and a
    lower bound of the activations; modmoe/train/memory_estimate.py) and compare it with the
    device: ``refuse`` a job that cannot fit in one line, ``warn`` and go on, or ``off``. The
    estimate is a lower bound, so a job it passes may still run out of memory."""

    memory_available_gib: float | None = Field(default=None, gt=0.0)
    """Memory one rank may use, in GiB, for ``memory_check`` (``None`` = what the device has:
    a CUDA device's total memory, or the host's available RAM shared by its local ranks)."""

    watchdog: WatchdogConfig = WatchdogConfig()
    """Stack dumps of a step that overruns, and the straggler metric (docs/slurm.md)."""

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.cuda_graphs and self.compile == "off":
            raise field_error("trainer.cuda_graphs", True, "needs trainer.compile = blocks or model")
        if self.cuda_graphs and self.compile_backend != "inductor":
            raise field_error("trainer.cuda_graphs", True, "needs trainer.compile_backend = inductor")
        if self.global_batch_size % self.micro_batch_size:
            raise field_error(
                "trainer.global_batch_size",
                self.global_batch_size,
                f"must be a multiple of trainer.micro_batch_size ({self.micro_batch_size})",
            )
        return self
