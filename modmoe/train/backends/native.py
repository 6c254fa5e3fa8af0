"""The native model's backends: DDP/FSDP2 (:class:`NativeBackend`); DeepSpeed ZeRO builds on the
same model code (:mod:`modmoe.train.backends.deepspeed`).

Both run the plain-PyTorch ``MoDETransformer`` after the parallelize step
(:mod:`modmoe.parallel.parallelize`: TP, EP, activation checkpointing, then data parallelism),
accumulate a step's micro-batches with gradient sync on the last one only, keep loss sums on
the device (no host sync per micro-batch), and reduce the step's statistics over the
data-parallel ranks once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from modmoe.checkpoint import TrainState
from modmoe.checkpoint.manager import DcpStateIO, StateIO
from modmoe.model import MoDETransformer
from modmoe.model.moe import MoE
from modmoe.parallel.dims import ParallelDims
from modmoe.parallel.distributed import DistEnv, all_reduce_sum
from modmoe.parallel.grad_norm import clip_grad_norm
from modmoe.parallel.parallelize import (
    a2a_metrics,
    apply_fsdp,
    apply_model_parallelism,
    expert_param_names,
    fsdp_no_sync,
    reduce_expert_grads,
)
from modmoe.train.backends.base import Batch, PlotData, StepStats
from modmoe.train.backends.keys import DEEPSPEED_KEYS, NATIVE_KEYS, SPEED_KEYS, HonouredKeys
from modmoe.train.optim import FrozenTrunk, build_optimizer, build_scheduler
from modmoe.train.reporting import routing_sample
from modmoe.train.resolve import ResolvedJob
from modmoe.train.router_stats import RouterStats, expert_bias_summary


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 under ``precision: bf16``, or ``auto`` on a CUDA device that supports it; else fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def layout_tag(dims: ParallelDims) -> str:
    """Compact layout name for the ``parallel_layout`` tag: ``dp2-ddp``, ``dp4-deepspeed-zero2-ep2``, ..."""
    parts = [f"dp{dims.dp}", dims.dp_backend]
    if dims.dp_backend == "deepspeed":
        parts.append(f"zero{dims.zero_stage}")
    parts += [f"{name}{size}" for name, size in (("ep", dims.ep), ("tp", dims.tp)) if size > 1]
    return "-".join(parts)


class NativeModelBackend:
    """The native model's step, evaluation and plots; subclasses wrap it for data parallelism
    and own the optimizer (``_wrap``, ``_no_sync``, ``_backward``, ``_apply_gradients``)."""

    name: ClassVar[str]
    honoured: ClassVar[HonouredKeys] = DEEPSPEED_KEYS
    speed_steps: ClassVar[bool] = False  # applies trainer.compile / cuda_graphs / fp8

    def __init__(self, job: ResolvedJob, env: DistEnv, load_pretrained: bool = False) -> None:
        """``load_pretrained``: fill the model from ``model.from_hf`` (a fresh start; a resumed
        run takes its weights from the checkpoint)."""
        self.cfg, self.dims, self.device = job.cfg, job.layout, env.device
        self.load_pretrained = load_pretrained
        self.pretrained_report = None  # what the import read (LoadReport), on a fresh model.from_hf start
        self.rank = env.rank
        self.core = MoDETransformer(self.cfg.model).to(self.device)
        self.module: nn.Module = self.core
        self.autocast = autocast_dtype(self.cfg.trainer.precision, self.device)
        self.reduce_dp = partial(all_reduce_sum, group=self.dims.dp_group)
        speed = self.cfg.trainer if self.speed_steps else None
        self.a2a = apply_model_parallelism(self.core, self.dims, self.cfg.parallel, speed)
        self._stats: RouterStats | None = None
        self._bias_metrics: dict[str, float] = {}

    def _import_pretrained(self) -> None:
        """``model.from_hf`` into the model as the layout holds it (called after the parallelize
        step, before DeepSpeed takes the parameters): each rank reads only its slices."""
        if not self.load_pretrained:
            return
        from modmoe.hf.checkpoint import reader_for
        from modmoe.hf.load import load_pretrained

        self.pretrained_report = load_pretrained(self.core, reader_for(self.cfg.model, seed=self.cfg.trainer.seed))

    # ------------------------------------------------------------------ facts
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    def describe(self) -> str:
        return f"{self.name} backend: {self.dims.describe()}"

    def layout_tag(self) -> str:
        return layout_tag(self.dims)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # ------------------------------------------------------------------ training
    def forward_backward(self, batches: list[Batch], step: int) -> StepStats:
        # The LR schedule is the optimizer's own (restored with the checkpoint): ``step`` is not needed.
        self.module.train()
        stats = RouterStats()
        n = len(batches)
        # Loss sums stay on the device: no host sync per micro-batch.
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss, aux_loss)
        aux_sums: dict[str, torch.Tensor] = {}
        for i, (inputs, targets) in enumerate(batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._no_sync(last=i == n - 1):
                with self._autocast():
                    out = self.module(inputs, targets)
                self._backward((out.loss + out.aux_total) / n)
            sums += torch.stack([out.loss.detach().double(), out.aux_total.detach().double()])
            for k, v in out.aux_losses.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + v.detach().double().reshape(1)
            stats.add(out)
        stats.reduce(self.reduce_dp)
        self._stats = stats
        # Global means: every data-parallel rank holds n micro-batches of equal size.
        keys = sorted(aux_sums)
        packed = torch.cat([sums, *(aux_sums[k] for k in keys)])  # on the device: NCCL needs it there
        packed = (self.reduce_dp(packed) / (n * self.dims.dp)).tolist()
        metrics = {"aux_loss_total": packed[1], **{k: packed[2 + i] for i, k in enumerate(keys)}}
        metrics.update(stats.summary())
        return StepStats(loss=packed[0], metrics=metrics)

    def optimizer_step(self, apply: Callable[[float | None], bool] | None = None) -> float | None:
        norm, applied = self._apply_gradients(apply)
        # A held-back step changes nothing, the aux-loss-free expert biases included.
        self._bias_metrics = self._update_expert_biases() if applied else {}
        if applied:
            self._update_depth_priors()
        return norm

    def _update_depth_priors(self) -> None:
        """Moves each prefix-rank router's logit prior toward the step's global per-row logit
        quantiles (already reduced), as the expert biases move: once per applied step."""
        for i, block in enumerate(self.core.layers):
            sums = self._stats.sums.get(f"mod{i}.quantiles")
            if sums is not None:
                block.router.observe(sums)

    def _update_expert_biases(self) -> dict[str, float]:
        """Aux-loss-free balancing from the step's global expert loads (already reduced); returns
        the norm and range of the updated biases."""
        biases: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.core.layers):
            moe = block.mlp
            if isinstance(moe, MoE) and moe.expert_bias is not None:
                moe.update_expert_bias(self._stats.sums[f"moe{i}.load"].to(moe.expert_bias))
                biases[i] = moe.expert_bias
        return expert_bias_summary(biases)

    def step_metrics(self) -> dict[str, float]:
        return {**a2a_metrics(self.a2a), **self._bias_metrics}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> dict[str, float]:
        """Validation loss under top-k routing and under causal routing, plus the agreement of
        causal decisions with top-k."""
        self.module.eval()
        result: dict[str, float] = {}
        for mode in ("topk", "causal"):
            total = torch.zeros(1, dtype=torch.float64)
            stats = RouterStats()
            for inputs, targets in batches:
                with self._autocast():
                    out = self.core(inputs.to(self.device), targets.to(self.device), routing=mode)
                total += out.loss.item()
                stats.add(out)
            total = self.reduce_dp(total) / (len(batches) * self.dims.dp)
            result[f"eval/loss_{mode}"] = float(total)
            stats.reduce(self.reduce_dp)
            summary = stats.summary()
            if mode == "topk" and "mod/causal_agreement" in summary:
                result["eval/causal_agreement"] = summary["mod/causal_agreement"]
                result["eval/causal_entry_fraction"] = summary["mod/causal_entry_fraction"]
                result["eval/causal_precision"] = summary["mod/causal_precision"]
                result["eval/causal_recall"] = summary["mod/causal_recall"]
        result["eval/loss_gap_causal_vs_topk"] = result["eval/loss_causal"] / result["eval/loss_topk"] - 1
        self.module.train()
        return result

    def plot_data(self, sample: torch.Tensor, decode) -> PlotData:
        names, loads = self._stats.expert_loads() if self._stats is not None else ([], None)
        self.core.eval()
        routing = routing_sample(self.core, sample.to(self.device), decode)
        self.core.train()
        return PlotData(names, None if loads is None else loads.numpy(), routing)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ data parallelism
    def _no_sync(self, last: bool):
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _apply_gradients(self, apply: Callable[[float | None], bool] | None) -> tuple[float | None, bool]:
        """Clips and applies the step's gradients unless ``apply(norm)`` says no; returns the
        global gradient norm and whether the step was applied."""
        raise NotImplementedError


class NativeBackend(NativeModelBackend):
    """DDP or FSDP2 (``parallel.dp_backend``), with the optimizer and LR schedule."""

    name = "native"
    honoured = NATIVE_KEYS | SPEED_KEYS
    speed_steps = True

    def __init__(self, job: ResolvedJob, env: DistEnv, load_pretrained: bool = False) -> None:
        super().__init__(job, env, load_pretrained)
        cfg, dims, model = self.cfg, self.dims, self.core
        self._expert_params: list[nn.Parameter] = []
        if dims.dp > 1 and cfg.parallel.dp_backend == "ddp":
            experts = expert_param_names(model) if dims.ep > 1 else []
            # Expert slices differ between EP ranks: DDP must not average them over all ranks.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
            self._expert_params = [model.get_parameter(n) for n in experts]
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # forward_sync_buffers=False: expert-bias buffers are updated identically on every rank
            # from all-reduced loads, so there is nothing to broadcast each step.
            self.module = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
        elif cfg.parallel.dp_backend == "fsdp2" and dims.distributed:
            apply_fsdp(model, dims, cfg.parallel, self.autocast)
        self._import_pretrained()
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.trainer.max_steps)
        self.frozen_trunk = FrozenTrunk(model, cfg.optimizer.routers_only_steps)

    def _no_sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step."""
        if last:
            return contextlib.nullcontext()
        if isinstance(self.module, DistributedDataParallel):
            return self.module.no_sync()
        if isinstance(self.core, FSDPModule):
            return fsdp_no_sync(self.core)
        return contextlib.nullcontext()

    def _apply_gradients(self, apply: Callable[[float | None], bool] | None) -> tuple[float, bool]:
        reduce_expert_grads(self._expert_params, self.dims)
        step = self.scheduler.last_epoch  # the index of the step about to be taken
        self.frozen_trunk.before_clip(step)
        # Global over every rank (DDP/FSDP2 reduced the gradients; experts over their groups),
        # so every rank takes the same ``apply`` decision. Measured even when not clipping.
        norm = float(clip_grad_norm(self.core.parameters(), self.cfg.optimizer.grad_clip))
        applied = apply is None or apply(norm)
        if applied:
            self.frozen_trunk.before_step(self.optimizer, step)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_io(self) -> StateIO:
        return DcpStateIO({"train": TrainState(self.module, self.optimizer, self.scheduler)})
