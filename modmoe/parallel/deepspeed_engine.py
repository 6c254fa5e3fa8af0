"""DeepSpeed ZeRO (stages 0-3) as the data-parallel backend, combinable with expert parallelism.

The DeepSpeed config is generated from modmoe's own config (batch sizes, ZeRO stage, clipping,
precision), so there is no second file to keep in sync; ``parallel.deepspeed_extra`` adds keys.

Experts under EP. DeepSpeed shards and averages what it is given over *all* data-parallel
ranks and only knows expert parallelism through its own MoE layer classes. So with ``ep > 1``
the expert modules are detached from the module tree DeepSpeed sees: DeepSpeed manages the
dense parameters (ZeRO over dp), while the experts stay ``Shard(0)`` DTensors over ``ep``
with their own AdamW, their gradients summed over the expert-data-parallel ranks. Clipping
is therefore per part: DeepSpeed clips the dense gradients by their norm, modmoe the experts
by theirs; the reported ``grad_norm`` combines both.

Checkpoints. DeepSpeed's own ``save_checkpoint`` would silently drop the experts held by other
EP ranks (it only saves experts of its MoE class), so it is not used. Instead
:class:`DeepSpeedTrainState` offers DCP the full fp32 master weights and Adam moments of every
DeepSpeed parameter (``safe_get_full_*``, gathered from the ZeRO partitions) and the experts as
global-identity DTensors: the checkpoint has the same keys as a native one and reshards.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from modmoe.checkpoint.train_state import (
    MODEL_KEY,
    OPTIM_KEY,
    OPTIM_STATE_KEY,
    SCHEDULER_KEY,
    load_schedule,
    schedule_state,
)
from modmoe.config import JobConfig
from modmoe.config_base import ConfigError
from modmoe.model.moe import GroupedExperts, MoE
from modmoe.model.transformer import MoDETransformer
from modmoe.parallel.dims import ParallelDims
from modmoe.parallel.grad_norm import clip_grad_norm
from modmoe.parallel.parallelize import a2a_metrics, apply_model_parallelism, reduce_expert_grads
from modmoe.train.optim import build_optimizer, build_scheduler

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
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


def deepspeed_config(cfg: JobConfig, dims: ParallelDims, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config implied by modmoe's config (plus ``parallel.deepspeed_extra``)."""
    tc = cfg.trainer
    accum = tc.global_batch_size // (tc.micro_batch_size * dims.dp)
    base = {
        "train_batch_size": tc.global_batch_size,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optimizer.grad_clip or 0.0,
        "zero_optimization": {"stage": dims.zero_stage},
        "bf16": {"enabled": bf16},
        # A torch AdamW is passed in (DeepSpeed's fused Adam kernels need CUDA builds).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merge(base, cfg.parallel.deepspeed_extra)


def detach_experts(model: MoDETransformer) -> dict[str, GroupedExperts]:
    """Removes every ``GroupedExperts`` from the registered module tree (the MoE still calls it:
    it stays a plain attribute). Returns them by their former qualified name."""
    detached = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE) and "experts" in module._modules:
            experts = module._modules.pop("experts")
            object.__setattr__(module, "experts", experts)
            detached[f"{name}.experts"] = experts
    return detached


class DeepSpeedEngine:
    def __init__(self, model: MoDETransformer, dims: ParallelDims, cfg: JobConfig, device: torch.device) -> None:
        import deepspeed

        self.core, self.dims = model, dims
        self.grad_clip = cfg.optimizer.grad_clip
        self.a2a = apply_model_parallelism(model, dims, cfg.parallel)
        self.experts = detach_experts(model) if dims.ep > 1 else {}
        self.expert_params = {
            f"{name}.{p_name}": p for name, mod in self.experts.items() for p_name, p in mod.named_parameters()
        }
        bf16 = cfg.trainer.precision == "bf16" or (
            cfg.trainer.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        dense_optimizer = build_optimizer(model, cfg.optimizer)
        dense_scheduler = build_scheduler(dense_optimizer, cfg.optimizer, cfg.trainer.max_steps)
        os.environ.setdefault("LOCAL_RANK", "0")
        self.ds_config = deepspeed_config(cfg, dims, bf16)
        self.module, self.ds_optimizer, _, self.ds_scheduler = deepspeed.initialize(
            model=model,
            optimizer=dense_optimizer,
            lr_scheduler=dense_scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self._lr = self.ds_scheduler.get_last_lr()[0]
        self.expert_optimizer = self.expert_scheduler = None
        if self.expert_params:
            self.expert_optimizer = build_optimizer(model, cfg.optimizer, params=self.expert_params.values())
            self.expert_scheduler = build_scheduler(self.expert_optimizer, cfg.optimizer, cfg.trainer.max_steps)

    # ------------------------------------------------------------------ training
    def micro_batch(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed counts micro-batches itself

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides by the accumulation steps.
        self.module.backward(loss, scale_wrt_gas=False)
        self._lr = self.ds_scheduler.get_last_lr()[0]  # what this step uses: step() moves the schedule on
        self.module.step()  # a real optimizer step only at the accumulation boundary

    def step(self) -> float | None:
        dense_norm = self.module.get_global_grad_norm()
        expert_norm = None
        if self.expert_optimizer is not None:
            reduce_expert_grads(list(self.expert_params.values()), self.dims)
            expert_norm = clip_grad_norm(self.expert_params.values(), self.grad_clip)
            self.expert_optimizer.step()
            self.expert_scheduler.step()
            self.expert_optimizer.zero_grad(set_to_none=True)
        if dense_norm is None:
            return None
        total = float(dense_norm) ** 2 + (float(expert_norm) ** 2 if expert_norm is not None else 0.0)
        return total**0.5

    def lr(self) -> float:
        """The learning rate of the step just taken (the trainer asks after the backward passes,
        which under DeepSpeed already stepped the optimizer and the schedule)."""
        return self._lr

    def comm_metrics(self) -> dict[str, float]:
        return a2a_metrics(self.a2a)

    def train_state(self) -> DeepSpeedTrainState:
        return DeepSpeedTrainState(self)


class DeepSpeedTrainState(Stateful):
    """Model, Adam moments and schedules of a DeepSpeed run, keyed by parameter name like a
    native checkpoint. Gathering full tensors from ZeRO partitions is collective: every rank
    calls ``state_dict`` (DCP does)."""

    holds_model = True

    def __init__(self, engine: DeepSpeedEngine) -> None:
        self.engine = engine

    def _dense_params(self) -> dict[str, nn.Parameter]:
        return dict(self.engine.core.named_parameters())

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        eng = self.engine
        _ensure_adam_state(eng.ds_optimizer)
        step = torch.tensor(float(eng.module.global_steps))
        model: dict[str, Any] = {}
        optim: dict[str, dict[str, Any]] = {}
        for name, p in self._dense_params().items():
            model[name] = safe_get_full_fp32_param(p).detach().cpu()
            optim[name] = {key: _or_zeros(safe_get_full_optimizer_state(p, key), model[name]) for key in ADAM_MOMENTS}
            optim[name]["step"] = step.clone()
        for name, buf in eng.core.named_buffers():
            if name.endswith("expert_bias"):
                model[name] = buf
        for name, p in eng.expert_params.items():
            model[name] = p
            state = eng.expert_optimizer.state.get(p, {})
            optim[name] = {key: state[key] if key in state else torch.zeros_like(p) for key in ADAM_MOMENTS}
            optim[name]["step"] = step.clone()
        # The same keys as a native TrainState: either engine resumes the other's checkpoints.
        return {
            MODEL_KEY: model,
            OPTIM_KEY: {OPTIM_STATE_KEY: optim},
            SCHEDULER_KEY: schedule_state(eng.ds_scheduler),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """DCP has loaded into the tensors ``state_dict()`` offered; push them into ZeRO's
        partitions and the expert optimizer."""
        eng = self.engine
        _ensure_adam_state(eng.ds_optimizer)
        model, optim = state_dict[MODEL_KEY], state_dict[OPTIM_KEY][OPTIM_STATE_KEY]
        steps = {int(optim[name]["step"]) for name in optim}
        if len(steps) != 1:
            raise ValueError(
                f"checkpoint has different Adam step counts per parameter ({sorted(steps)}); "
                "the DeepSpeed backend steps all parameters together"
            )
        step = steps.pop()
        for name, p in self._dense_params().items():
            value = model[name].to(p.device)
            _set_full_hp(p, value)  # the fp32 master partition
            with _full_param(p):  # and the parameter the forward uses
                p.data.copy_(value.to(p.dtype))
            for key in ADAM_MOMENTS:
                _set_full_hp(p, optim[name][key].to(p.device), key)
        for name, buf in eng.core.named_buffers():
            if name in model:
                buf.copy_(model[name])
        _set_adam_step(eng.ds_optimizer, step)
        eng.module.global_steps = step
        load_schedule(eng.ds_scheduler, state_dict[SCHEDULER_KEY])
        if eng.expert_optimizer is not None:
            for name, p in eng.expert_params.items():
                state = eng.expert_optimizer.state[p]
                for key in ADAM_MOMENTS:
                    state[key] = optim[name][key]
                state["step"] = torch.tensor(float(step))
            load_schedule(eng.expert_scheduler, state_dict[SCHEDULER_KEY])


def _set_full_hp(p: nn.Parameter, value: torch.Tensor, optim_state_key: str | None = None) -> None:
    """Writes the full fp32 value (or Adam moment) of ``p`` into this rank's ZeRO partition.
    Under ZeRO-3 the partition is cut here: DeepSpeed 0.19's full setter reads past the end of
    the value on the rank whose partition holds padding (numel not divisible by the ranks)."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if not hasattr(p, "ds_id"):
        if optim_state_key is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, optim_state_key)
        return
    part, group = p.ds_tensor.numel(), p.ds_process_group
    flat = value.flatten()
    flat = torch.nn.functional.pad(flat, (0, part * dist.get_world_size(group) - flat.numel()))  # (ranks * part,)
    local = flat.narrow(0, part * dist.get_rank(group), part)
    if optim_state_key is None:
        safe_set_local_fp32_param(p, local)
    else:
        safe_set_local_optimizer_state(p, local, optim_state_key)


def _full_param(p: nn.Parameter):
    """ZeRO-3 holds only a partition of ``p``: gather it for an in-place write (every rank
    writes the same value) and re-partition after. Other stages hold it whole already."""
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
    return contextlib.nullcontext()


def _or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Adam moments before the first step do not exist yet: offer zeros of the right shape."""
    return t.detach().cpu() if t is not None else torch.zeros_like(like)


def _ensure_adam_state(ds_optimizer) -> None:
    """Makes every ZeRO partition's Adam state exist and be linked to the model parameters.
    A fresh optimizer has none yet (a resume loads into it), and DeepSpeed 0.19 links the
    state fragments once, after stepping only the first parameter group, so later groups'
    parameters would expose no ``exp_avg``: create what is missing and link again."""
    base = getattr(ds_optimizer, "optimizer", None)
    if base is None:
        return
    for p in _fp32_partitions(ds_optimizer):
        if not base.state[p]:
            base.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
    if hasattr(ds_optimizer, "_hp_optimizer_states_linked"):
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()


def _fp32_partitions(ds_optimizer) -> list[torch.Tensor]:
    """The tensors the base optimizer keys its state by: ZeRO-1/2 and ZeRO-3 name their fp32
    partitions differently (ZeRO-3 swaps them into the groups only while stepping)."""
    base = getattr(ds_optimizer, "optimizer", ds_optimizer)
    return list(
        getattr(ds_optimizer, "fp32_partitioned_groups_flat", None)
        or getattr(ds_optimizer, "single_partition_of_fp32_groups", None)
        or [p for g in base.param_groups for p in g["params"]]
    )


def _set_adam_step(ds_optimizer, step: int) -> None:
    """The torch AdamW inside ZeRO keys its state by fp32 partitions; set their step count."""
    base = getattr(ds_optimizer, "optimizer", ds_optimizer)
    for p in _fp32_partitions(ds_optimizer):
        base.state[p]["step"] = torch.tensor(float(step))
