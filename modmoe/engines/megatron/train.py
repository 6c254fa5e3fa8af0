"""Training through Megatron-Core: ``run_megatron_training(cfg)`` for ``engine: megatron``.

The run-directory contract is the native trainer's (``config.yaml``, ``metrics.jsonl``,
checkpoints, ``STOP`` / ``COMPLETED`` files, SIGUSR1/SIGTERM -> checkpoint and exit), so
``launch/train.sbatch`` drives both engines unchanged. Inside:

- layout: ``parallel_state.initialize_model_parallel`` with the translated TP/PP/CP/EP/ETP;
- model: ``GPTModel`` with MoDE layers for this pipeline stage (:mod:`.spec`), bf16 through
  ``Float16Module``;
- data parallel: Megatron DDP + Megatron optimizer (distributed or replicated), driven by
  ``get_forward_backward_func()`` (1F1B when ``pp > 1``); or DeepSpeed ZeRO-1/2 when ``pp = 1``;
- batches: the native ``SequenceSampler`` split over data-parallel ranks only (TP/PP/CP peers
  read the same rows; CP ranks keep their two load-balanced chunks);
- losses: token-mean cross-entropy per micro-batch; MoE balance losses and the MoD BCE losses
  ride on activations (``MoEAuxLossAutoScaler``), so every pipeline stage adds its own;
- checkpoints: :mod:`.checkpoint` (dist_checkpointing; resumes under another layout).

On a CPU device (tests, debugging) the run happens inside
:func:`~modmoe.engines.megatron.cpu_emulation.megatron_on_cpu` with local layers and gloo.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from modmoe.config import JobConfig
from modmoe.config_base import ConfigError
from modmoe.engines.megatron.compat import prepare_megatron, te_available
from modmoe.engines.megatron.config import MegatronConfig
from modmoe.engines.megatron.translate import MegatronPlan, build_transformer_config, translate
from modmoe.model.flops import count_flops
from modmoe.parallel.distributed import DistEnv, init_distributed
from modmoe.train import memory, throughput
from modmoe.train.metrics_log import MetricsLog
from modmoe.train.optim import lr_factor
from modmoe.train.stop import COMPLETED_FILE, open_run_dir

MOE_METRIC_NAMES = {  # Megatron tracker name -> native metric name (summed over MoE layers)
    "load_balancing_loss": "moe_aux_loss",
    "global_load_balancing_loss": "moe_aux_loss",
    "seq_load_balancing_loss": "moe_seq_aux_loss",
    "z_loss": "moe_z_loss",
}


def init_process_group(cfg: JobConfig) -> tuple[DistEnv, bool]:
    """torchrun's group when launched by it; otherwise a 1-rank group (Megatron needs one).
    Returns the environment and whether this call created the group."""
    env = init_distributed(cfg.parallel, cfg.trainer.device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    return env, created


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


class MegatronTrainer:
    def __init__(self, cfg: JobConfig, engine: MegatronConfig, resume: str = "auto", log=print) -> None:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

        self.cfg, self.engine_cfg, self.log = cfg, engine, log
        tc = cfg.trainer
        self.env, self._own_group = init_process_group(cfg)
        self.cpu = self.env.device.type == "cpu"
        precision = "fp32" if self.cpu and tc.precision == "auto" else tc.precision
        self.plan: MegatronPlan = translate(
            cfg.model,
            cfg.parallel,
            engine,
            world_size=self.env.world_size,
            seq_len=cfg.data.seq_len,
            precision=precision,
            te_available=te_available() and not self.cpu,
        )
        self.run_dir = Path(tc.run_dir)
        self.ckpt_root = self.run_dir / cfg.checkpoint.dirname
        self.stop = open_run_dir(cfg, self.env.is_main, self.env.device)
        prepare_megatron()
        self.ps = parallel_state
        parallel_state.initialize_model_parallel(**self.plan.layout.parallel_state_kwargs())
        torch.manual_seed(tc.seed)  # CPU init: every rank builds the same master weights
        if not self.cpu:
            tensor_parallel.model_parallel_cuda_manual_seed(tc.seed)
        self.dp, self.dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        if tc.global_batch_size % (tc.micro_batch_size * self.dp):
            raise ConfigError(
                f"config error: trainer.global_batch_size = {tc.global_batch_size}: must be a multiple of "
                f"micro_batch_size * data-parallel ranks ({tc.micro_batch_size} * {self.dp})"
            )
        self.num_microbatches = tc.global_batch_size // (tc.micro_batch_size * self.dp)
        # Megatron keeps both at module level: start from nothing left by an earlier model.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        get_moe_layer_wise_logging_tracker().clear()
        self._build_model()
        self._build_data()
        self.step = 0
        self.flops = count_flops(cfg.model, cfg.data.seq_len)
        self._resume(resume)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.env.is_main else None
        self.tracker = self._tracker() if self.env.is_main and cfg.logging.mlflow.enabled else None

    # ------------------------------------------------------------------ set-up
    def _build_model(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        from modmoe.engines.megatron.spec import build_gpt_model

        plan, opt, ps = self.plan, self.cfg.optimizer, self.ps
        self.tconfig = build_transformer_config(plan, use_cpu_initialization=self.cpu)
        self.bf16 = bool(self.tconfig.bf16)
        self.gpt = build_gpt_model(plan, self.tconfig, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        self.gpt.to(self.env.device)
        module = Float16Module(self.tconfig, self.gpt) if self.bf16 else self.gpt
        self.optimizer, self.deepspeed = None, None
        if plan.optimizer == "deepspeed":
            self.model = self._deepspeed(module)
            return
        distributed = plan.optimizer == "distributed"
        overlap = not self.cpu  # CPU runs (tests) keep every collective synchronous
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap and self.engine_cfg.overlap_grad_reduce,
            overlap_param_gather=overlap and distributed and self.engine_cfg.overlap_param_gather,
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
        self.forward_backward = get_forward_backward_func()

    def _deepspeed(self, module: torch.nn.Module):
        """DeepSpeed ZeRO-1/2 over the data-parallel group (pp = 1, ep = 1: checked by translate)."""
        import deepspeed

        from modmoe.train.optim import param_groups

        tc, opt = self.cfg.trainer, self.cfg.optimizer
        ds_cfg = {
            "train_micro_batch_size_per_gpu": tc.micro_batch_size,
            "gradient_accumulation_steps": self.num_microbatches,
            "zero_optimization": {"stage": self.plan.zero_stage},
            "bf16": {"enabled": self.bf16},
            "gradient_clipping": opt.grad_clip or 0.0,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": opt.lr,
                    "betas": [opt.beta1, opt.beta2],
                    "eps": opt.eps,
                    "weight_decay": opt.weight_decay,
                },
            },
            "steps_per_print": 10**9,
        }
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # DeepSpeed insists, even in a plain process
        groups = param_groups(module.parameters(), opt.weight_decay)
        engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=groups, config=ds_cfg, mpu=DeepSpeedMpu(self.ps)
        )
        self.deepspeed = engine
        return engine

    def _build_data(self) -> None:
        from modmoe.data import SequenceSampler, prepare_data, validation_batches

        cfg, tc = self.cfg, self.cfg.trainer
        if self.env.is_main:
            self.data = prepare_data(cfg.data, log=self._log_main)
        dist.barrier()
        if not self.env.is_main:
            self.data = prepare_data(cfg.data, log=lambda _: None)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"config error: model.vocab_size = {cfg.model.vocab_size}: must be >= the tokenizer's "
                f"vocabulary ({self.data.vocab_size})"
            )
        gmb = tc.micro_batch_size * self.dp
        self.sampler = SequenceSampler(
            self.data.open("train"),
            cfg.data.seq_len,
            gmb,
            seed=tc.seed,
            rank=self.dp_rank,
            world=self.dp,
            num_workers=cfg.data.num_workers,
        )
        self.val_batches = validation_batches(
            self.data.open("val"), cfg.data.seq_len, gmb, tc.eval_batches, rank=self.dp_rank, world=self.dp
        )
        s = cfg.data.seq_len
        cp, cp_rank = self.ps.get_context_parallel_world_size(), self.ps.get_context_parallel_rank()
        self._cp = (cp_rank, cp)
        positions = torch.arange(s, device=self.env.device)[None].expand(tc.micro_batch_size, s)
        self.position_ids = cp_slice(positions, cp_rank, cp)
        # Megatron's local attention builds its default causal mask on CUDA; on CPU pass one.
        causal = ~torch.ones(s, s, dtype=torch.bool, device=self.env.device).tril()[None, None]
        self.attention_mask = causal if self.cpu else None

    def _tracker(self):
        from modmoe.tracking import MlflowTracker, default_tags, flatten_config

        lay = self.plan.layout
        layout = f"tp{lay.tp}-pp{lay.pp}-cp{lay.cp}-ep{lay.ep}-dp{lay.dp}-{self.plan.optimizer}"
        meta = self._resumed_meta or {}
        run_id = meta.get("mlflow_run_id")
        tracker = MlflowTracker(
            self.cfg.logging.mlflow,
            self.run_dir,
            run_id=run_id,
            params=None if run_id else flatten_config(self.cfg.model_dump(mode="json")),
            tags=default_tags("megatron", layout),
        )
        if run_id is None:
            tracker.log_artifact(self.run_dir / "config.yaml")
        return tracker

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, resume: str) -> None:
        from modmoe.engines.megatron.checkpoint import latest_valid_checkpoint, load_checkpoint

        self._resumed_meta: dict[str, Any] | None = None
        if resume == "none":
            return
        if resume == "auto":
            path = latest_valid_checkpoint(self.ckpt_root)  # skips interrupted or damaged saves, with a warning
            if path is None:
                return
        else:
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"--resume {resume}: no checkpoint directory there")
        meta = load_checkpoint(path, self.gpt, self.optimizer)
        if self.deepspeed is not None:
            self.deepspeed.load_checkpoint(
                str(path / "deepspeed"),
                tag="zero",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        self.step = int(meta["step"])
        self.sampler.load_state_dict(meta["sampler"])
        self._resumed_meta = meta
        self._log_main(f"resumed from {path} at step {self.step}")
        if self.env.is_main:
            MetricsLog.truncate_after(self.run_dir / "metrics.jsonl", self.step)

    def save_checkpoint(self) -> Path:
        from modmoe.engines.megatron.checkpoint import save_checkpoint

        meta = {
            "sampler": self.sampler.state_dict(),
            "config": self.cfg.model_dump(mode="json"),
            "layout": self.plan.layout.__dict__,
            "engine": "megatron",
            "mlflow_run_id": self.tracker.run_id if getattr(self, "tracker", None) is not None else None,
        }

        def save_deepspeed(path: Path) -> None:
            self.deepspeed.save_checkpoint(str(path / "deepspeed"), tag="zero", save_latest=False)

        with self._params_gathered():
            return save_checkpoint(
                self.ckpt_root,
                self.step,
                self.gpt,
                self.optimizer,
                meta,
                self.cfg.checkpoint.keep_last,
                also_save=save_deepspeed if self.deepspeed is not None else None,
            )

    # ------------------------------------------------------------------ steps
    def _log_main(self, msg: str) -> None:
        if self.env.is_main:
            self.log(msg)

    def _batches(self, batches):
        cp_rank, cp = self._cp
        for inputs, targets in batches:
            yield (
                cp_slice(inputs.to(self.env.device), cp_rank, cp),
                cp_slice(targets.to(self.env.device), cp_rank, cp),
            )

    def _forward_step(self, data_iterator, model):
        tokens, targets = next(data_iterator)
        out = model(
            tokens, self.position_ids[: tokens.shape[0]], self.attention_mask, labels=targets
        )  # [b, s] per-token loss
        return out, self._loss

    @staticmethod
    def _loss(per_token: torch.Tensor):
        total = per_token.float().sum()
        count = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    def _set_lr(self) -> float:
        lr = self.cfg.optimizer.lr * lr_factor(self.step, self.cfg.optimizer, self.cfg.trainer.max_steps)
        groups = self.deepspeed.optimizer.param_groups if self.deepspeed is not None else self.optimizer.param_groups
        for g in groups:
            g["lr"] = lr
        return lr

    def _reduce_loss(self, reports: list[dict]) -> float:
        """Token-mean loss of the global batch, on every rank (only the last stage computes it)."""
        packed = torch.zeros(2, device=self.env.device)
        for r in reports:
            packed += r["lm loss"].to(packed.device)
        dist.all_reduce(packed, group=self.ps.get_data_parallel_group(with_context_parallel=True))
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(packed, group=self.ps.get_pipeline_model_parallel_group())
        return float(packed[0] / packed[1].clamp_min(1))

    def _run_microbatches(self, batches, forward_only: bool) -> list[dict]:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        if self.deepspeed is not None or self.tconfig.num_moe_experts is None:
            # Megatron's schedule sets the aux-loss gradient scale (1 / micro-batches) for MoE
            # models only; DeepSpeed (1 / accumulation steps on the main loss) never does.
            MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 1.0 / len(batches), device=self.env.device))
        if self.deepspeed is not None:
            return self._deepspeed_microbatches(batches, forward_only)
        return (
            self.forward_backward(
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

    def _deepspeed_microbatches(self, batches, forward_only: bool) -> list[dict]:
        reports = []
        for tokens, targets in self._batches(batches):
            out = self.model(tokens, self.position_ids[: tokens.shape[0]], self.attention_mask, labels=targets)
            total, count, report = self._loss(out)
            if not forward_only:
                self.model.backward(total / count)
                self.model.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            reports.append(report)
        return reports

    def train_step(self) -> dict[str, float]:
        tc, t0 = self.cfg.trainer, time.perf_counter()
        memory.start_step(self.env.device)
        self.model.train()
        lr = self._set_lr()
        batches = [self.sampler.next_batch() for _ in range(self.num_microbatches)]
        data_wait = time.perf_counter() - t0
        grad_norm = None
        if self.deepspeed is None:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        reports = self._run_microbatches(batches, forward_only=False)
        if self.deepspeed is None:
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                self._log_main(f"step {self.step + 1}: optimizer step skipped (non-finite gradients)")
        else:
            norm = self.deepspeed.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
            if self.tconfig.moe_router_enable_expert_bias:
                # Megatron updates the expert bias in finalize_model_grads, which DeepSpeed bypasses.
                from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

                _update_router_expert_bias([self.gpt], self.tconfig)
        self.step += 1
        loss = self._reduce_loss(reports)
        step_time = time.perf_counter() - t0
        peak = throughput.peak_tflops_per_device(self.env.device, self.cfg.logging.peak_tflops_per_device)
        metrics = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "step_time_s": step_time,
            "data_wait_s": data_wait,
            # The native model's FLOP count: the same network, skipped tokens not counted.
            **throughput.throughput_metrics(
                tc.global_batch_size * self.cfg.data.seq_len,
                step_time,
                self.flops.training_per_token,
                self.env.world_size,
                peak,
            ),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(memory.step_memory(self.env.device))
        metrics.update(self._aux_metrics())
        return metrics

    def _aux_metrics(self) -> dict[str, float]:
        """MoE balance losses (Megatron's tracker) and MoD losses, as the native trainer names them."""
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        from modmoe.engines.megatron.layer import collect_depth_metrics

        out: dict[str, float] = {}
        m = self.cfg.model
        if m.moe.enabled:
            totals: dict[str, torch.Tensor] = {}
            freq = self.tconfig.moe_layer_freq
            # Every rank must reduce the same names, even a pipeline stage without MoE layers.
            batch_scope = self.engine_cfg.aux_loss_scope == "micro_batch"
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
                iteration=self.step,
                total_loss_dict=totals,
                num_layers=m.num_layers,
                moe_layer_freq=freq,
                force_initialize=True,
                track_names=names,
            )
            n_moe = sum(freq) if isinstance(freq, list) else m.num_layers
            if "z_loss" in totals:  # Megatron logs each rank's own z-loss: average it like the others
                group = self.ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
                z = totals["z_loss"].detach().reshape(1).to(self.env.device)
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss under top-k routing (causal-routing evaluation runs on the native
        model after export: Megatron's layers have no per-token routing mode)."""
        self.model.eval()
        with self._params_gathered():
            reports = self._run_microbatches(list(self.val_batches), forward_only=True)
        self.model.train()
        return {"eval/loss_topk": self._reduce_loss(reports)}

    # ------------------------------------------------------------------ loop
    def stop_requested(self) -> bool:
        return self.stop.requested()

    def describe(self) -> str:
        lay, c = self.plan.layout, self.cfg
        return (
            f"megatron engine: tp {lay.tp} pp {lay.pp} cp {lay.cp} ep {lay.ep} etp {lay.etp} dp {lay.dp}, "
            f"{'TE' if self.plan.use_te else 'local'} layers, {self.plan.optimizer} optimizer, "
            f"{'bf16' if self.bf16 else 'fp32'}; routed layers {list(self.plan.routed_layers)}; "
            f"{self.num_microbatches} micro-batch(es) of {c.trainer.micro_batch_size} x {c.data.seq_len} per step"
        )

    def train(self) -> dict[str, float]:
        tc = self.cfg.trainer
        self.stop.install_signal_handlers()
        self._log_main(self.describe())
        metrics: dict[str, float] = {}
        error: BaseException | None = None
        try:
            while self.step < tc.max_steps:
                metrics = self.train_step()
                last = self.step == tc.max_steps
                if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                    metrics.update(self.evaluate())
                if self.metrics is not None and (self.step % tc.log_every == 0 or last or "eval/loss_topk" in metrics):
                    self.metrics.write(metrics)
                    if self.tracker is not None:
                        self.tracker.log_metrics(
                            {k: float(v) for k, v in metrics.items() if k != "step"}, step=self.step
                        )
                if self.env.is_main and (self.step % max(1, tc.max_steps // 10) == 0 or last):
                    self.log(
                        f"step {self.step}/{tc.max_steps}: loss {metrics['loss']:.4f} "
                        f"{metrics['tokens_per_s']:,.0f} tok/s"
                    )
                if last:
                    self.save_checkpoint()
                elif self.stop_requested():
                    self._log_main(f"stop requested: saving a checkpoint at step {self.step} and exiting")
                    self.save_checkpoint()
                    return metrics
                elif self.cfg.checkpoint.interval_steps and self.step % self.cfg.checkpoint.interval_steps == 0:
                    self.save_checkpoint()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self.tracker is not None:
                self.tracker.close(error)
            if self.metrics is not None:
                self.metrics.close()
        if self.env.is_main:
            (self.run_dir / COMPLETED_FILE).write_text(json.dumps({"step": self.step}) + "\n")
        return metrics

    def close(self) -> None:
        self.sampler.close()
        self.ps.destroy_model_parallel()
        if self._own_group:
            dist.destroy_process_group()


def run_megatron_training(
    cfg: JobConfig, engine: MegatronConfig | None = None, resume: str = "auto"
) -> dict[str, float]:
    """Trains ``cfg`` with the Megatron engine (``engine`` defaults to ``cfg.megatron`` when the
    job config has that section, else to :class:`MegatronConfig` defaults)."""
    from modmoe.engines.megatron.cpu_emulation import megatron_on_cpu

    engine = engine or cfg.megatron
    device_is_cpu = cfg.trainer.device == "cpu" or (cfg.trainer.device == "auto" and not torch.cuda.is_available())
    with megatron_on_cpu() if device_is_cpu else contextlib.nullcontext():
        trainer = MegatronTrainer(cfg, engine, resume=resume)
        try:
            return trainer.train()
        finally:
            trainer.close()


__all__ = ["MegatronTrainer", "run_megatron_training", "cp_slice", "init_process_group"]
