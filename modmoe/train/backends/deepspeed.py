"""The ``deepspeed`` backend: the native model under DeepSpeed ZeRO (stages 0-3), combinable with
expert parallelism. Its DeepSpeed config comes from :mod:`.deepspeed_config`.

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

from modmoe.checkpoint.manager import DcpStateIO, StateIO
from modmoe.checkpoint.train_state import (
    MODEL_KEY,
    OPTIM_KEY,
    OPTIM_STATE_KEY,
    SCHEDULER_KEY,
    load_schedule,
    schedule_state,
)
from modmoe.model.moe import GroupedExperts, MoE
from modmoe.model.transformer import MoDETransformer
from modmoe.parallel.distributed import DistEnv
from modmoe.parallel.grad_norm import clip_grad_norm
from modmoe.parallel.parallelize import reduce_expert_grads
from modmoe.train.backends.deepspeed_config import deepspeed_config
from modmoe.train.backends.native import NativeModelBackend
from modmoe.train.optim import build_optimizer, build_scheduler
from modmoe.train.resolve import ResolvedJob

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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


class DeepSpeedBackend(NativeModelBackend):
    """The native model under DeepSpeed ZeRO (``parallel.dp_backend: deepspeed``)."""

    name = "deepspeed"

    def __init__(self, job: ResolvedJob, env: DistEnv, load_pretrained: bool = False) -> None:
        import deepspeed

        # DeepSpeed needs a process group even for one rank (a plain process, or torchrun with one).
        self._own_group = not dist.is_initialized()
        if self._own_group:
            backend = "nccl" if env.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        super().__init__(job, env, load_pretrained)
        cfg, model = self.cfg, self.core
        # Before DeepSpeed copies the parameters into its (fp32, partitioned) optimizer state.
        self._import_pretrained()
        self.experts = detach_experts(model) if self.dims.ep > 1 else {}
        self.expert_params = {
            f"{name}.{p_name}": p for name, mod in self.experts.items() for p_name, p in mod.named_parameters()
        }
        dense_optimizer = build_optimizer(model, cfg.optimizer)
        dense_scheduler = build_scheduler(dense_optimizer, cfg.optimizer, cfg.trainer.max_steps)
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed insists, even in a plain process
        self.ds_config = deepspeed_config(cfg, job.accum_steps, self.dims.zero_stage, self.autocast == torch.bfloat16)
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
    def _backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-batches itself, and the loss is already divided by their number.
        self.module.backward(loss, scale_wrt_gas=False)
        self._lr = self.ds_scheduler.get_last_lr()[0]  # what this step uses: step() moves the schedule on
        self.module.step()  # a real optimizer step only at the accumulation boundary

    def _apply_gradients(self, apply) -> tuple[float | None, bool]:
        if apply is not None:  # resolve_job refuses trainer.numerics.on_nonfinite=skip here
            raise ValueError("the deepspeed backend cannot hold back a step (DeepSpeed applied it in its backward)")
        dense_norm = self.module.get_global_grad_norm()
        expert_norm = None
        if self.expert_optimizer is not None:
            reduce_expert_grads(list(self.expert_params.values()), self.dims)
            expert_norm = clip_grad_norm(self.expert_params.values(), self.cfg.optimizer.grad_clip)
            self.expert_optimizer.step()
            self.expert_scheduler.step()
            self.expert_optimizer.zero_grad(set_to_none=True)
        if dense_norm is None:
            return None, True
        total = float(dense_norm) ** 2 + (float(expert_norm) ** 2 if expert_norm is not None else 0.0)
        return total**0.5, True

    def lr(self) -> float:
        """The learning rate of the step just taken (the trainer asks after the backward passes,
        which under DeepSpeed already stepped the optimizer and the schedule)."""
        return self._lr

    def state_io(self) -> StateIO:
        return DcpStateIO({"train": DeepSpeedTrainState(self)})

    def close(self) -> None:
        super().close()
        if self._own_group and dist.is_initialized():
            import deepspeed.comm

            # DeepSpeed's teardown: it also forgets the groups it cached (a later run in this
            # process would otherwise reach the destroyed ones).
            deepspeed.comm.destroy_process_group()


class DeepSpeedTrainState(Stateful):
    """Model, Adam moments and schedules of a DeepSpeed run, keyed by parameter name like a
    native checkpoint. Gathering full tensors from ZeRO partitions is collective: every rank
    calls ``state_dict`` (DCP does)."""

    holds_model = True

    def __init__(self, backend: DeepSpeedBackend) -> None:
        self.backend = backend

    def _dense_params(self) -> dict[str, nn.Parameter]:
        return dict(self.backend.core.named_parameters())

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        backend = self.backend
        _ensure_adam_state(backend.ds_optimizer)
        step = torch.tensor(float(backend.module.global_steps))
        model: dict[str, Any] = {}
        optim: dict[str, dict[str, Any]] = {}
        for name, p in self._dense_params().items():
            model[name] = safe_get_full_fp32_param(p).detach().cpu()
            optim[name] = {key: _or_zeros(safe_get_full_optimizer_state(p, key), model[name]) for key in ADAM_MOMENTS}
            optim[name]["step"] = step.clone()
        model.update(_persistent_buffers(backend.core))  # expert biases, the prefix-rank priors
        for name, p in backend.expert_params.items():
            model[name] = p
            state = backend.expert_optimizer.state.get(p, {})
            optim[name] = {key: state[key] if key in state else torch.zeros_like(p) for key in ADAM_MOMENTS}
            optim[name]["step"] = step.clone()
        # The same keys as a native TrainState: either backend resumes the other's checkpoints.
        return {
            MODEL_KEY: model,
            OPTIM_KEY: {OPTIM_STATE_KEY: optim},
            SCHEDULER_KEY: schedule_state(backend.ds_scheduler),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """DCP has loaded into the tensors ``state_dict()`` offered; push them into ZeRO's
        partitions and the expert optimizer."""
        backend = self.backend
        _ensure_adam_state(backend.ds_optimizer)
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
        for name, buf in backend.core.named_buffers():
            if name in model:
                buf.copy_(model[name])
        _set_adam_step(backend.ds_optimizer, step)
        backend.module.global_steps = step
        load_schedule(backend.ds_scheduler, state_dict[SCHEDULER_KEY])
        if backend.expert_optimizer is not None:
            for name, p in backend.expert_params.items():
                state = backend.expert_optimizer.state[p]
                for key in ADAM_MOMENTS:
                    state[key] = optim[name][key]
                state["step"] = torch.tensor(float(step))
            load_schedule(backend.expert_scheduler, state_dict[SCHEDULER_KEY])


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a native ``state_dict`` holds (those registered persistent), by name: ZeRO
    partitions parameters only, so these are whole on every rank."""
    return {
        f"{prefix}.{name}" if prefix else name: buf
        for prefix, mod in module.named_modules()
        for name, buf in mod.named_buffers(recurse=False)
        if buf is not None and name not in mod._non_persistent_buffers_set
    }


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
