"""The training loop: data, model, optimizer, evaluation, metrics, stop requests."""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modmoe.checkpoint import CheckpointManager
from modmoe.checkpoint.manifest import CheckpointError, read_manifest
from modmoe.config import JobConfig
from modmoe.data import SequenceSampler, prepare_data, validation_batches
from modmoe.model import MoDETransformer
from modmoe.model.flops import count_flops, parameter_counts
from modmoe.model.moe import MoE
from modmoe.parallel.dims import ParallelDims
from modmoe.parallel.distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from modmoe.parallel.engine import build_engine
from modmoe.train import memory, throughput
from modmoe.train.metrics_log import MetricsLog, ProgressReporter
from modmoe.train.reporting import RunReporter, routing_sample
from modmoe.train.router_stats import RouterStats, expert_bias_summary
from modmoe.train.stop import COMPLETED_FILE, STOP_FILE, open_run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: JobConfig, log=print, resume: str = "auto") -> None:
        """``resume``: ``auto`` (newest valid checkpoint in the run directory, if any),
        ``none`` (start fresh), or a checkpoint path."""
        self.cfg, self.log = cfg, log
        tc = cfg.trainer
        self.env: DistEnv = init_distributed(cfg.parallel, tc.device)
        # Every layout problem is reported before any work (data preparation included).
        self.dims = ParallelDims.build(cfg.parallel, cfg.model, self.env.world_size, self.env.device.type)
        self.reduce_dp = partial(all_reduce_sum, group=self.dims.dp_group)
        self.run_dir = Path(tc.run_dir)
        self.stop = open_run_dir(cfg, self.env.is_main, self.env.device)
        barrier()
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(tc.seed)

        # Data: rank 0 prepares (or reuses) the shards; the others then open the same files.
        if self.env.is_main:
            self.data = prepare_data(cfg.data, log=self._log_main)
        barrier()
        if not self.env.is_main:
            self.data = prepare_data(cfg.data, log=lambda _: None)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"config error: model.vocab_size = {cfg.model.vocab_size}: must be >= the tokenizer's "
                f"vocabulary ({self.data.vocab_size}, {self.data.tokenizer_path})"
            )
        if cfg.data.seq_len > cfg.model.max_seq_len:
            raise ValueError(
                f"config error: data.seq_len = {cfg.data.seq_len}: must be <= model.max_seq_len ({cfg.model.max_seq_len})"
            )
        # Data is split over the data-parallel ranks only: tensor-parallel peers read the same batch.
        dp, dp_rank = self.dims.dp, self.dims.dp_rank(self.env.rank)
        if tc.global_batch_size % (tc.micro_batch_size * dp):
            raise ValueError(
                f"config error: trainer.global_batch_size = {tc.global_batch_size}: must be a multiple of "
                f"micro_batch_size * data-parallel ranks ({tc.micro_batch_size} * {dp})"
            )
        self.accum_steps = tc.global_batch_size // (tc.micro_batch_size * dp)
        self.sampler = SequenceSampler(
            self.data.open("train"),
            cfg.data.seq_len,
            tc.micro_batch_size * dp,
            seed=tc.seed,
            rank=dp_rank,
            world=dp,
            num_workers=cfg.data.num_workers,
        )
        self.val_batches = validation_batches(
            self.data.open("val"),
            cfg.data.seq_len,
            tc.micro_batch_size * dp,
            tc.eval_batches,
            rank=dp_rank,
            world=dp,
        )

        self.step = 0
        self.model_core = MoDETransformer(cfg.model).to(self.env.device)
        self.autocast_dtype = self._autocast_dtype()
        self.engine = build_engine(self.model_core, self.dims, cfg, self.env.device, self.autocast_dtype)
        self.model: nn.Module = self.engine.module
        self.flops = count_flops(cfg.model, cfg.data.seq_len)
        self.last_eval: dict[str, float] = {}
        self.ckpt = CheckpointManager(
            self.run_dir / cfg.checkpoint.dirname, cfg.checkpoint, self.env.rank, self.env.world_size
        )
        self.app_state = {"train": self.engine.train_state()}
        mlflow_run_id = self._resume(resume)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.env.is_main else None
        self.reporter: RunReporter | None = None
        if self.env.is_main and cfg.logging.mlflow.enabled:
            self.reporter = RunReporter(cfg, self.run_dir, self.dims, run_id=mlflow_run_id)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, resume: str) -> str | None:
        """Loads the checkpoint to resume from; returns the MLflow run id it recorded."""
        if resume == "none":
            return None
        path = self.ckpt.find_latest_valid() if resume == "auto" else Path(resume)
        if path is None:
            return None
        if resume != "auto" and not path.is_dir():
            raise ValueError(f"--resume {resume}: no checkpoint directory there")
        self._check_same_model(path)
        meta = self.ckpt.load(path, self.app_state)
        self.step = int(meta["step"])
        if "sampler" in meta:
            self.sampler.load_state_dict(meta["sampler"])
        else:
            # A converted checkpoint (checkpoints_tools convert) records no data position:
            # continue after the samples ``step`` optimizer steps would have drawn.
            drawn, per_epoch = self.step * self.cfg.trainer.global_batch_size, self.sampler.samples_per_epoch
            self.sampler.load_state_dict(
                {**self.sampler.state_dict(), "epoch": drawn // per_epoch, "consumed": drawn % per_epoch}
            )
            self._log_main(f"{path} has no sampler position: starting the data stream at sample {drawn}")
        self._log_main(f"resumed from {path} at step {self.step}")
        if self.env.is_main:  # the record continues from the checkpoint: later steps are redone
            MetricsLog.truncate_after(self.run_dir / "metrics.jsonl", self.step)
        return meta.get("mlflow_run_id")

    def _check_same_model(self, path: Path) -> None:
        """A checkpoint resumes under any layout, but only into the same network: name the
        first model field that differs rather than letting DCP fail on a tensor shape."""
        try:
            saved = (read_manifest(path).meta.get("config") or {}).get("model")
        except CheckpointError:
            return  # load() refuses it with the full list of problems
        if saved is None:
            return
        ours = self.cfg.model.model_dump(mode="json")
        for key, theirs, mine in _differences(saved, ours, "model"):
            raise ValueError(
                f"--resume {path}: {key} = {theirs!r} in the checkpoint but {mine!r} in the config; "
                "a checkpoint resumes only into the same model (the layout may change)"
            )

    def save_checkpoint(self) -> None:
        meta = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "mlflow_run_id": self.reporter.run_id if self.reporter is not None else None,
            "config": self.cfg.model_dump(mode="json"),
        }
        self.ckpt.save(self.step, self.app_state, meta)

    # ------------------------------------------------------------------ helpers
    def _log_main(self, msg: str) -> None:
        if self.env.is_main:
            self.log(msg)

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.trainer.precision
        if p == "bf16" or (p == "auto" and self.env.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def stop_requested(self) -> bool:
        """True on every rank when any rank got SIGUSR1/SIGTERM or RUN_DIR/STOP exists."""
        return self.stop.requested()

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns global metrics."""
        tc, t0 = self.cfg.trainer, time.perf_counter()
        self.model.train()
        memory.start_step(self.env.device)
        stats, data_wait = RouterStats(), 0.0
        # Loss sums stay on the device: no host sync per micro-batch.
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # (loss, aux_loss)
        aux_sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accum_steps):
            td = time.perf_counter()
            inputs, targets = self.sampler.next_batch()
            inputs, targets = inputs.to(self.env.device), targets.to(self.env.device)
            data_wait += time.perf_counter() - td
            with self.engine.micro_batch(last=micro == self.accum_steps - 1):
                with self._autocast():
                    out = self.model(inputs, targets)
                self.engine.backward((out.loss + out.aux_loss) / self.accum_steps)
            sums += torch.stack([out.loss.detach().double(), out.aux_loss.detach().double()])
            for k, v in out.aux.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + v.detach().double().reshape(1)
            stats.add(out)
        lr = self.engine.lr()
        grad_norm = self.engine.step()
        stats.reduce(self.reduce_dp)
        bias_metrics = self._update_expert_biases(stats)
        self.step += 1

        # Global means: every data-parallel rank holds accum_steps micro-batches of equal size.
        aux_keys = sorted(aux_sums)
        packed = torch.cat([sums, *(aux_sums[k] for k in aux_keys)])  # on the device: NCCL needs it there
        packed = (self.reduce_dp(packed) / (self.accum_steps * self.dims.dp)).tolist()
        step_time = time.perf_counter() - t0
        peak = throughput.peak_tflops_per_device(self.env.device, self.cfg.logging.peak_tflops_per_device)
        metrics = {
            "step": self.step,
            "loss": packed[0],
            "aux_loss_total": packed[1],
            **{k: packed[2 + i] for i, k in enumerate(aux_keys)},
            "lr": lr,
            "step_time_s": step_time,
            "data_wait_s": data_wait,
            **throughput.throughput_metrics(
                tc.global_batch_size * self.cfg.data.seq_len,
                step_time,
                self.flops.training_per_token,
                self.env.world_size,
                peak,
            ),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics.update(self.engine.comm_metrics())
        metrics.update(memory.step_memory(self.env.device))
        metrics.update(stats.summary())
        metrics.update(bias_metrics)
        self.last_router_stats = stats
        return metrics

    def _update_expert_biases(self, stats: RouterStats) -> dict[str, float]:
        """Aux-loss-free balancing from the step's global expert loads (already reduced); returns
        the norm and range of the updated biases."""
        biases: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.model_core.layers):
            moe = block.mlp
            if isinstance(moe, MoE) and moe.expert_bias is not None:
                moe.update_expert_bias(stats.sums[f"moe{i}.load"].to(moe.expert_bias))
                biases[i] = moe.expert_bias
        return expert_bias_summary(biases)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss under top-k routing and under causal routing, plus the agreement of
        causal decisions with top-k, on fixed batches."""
        self.model.eval()
        result: dict[str, float] = {}
        for mode in ("topk", "causal"):
            total = torch.zeros(1, dtype=torch.float64)
            stats = RouterStats()
            for inputs, targets in self.val_batches:
                with self._autocast():
                    out = self.model_core(inputs.to(self.env.device), targets.to(self.env.device), routing=mode)
                total += out.loss.item()
                stats.add(out)
            total = self.reduce_dp(total) / (len(self.val_batches) * self.dims.dp)
            result[f"eval/loss_{mode}"] = float(total)
            stats.reduce(self.reduce_dp)
            summary = stats.summary()
            if mode == "topk" and "mod/causal_agreement" in summary:
                result["eval/causal_agreement"] = summary["mod/causal_agreement"]
                result["eval/causal_entry_fraction"] = summary["mod/causal_entry_fraction"]
        result["eval/loss_gap_causal_vs_topk"] = result["eval/loss_causal"] / result["eval/loss_topk"] - 1
        self.model.train()
        return result

    def _log_plots(self) -> None:
        """Expert-load heatmap of the last step and a depth-routing map over a validation text.
        Every rank runs the sample forward (a sharded model needs all of them); rank 0 logs it."""
        if not self.cfg.logging.mlflow.enabled:
            return
        tokenizer = self.data.load_tokenizer()
        self.model_core.eval()
        sample = routing_sample(self.model_core, self.val_batches[0][0].to(self.env.device), tokenizer.decode)
        self.model_core.train()
        if self.reporter is not None:
            self.reporter.log_plots(self.step, self.last_router_stats, sample)

    # ------------------------------------------------------------------ loop
    def describe(self) -> str:
        c = self.cfg
        counts = parameter_counts(c.model)
        routed = [i for i in range(c.model.num_layers) if c.model.depth.is_routed(i)]
        return (
            f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per token), "
            f"{c.model.num_layers} blocks, routed blocks {routed} at capacity {c.model.depth.capacity if c.model.depth.enabled else '-'}, "
            f"experts {c.model.moe.num_experts if c.model.moe.enabled else 0} top-{c.model.moe.top_k}; "
            f"{self.flops.training_per_token / 1e6:.1f} MFLOP/token (training); "
            f"ranks {self.env.world_size} on {self.env.device} ({self.dims.describe()}), global batch {c.trainer.global_batch_size} x {c.data.seq_len} tokens, "
            f"{self.accum_steps} accumulation step(s)"
        )

    def train(self) -> dict[str, float]:
        tc = self.cfg.trainer
        self.stop.install_signal_handlers()
        self._log_main(self.describe())
        progress = ProgressReporter(
            tc.max_steps, self.step, enabled=self.env.is_main and tc.progress_bar, log=self._log_main
        )
        first_eval = None
        metrics: dict[str, float] = {}
        if self.step >= tc.max_steps:
            self._log_main(f"nothing to do: the run is already at step {self.step} of {tc.max_steps}")
        error: BaseException | None = None
        try:
            while self.step < tc.max_steps:
                metrics = self.train_step()
                if (blocked := self.ckpt.pop_save_blocking_s()) is not None:  # the save after the previous step
                    metrics["checkpoint/save_blocking_s"] = blocked
                last = self.step == tc.max_steps
                if (tc.eval_every and self.step % tc.eval_every == 0) or last or first_eval is None and self.step == 1:
                    self.last_eval = self.evaluate()
                    first_eval = first_eval or dict(self.last_eval)
                    metrics.update(self.last_eval)
                    progress.note(
                        f"step {self.step}: val loss top-k {self.last_eval['eval/loss_topk']:.4f}, "
                        f"causal {self.last_eval['eval/loss_causal']:.4f}"
                    )
                if self.metrics is not None and (self.step % tc.log_every == 0 or last or "eval/loss_topk" in metrics):
                    self.metrics.write(metrics)
                    if self.reporter is not None:
                        self.reporter.log_step(metrics)
                if "eval/loss_topk" in metrics and self.cfg.logging.plots_every_eval:
                    self._log_plots()
                progress.update(metrics)
                if last:
                    self.save_checkpoint()
                elif self.stop_requested():
                    self._log_main(f"stop requested: saving a checkpoint at step {self.step} and exiting")
                    self.save_checkpoint()
                    self.ckpt.wait()
                    return metrics
                elif self.ckpt.should_save(self.step):
                    self.save_checkpoint()
        except BaseException as exc:
            error = exc
            raise
        finally:
            progress.close()
            self.ckpt.close()  # finishes an async save in flight
            if self.reporter is not None:
                self.reporter.close(error)
        if self.env.is_main:
            (self.run_dir / COMPLETED_FILE).write_text(json.dumps({"step": self.step}) + "\n")
            first = first_eval or {}
            self.log(
                f"done: {self.step} steps; val loss (top-k) {first.get('eval/loss_topk', float('nan')):.4f} -> "
                f"{self.last_eval['eval/loss_topk']:.4f}; results in {self.run_dir.resolve()} "
                f"(config.yaml, metrics.jsonl)"
            )
        return metrics


def _differences(a, b, prefix: str):
    """(key, a value, b value) for every leaf where two nested config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _differences(a.get(key), b.get(key), f"{prefix}.{key}")
    elif a != b:
        yield prefix, a, b


def run_training(cfg: JobConfig, resume: str = "auto") -> dict[str, float]:
    trainer = Trainer(cfg, resume=resume)
    try:
        metrics = trainer.train()
    finally:
        trainer.sampler.close()
        sys.stdout.flush()
    # Every rank leaves the process group together; exiting with it alive can abort a rank
    # in the communication library's teardown after the run has completed.
    shutdown()
    return metrics


__all__ = ["Trainer", "run_training", "STOP_FILE", "COMPLETED_FILE"]
