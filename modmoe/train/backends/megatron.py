"""The ``megatron`` backend: MoDE layers hosted by Megatron-Core's ``GPTModel`` (``engine: megatron``).

- layout: ``parallel_state.initialize_model_parallel`` with the translated TP/PP/CP/EP/ETP
  (``modmoe.engines.megatron.translate``, decided by ``resolve_job``);
- model: ``GPTModel`` with MoDE layers for this pipeline stage (:mod:`modmoe.engines.megatron.spec`),
  bf16 through ``Float16Module``;
- data parallel: Megatron DDP + Megatron optimizer (distributed or replicated), driven by
  ``get_forward_backward_func()`` (1F1B when ``pp > 1``); or DeepSpeed ZeRO-1/2 when ``pp = 1``
  (the DeepSpeed config is the native backend's, :mod:`.deepspeed_config`);
- batches: the Trainer's, split over data-parallel ranks only (TP/PP/CP peers read the same
  rows; CP ranks keep their two load-balanced chunks);
- losses: token-mean cross-entropy per micro-batch; MoE balance losses and the MoD BCE losses
  ride on activations (``MoEAuxLossAutoScaler``), so every pipeline stage adds its own;
- checkpoints: :class:`~modmoe.engines.megatron.checkpoint.MegatronStateIO` (dist_checkpointing,
  resumes under another layout), committed by the Trainer's checkpoint manager;
- initial weights: every rank loads its part of the native model's initialisation, or, on a fresh
  start of a ``model.from_hf`` job, its part of the pretrained checkpoint
  (:mod:`modmoe.engines.megatron.pretrained`; a resumed run reads its checkpoint instead).

On a CPU device (tests, debugging) the backend runs inside
:func:`~modmoe.engines.megatron.cpu_emulation.megatron_on_cpu` with local layers and gloo.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from modmoe.engines.megatron.compat import prepare_megatron
from modmoe.engines.megatron.translate import MegatronPlan, build_transformer_config
from modmoe.parallel.distributed import DistEnv
from modmoe.train.backends.base import Batch, PlotData, StepStats
from modmoe.train.backends.deepspeed_config import deepspeed_config
from modmoe.train.backends.keys import MEGATRON_KEYS
from modmoe.train.optim import build_optimizer, lr_factor
from modmoe.train.resolve import ResolvedJob

log = logging.getLogger(__name__)

MOE_METRIC_NAMES = {  # Megatron tracker name -> native metric name (summed over MoE layers)
    "load_balancing_loss": "moe_aux_loss",
    "global_load_balancing_loss": "moe_aux_loss",
    "seq_load_balancing_loss": "moe_seq_aux_loss",
    "z_loss": "moe_z_loss",
}


def cp_slice(t: torch.Tensor, cp_rank: int, cp: int) -> torch.Tensor:
    """(b, s) -> (b, s/cp): chunks ``cp_rank`` and ``2cp-1-cp_rank`` of 2cp, Megatron's
    load-balanced causal split."""
    if cp == 1:
        return t
    chunks = t.chunk(2 * cp, dim=1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=1)


class DeepSpeedMpu:
    """The process-group queries DeepSpeed makes of an ``mpu``, answered from Megatron's
    parallel state: DeepSpeed's "model parallel" is Megatron's tensor parallel (pp = 1)."""

    def __init__(self, ps) -> None:
        self.ps = ps

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()


class ExpertLoads:
    """Tokens each expert of each MoE layer received since the last :meth:`take`, counted by a
    forward hook on Megatron's routers (their ``routing_map``), for the native metric names
    and the expert-load heatmap."""

    def __init__(self, gpt: torch.nn.Module, num_layers: int, num_experts: int, device: torch.device) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)  # (L, E)
        self.layers: set[int] = set()
        for layer in gpt.decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if isinstance(router, TopKRouter):
                index = layer.layer_number - 1  # global, 0-based
                self.layers.add(index)
                router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(_module, _inputs, output) -> None:
            routing_map = output[1]  # (tokens, E) bool
            self.counts[index] += routing_map.detach().sum(0).to(self.counts.dtype)

        return count

    def take(self) -> dict[int, torch.Tensor]:
        """Per MoE layer, its experts' share of the routed slots over all ranks (every rank
        calls it; tensor-parallel replicas count the same tokens, which shares cancel)."""
        counts = self.counts.clone()
        self.counts.zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        counts = counts.cpu()
        return {i: counts[i] / counts[i].sum().clamp_min(1) for i in range(counts.shape[0]) if counts[i].sum() > 0}


class MegatronBackend:
    name = "megatron"
    honoured = MEGATRON_KEYS

    def __init__(self, job: ResolvedJob, env: DistEnv, load_pretrained: bool = False) -> None:
        """``load_pretrained``: start from ``model.from_hf`` (a fresh start; a resumed run takes its
        weights from the checkpoint)."""
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

        from modmoe.engines.megatron.cpu_emulation import megatron_on_cpu

        self.cfg, self.env, self.device = job.cfg, env, env.device
        self.load_pretrained = load_pretrained
        self.pretrained_load = None  # what this rank read of model.from_hf (PretrainedLoad), on a fresh import
        self.plan: MegatronPlan = job.layout
        self.cpu = self.device.type == "cpu"
        self._exit = contextlib.ExitStack()
        if self.cpu:
            self._exit.enter_context(megatron_on_cpu())
        self._own_group = False
        if not dist.is_initialized():  # Megatron needs a process group, even for one rank
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        prepare_megatron()
        self.ps = parallel_state
        parallel_state.initialize_model_parallel(**self.plan.layout.parallel_state_kwargs())
        tc = self.cfg.trainer
        if not self.cpu:  # Megatron's CUDA RNG tracker (dropout is 0; the weights come from the native model)
            tensor_parallel.model_parallel_cuda_manual_seed(tc.seed)
        self.dp = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = job.accum_steps
        # Megatron keeps both at module level: start from nothing left by an earlier model.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        get_moe_layer_wise_logging_tracker().clear()
        self._build_model(job)
        self._build_inputs()
        m = self.cfg.model
        self.loads = ExpertLoads(self.gpt, m.num_layers, m.moe.num_experts, self.device) if m.moe.enabled else None
        self._lr = 0.0
        self._step = 0
        self._last_loads: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def _build_model(self, job: ResolvedJob) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        from modmoe.engines.megatron.convert import MegatronLayout
        from modmoe.engines.megatron.load import load_native_weights
        from modmoe.engines.megatron.spec import build_gpt_model

        plan, opt, ps, mc = self.plan, self.cfg.optimizer, self.ps, self.cfg.megatron
        # Megatron initialises (which also marks the tensor-parallel parameters), then every layout
        # overwrites its part with the native model's initial weights, or the pretrained ones.
        self.tconfig = build_transformer_config(plan, use_cpu_initialization=self.cpu)
        self.bf16 = bool(self.tconfig.bf16)
        self.gpt = build_gpt_model(plan, self.tconfig, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        self.gpt.to(self.device)
        m = self.cfg.model
        load_native_weights(self.gpt, m, self._initial_weights(), MegatronLayout.for_plan(plan.use_te, mc.grouped_gemm))
        if self.pretrained_load is not None:
            log.info("rank %d: pretrained weights: %s", self.env.rank, self.pretrained_load.summary())
        module = Float16Module(self.tconfig, self.gpt) if self.bf16 else self.gpt
        self.optimizer, self.deepspeed = None, None
        if plan.optimizer == "deepspeed":
            self.model = self._deepspeed(module, job)
            return
        distributed = plan.optimizer == "distributed"
        overlap = not self.cpu  # CPU runs (tests) keep every collective synchronous
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap and mc.overlap_grad_reduce,
            overlap_param_gather=overlap and distributed and mc.overlap_param_gather,
            use_distributed_optimizer=distributed,
        )
        self.model = DistributedDataParallel(config=self.tconfig, ddp_config=ddp_cfg, module=module)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.beta1,
                adam_beta2=opt.beta2,
                adam_eps=opt.eps,
                clip_grad=opt.grad_clip or 0.0,
                bf16=self.bf16,
                params_dtype=self.tconfig.params_dtype,
                use_distributed_optimizer=distributed,
                overlap_param_gather=ddp_cfg.overlap_param_gather,
            ),
            [self.model],
        )
        self.tconfig.no_sync_func = self.model.no_sync
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward_func = get_forward_backward_func()

    def _initial_weights(self):
        """The native tensors this rank loads: the pretrained checkpoint's on a fresh import, else
        the native model's initialisation for the seed."""
        from modmoe.engines.megatron.load import native_init_reader
        from modmoe.engines.megatron.pretrained import pretrained_reader

        m, seed = self.cfg.model, self.cfg.trainer.seed
        if not self.load_pretrained:
            return native_init_reader(m, seed)
        read, self.pretrained_load = pretrained_reader(m, seed)
        return read

    def _deepspeed(self, module: torch.nn.Module, job: ResolvedJob):
        """DeepSpeed ZeRO-1/2 over the data-parallel group (pp = 1, ep = 1: checked by translate)."""
        import deepspeed

        ds_cfg = deepspeed_config(self.cfg, job.accum_steps, self.plan.zero_stage, self.bf16)
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # DeepSpeed insists, even in a plain process
        optimizer = build_optimizer(module, self.cfg.optimizer)
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_cfg, mpu=DeepSpeedMpu(self.ps), dist_init_required=False
        )
        self.deepspeed = engine
        self.ds_config = ds_cfg
        return engine

    def _build_inputs(self) -> None:
        s, b = self.cfg.data.seq_len, self.cfg.trainer.micro_batch_size
        cp, cp_rank = self.ps.get_context_parallel_world_size(), self.ps.get_context_parallel_rank()
        self._cp = (cp_rank, cp)
        positions = torch.arange(s, device=self.device)[None].expand(b, s)
        self.position_ids = cp_slice(positions, cp_rank, cp)
        # Megatron's local attention builds its default causal mask on CUDA; on CPU pass one.
        causal = ~torch.ones(s, s, dtype=torch.bool, device=self.device).tril()[None, None]
        self.attention_mask = causal if self.cpu else None

    # ------------------------------------------------------------------ facts
    def dp_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def describe(self) -> str:
        plan = self.plan
        lay = plan.layout
        parts = [
            f"tp {lay.tp} pp {lay.pp} cp {lay.cp} ep {lay.ep} etp {lay.etp} dp {lay.dp}",
            f"{'TE' if plan.use_te else 'local'} layers",
            f"{plan.optimizer} optimizer",
            *([f"{plan.dispatcher} dispatcher"] if plan.dispatcher else []),
            "bf16" if self.bf16 else "fp32",
        ]
        cpu = f"; on CPU: {', '.join(plan.cpu_choices)}" if plan.cpu_choices else ""
        weights = f"the native model's (seed {self.cfg.trainer.seed})"
        if self.pretrained_load is not None:
            weights = f"model.from_hf ({self.pretrained_load.summary()})"
        return f"megatron backend: {', '.join(parts)}{cpu}; routed layers {list(plan.routed_layers)}; initial weights: {weights}"

    def layout_tag(self) -> str:
        lay = self.plan.layout
        return f"tp{lay.tp}-pp{lay.pp}-cp{lay.cp}-ep{lay.ep}-dp{lay.dp}-{self.plan.optimizer}"

    # ------------------------------------------------------------------ steps
    def _batches(self, batches: list[Batch]):
        cp_rank, cp = self._cp
        for inputs, targets in batches:
            yield (
                cp_slice(inputs.to(self.device), cp_rank, cp),
                cp_slice(targets.to(self.device), cp_rank, cp),
            )

    def _forward_step(self, data_iterator, model):
        tokens, targets = next(data_iterator)
        out = model(tokens, self.position_ids[: tokens.shape[0]], self.attention_mask, labels=targets)  # [b, s]
        return out, self._loss

    @staticmethod
    def _loss(per_token: torch.Tensor):
        total = per_token.float().sum()
        count = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    def _reduce_loss(self, reports: list[dict]) -> float:
        """Token-mean loss of the global batch, on every rank (only the last stage computes it)."""
        packed = torch.zeros(2, device=self.device)
        for r in reports:
            packed += r["lm loss"].to(packed.device)
        dist.all_reduce(packed, group=self.ps.get_data_parallel_group(with_context_parallel=True))
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(packed, group=self.ps.get_pipeline_model_parallel_group())
        return float(packed[0] / packed[1].clamp_min(1))

    def _run_microbatches(self, batches: list[Batch], forward_only: bool) -> list[dict]:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        if self.deepspeed is not None or self.tconfig.num_moe_experts is None:
            # Megatron's schedule sets the aux-loss gradient scale (1 / micro-batches) for MoE
            # models only; DeepSpeed (1 / accumulation steps on the main loss) never does.
            MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 1.0 / len(batches), device=self.device))
        if self.deepspeed is not None:
            return self._deepspeed_microbatches(batches, forward_only)
        return (
            self.forward_backward_func(
                forward_step_func=self._forward_step,
                data_iterator=self._batches(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=self.cfg.data.seq_len,
                micro_batch_size=self.cfg.trainer.micro_batch_size,
                forward_only=forward_only,
            )
            or []
        )

    def _deepspeed_microbatches(self, batches: list[Batch], forward_only: bool) -> list[dict]:
        reports = []
        for tokens, targets in self._batches(batches):
            out = self.model(tokens, self.position_ids[: tokens.shape[0]], self.attention_mask, labels=targets)
            total, count, report = self._loss(out)
            if not forward_only:
                self.model.backward(total / count)
                self.model.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            reports.append(report)
        return reports

    def _set_lr(self, step: int) -> float:
        lr = self.cfg.optimizer.lr * lr_factor(step, self.cfg.optimizer, self.cfg.trainer.max_steps)
        groups = self.deepspeed.optimizer.param_groups if self.deepspeed is not None else self.optimizer.param_groups
        for g in groups:
            g["lr"] = lr
        return lr

    def forward_backward(self, batches: list[Batch], step: int) -> StepStats:
        self.model.train()
        self._lr = self._set_lr(step)
        if self.deepspeed is None:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        reports = self._run_microbatches(batches, forward_only=False)
        loss = self._reduce_loss(reports)
        metrics = self._aux_metrics()
        if self.loads is not None:
            self._last_loads = self.loads.take()
            metrics.update(expert_load_metrics(self._last_loads, self.cfg.model.moe.num_experts))
        return StepStats(loss=loss, metrics=metrics)

    def optimizer_step(self, apply=None) -> float | None:
        if apply is not None:  # resolve_job refuses trainer.numerics.on_nonfinite=skip here
            raise ValueError("the megatron backend cannot hold back a step (its optimizer clips and applies at once)")
        from modmoe.engines.megatron.layer import update_depth_priors

        dp_group = self.ps.get_data_parallel_group(with_context_parallel=True)
        if self.deepspeed is None:
            ok, grad_norm, _ = self.optimizer.step()  # not ok: Megatron skipped a non-finite step
            update_depth_priors([self.gpt], dp_group, applied=bool(ok))
            return None if grad_norm is None else float(grad_norm)
        update_depth_priors([self.gpt], dp_group)
        norm = self.deepspeed.get_global_grad_norm()
        if self.tconfig.moe_router_enable_expert_bias:
            # Megatron updates the expert bias in finalize_model_grads, which DeepSpeed bypasses.
            from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

            _update_router_expert_bias([self.gpt], self.tconfig)
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self._lr

    def step_metrics(self) -> dict[str, float]:
        return {}

    def _aux_metrics(self) -> dict[str, float]:
        """MoE balance losses (Megatron's tracker) and MoD losses, as the native model names them."""
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        from modmoe.engines.megatron.layer import collect_depth_metrics

        out: dict[str, float] = {}
        m = self.cfg.model
        if m.moe.enabled:
            totals: dict[str, torch.Tensor] = {}
            freq = self.tconfig.moe_layer_freq
            # Every rank must reduce the same names, even a pipeline stage without MoE layers.
            batch_scope = self.cfg.megatron.aux_loss_scope == "micro_batch"
            names = [
                n
                for n, on in (
                    ("load_balancing_loss", m.moe.aux_loss_coef > 0 and batch_scope),
                    ("global_load_balancing_loss", m.moe.aux_loss_coef > 0 and not batch_scope),
                    ("seq_load_balancing_loss", m.moe.seq_aux_loss_coef > 0),
                    ("z_loss", m.moe.z_loss_coef > 0),
                )
                if on
            ]
            track_moe_metrics(
                loss_scale=1.0 / self.num_microbatches,
                iteration=self._step,
                total_loss_dict=totals,
                num_layers=m.num_layers,
                moe_layer_freq=freq,
                force_initialize=True,
                track_names=names,
            )
            n_moe = sum(freq) if isinstance(freq, list) else m.num_layers
            if "z_loss" in totals:  # Megatron logs each rank's own z-loss: average it like the others
                group = self.ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
                z = totals["z_loss"].detach().reshape(1).to(self.device)
                dist.all_reduce(z, group=group)
                totals["z_loss"] = z / dist.get_world_size(group)
            for name, value in totals.items():
                key = MOE_METRIC_NAMES.get(name, f"moe_{name}")
                out[key] = out.get(key, 0.0) + float(value) * n_moe
        out.update(
            collect_depth_metrics(
                [self.gpt],
                self.tconfig.sequence_parallel,
                self.ps.get_tensor_model_parallel_group(),
                self.ps.get_pipeline_model_parallel_group(),
                self.ps.get_data_parallel_group(),
            )
        )
        # The weighted sum the backward pass added, as the native model defines it (Megatron
        # tracks exactly the losses whose coefficient is not 0).
        coefs = {
            "moe_aux_loss": m.moe.aux_loss_coef,
            "moe_seq_aux_loss": m.moe.seq_aux_loss_coef,
            "moe_z_loss": m.moe.z_loss_coef,
            "mod_bce_loss": m.depth.bce_loss_coef,
            "mod_predictor_loss": 1.0,
        }
        out["aux_loss_total"] = sum(coef * out[name] for name, coef in coefs.items() if name in out)
        self._step += 1
        return out

    @contextlib.contextmanager
    def _params_gathered(self):
        """With the distributed optimizer's overlapped parameter all-gather, finish it and pause
        the forward hooks (for evaluation and checkpoints, as Megatron-LM does)."""
        hooks = self.optimizer is not None and getattr(self.model, "use_forward_hook", False)
        if hooks:
            self.model.disable_forward_pre_hook()
        try:
            yield
        finally:
            if hooks:
                self.model.enable_forward_pre_hook()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> dict[str, float]:
        """Validation loss under top-k routing (causal-routing evaluation runs on the native
        model after export: Megatron's layers have no per-token routing mode)."""
        self.model.eval()
        with self._params_gathered():
            reports = self._run_microbatches(list(batches), forward_only=True)
        self.model.train()
        if self.loads is not None:
            self.loads.take()  # validation tokens are not training loads
        return {"eval/loss_topk": self._reduce_loss(reports)}

    @torch.no_grad()
    def plot_data(self, sample: torch.Tensor, decode) -> PlotData:
        """Expert loads of the last step, and which of the first validation sequence's tokens
        each routed layer took (one forward pass of a validation micro-batch)."""
        from modmoe.engines.megatron.layer import MoDETransformerLayer

        names = [f"layer {i}" for i in sorted(self._last_loads)]
        loads = np.stack([self._last_loads[i].numpy() for i in sorted(self._last_loads)]) if names else None
        routing = None
        routed = list(self.plan.routed_layers)
        if routed:
            T = sample.shape[1]
            rows = sample.expand(self.cfg.trainer.micro_batch_size, T)
            layers = [m for m in self.gpt.modules() if isinstance(m, MoDETransformerLayer)]
            for layer in layers:
                layer.record_selection = True
            self.model.eval()
            with self._params_gathered():
                self._run_microbatches([(rows, rows)], forward_only=True)
            self.model.train()
            chosen = torch.zeros(self.cfg.model.num_layers, T, device=self.device)  # (L, T)
            for layer in layers:
                layer.record_selection = False
                chosen[layer.layer_number - 1, layer.last_selection[:, 0]] = 1.0  # row 0's chosen positions
            if self.ps.get_pipeline_model_parallel_world_size() > 1:  # routed layers on other stages
                dist.all_reduce(chosen, group=self.ps.get_pipeline_model_parallel_group())
            if self.loads is not None:
                self.loads.take()
            texts = [decode([int(t)]) for t in sample[0]]
            routing = (texts, chosen[routed].bool().cpu().numpy(), [f"layer {i}" for i in routed])
        return PlotData(names, loads, routing)

    # ------------------------------------------------------------------ checkpoints, teardown
    def state_io(self):
        from modmoe.engines.megatron.checkpoint import MegatronStateIO

        return MegatronStateIO(
            self.gpt, self.optimizer, self.deepspeed, around=self._params_gathered, ep=self.plan.layout.ep
        )

    def close(self) -> None:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

        # Megatron keeps these at module level: leave nothing behind for a later model in this process.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        get_moe_layer_wise_logging_tracker().clear()
        self.ps.destroy_model_parallel()
        if self._own_group:
            if self.deepspeed is not None:
                import deepspeed.comm

                # DeepSpeed's teardown also drops the mpu and groups it cached at module level.
                deepspeed.comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        self._exit.close()


def expert_load_metrics(shares: dict[int, torch.Tensor], num_experts: int) -> dict[str, float]:
    """The native router-health names for expert loads (``moe/layerN/...`` and their means)."""
    out: dict[str, float] = {}
    if not shares:
        return out
    for i, share in shares.items():
        out[f"moe/layer{i}/max_over_mean_load"] = float(share.max() * num_experts)
        out[f"moe/layer{i}/dead_experts"] = float((share < 0.01).sum())
        out[f"moe/layer{i}/dropped_fraction"] = 0.0  # dropless: translate refuses a capacity factor
        for e, value in enumerate(share.tolist()):
            out[f"moe/layer{i}/expert_load/{e}"] = value
    layers = list(shares)
    out["moe/max_over_mean_load"] = sum(out[f"moe/layer{i}/max_over_mean_load"] for i in layers) / len(layers)
    out["moe/dead_experts"] = sum(out[f"moe/layer{i}/dead_experts"] for i in layers)
    out["moe/dropped_fraction"] = 0.0
    return out
