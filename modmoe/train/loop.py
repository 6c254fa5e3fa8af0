"""The Trainer: one training loop for every backend.

It owns what does not depend on how steps are executed: the run directory, data and the
sampler, resume and its metadata, the cadence (evaluation, logging, plots, stop requests,
checkpoints by steps and by time, retention), metric names, MLflow, throughput/MFU and memory.
A backend (:mod:`modmoe.train.backends`) runs the steps: native DDP/FSDP2, DeepSpeed ZeRO, or
Megatron-Core. The config was checked before any of it (:func:`~modmoe.train.resolve.resolve_job`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modmoe.checkpoint import CheckpointManager
from modmoe.checkpoint.manager import find_resume_point
from modmoe.checkpoint.manifest import CheckpointError, read_manifest
from modmoe.config import JobConfig
from modmoe.config_base import ConfigError, validate_config
from modmoe.data import open_training_data
from modmoe.errors import UserError
from modmoe.hf.config import pretrained_record
from modmoe.model.flops import count_flops, parameter_counts
from modmoe.model_config import ModelConfig
from modmoe.nested import differences
from modmoe.parallel.distributed import DistEnv, broadcast_from_main, init_distributed, shutdown
from modmoe.train import memory, throughput
from modmoe.train.backends import build_backend
from modmoe.train.backends.base import Backend
from modmoe.train.metrics_log import MetricsLog, ProgressReporter
from modmoe.train.numerics import LossSpikes, NonFiniteGuard, NumericalFault, is_finite
from modmoe.train.reporting import RunReporter
from modmoe.train.resolve import ResolvedJob, resolve_job
from modmoe.train.run_dir import claim_run_dir
from modmoe.train.run_lock import RunDirLockedError, RunLock
from modmoe.train.stop import COMPLETED_FILE, STOP_FILE, open_run_dir
from modmoe.train.straggler import straggler_metrics
from modmoe.train.watchdog import StepWatchdog, debug_stall


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, job: ResolvedJob | JobConfig, log=print, resume: str = "auto") -> None:
        """``job``: a resolved job (or a config, resolved here for the launcher's world size);
        ``resume``: ``auto`` (newest valid checkpoint in the run directory, if any), ``none``
        (start fresh), or a checkpoint path."""
        self.job = job if isinstance(job, ResolvedJob) else resolve_job(job)
        self.cfg, self.log = cfg, log = self.job.cfg, log
        tc = cfg.trainer
        self.env: DistEnv = init_distributed(cfg.parallel, tc.device)
        if self.env.world_size != self.job.world_size:
            raise ConfigError(
                f"config error: resolved for {self.job.world_size} rank(s) but launched with {self.env.world_size}"
            )
        self.run_dir = Path(tc.run_dir)
        self.resume = resume
        self.lock = self._claim_run_dir()
        self.backend: Backend | None = None
        self.sampler = self.ckpt = None
        try:
            self._open(cfg)
            self._start(cfg)
        except BaseException:
            # A start refused (bad data, a bad checkpoint, ...) leaves nothing behind it: the run
            # directory unlocked, and no state a next job in this process would trip over
            # (Megatron's parallel state is process-global).
            if self.ckpt is not None:
                self.ckpt.close()
            self.close()
            raise

    def _open(self, cfg: JobConfig) -> None:
        """Run directory, seeds, data, and the backend."""
        tc = cfg.trainer
        self.stop = open_run_dir(cfg, self.env.is_main, self.env.device)
        self.env.setup_barrier()
        # Set either way: an earlier run in this process may have left it on.
        torch.use_deterministic_algorithms(tc.deterministic, warn_only=True)
        seed_everything(tc.seed)

        # Data: rank 0 of a single-node job may prepare; every rank then opens the same files
        # (the wait is bounded by parallel.setup_timeout_s: a preparation may be long).
        self.data = open_training_data(
            cfg.data,
            model_vocab_size=cfg.model.vocab_size,
            is_main=self.env.is_main,
            barrier=self.env.setup_barrier,
            log=self._log_main,
        )
        self.step = 0
        # Which checkpoint the run resumes from is known before the model is built: a fresh start
        # of a ``model.from_hf`` job reads the pretrained weights, a resumed one only its checkpoint.
        self.resume_path = self._resume_path(self.resume)
        fresh_import = cfg.model.from_hf is not None and self.resume_path is None
        if fresh_import and cfg.data.tokenizer is None:
            self._log_main(
                f"warning: model.from_hf = {cfg.model.from_hf} has no tokenizer.json and data.tokenizer is unset: "
                "a new BPE is trained, whose token ids mean nothing to the pretrained embeddings"
            )
        self.backend = build_backend(self.job, self.env, load_pretrained=fresh_import)

    def _start(self, cfg: JobConfig) -> None:
        tc = cfg.trainer
        # Data is split over the data-parallel ranks only: tensor/pipeline peers read the same rows.
        dp, dp_rank = self.job.dp, self.backend.dp_rank()
        rows = tc.micro_batch_size * dp
        self.sampler = self.data.train_sampler(rows, seed=tc.seed, rank=dp_rank, world=dp)
        # eval_batches global batches, whatever the layout: every layout evaluates the same sequences.
        self.val_batches = self.data.validation_batches(
            rows, tc.eval_batches * self.job.accum_steps, rank=dp_rank, world=dp
        )
        self.flops = count_flops(cfg.model, cfg.data.seq_len)
        self.last_eval: dict[str, float] = {}
        self.guard = NonFiniteGuard(tc.numerics)
        self.rolled_back = False
        self.spikes = LossSpikes(tc.numerics.spike_window, tc.numerics.spike_zscore)
        self.ckpt = CheckpointManager(
            self.run_dir / cfg.checkpoint.dirname, cfg.checkpoint, self.env.rank, self.env.world_size
        )
        self.state_io = self.backend.state_io()
        # What the run records of its pretrained checkpoint (the export back to its architecture).
        self.pretrained = pretrained_record(cfg.model.from_hf) if cfg.model.from_hf is not None else None
        mlflow_run_id = self._resume()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.env.is_main else None
        self.reporter: RunReporter | None = None
        if self.env.is_main and cfg.logging.mlflow.enabled:
            self.reporter = RunReporter(cfg, self.run_dir, self.backend.layout_tag(), run_id=mlflow_run_id)
        self.env.setup_barrier()  # the others would wait for the MLflow run in the first step's collective
        # Every rank watches its own steps and logs its own watchdog lines.
        self.watchdog = StepWatchdog(tc.watchdog, self.env.rank, self.run_dir / "stacks", log=self.log)

    def _claim_run_dir(self) -> RunLock | None:
        """Rank 0 claims the run directory (modmoe's marker) and locks it for the whole run,
        before anything is written into it; every rank raises rank 0's refusal."""
        lock, refusal = None, None
        if self.env.is_main:
            try:
                claim_run_dir(self.run_dir, self.cfg.checkpoint.dirname)
                lock = RunLock(self.run_dir)
                lock.acquire()
            except UserError as err:
                refusal = err
        message = broadcast_from_main(None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        if message is not None:
            raise RunDirLockedError(message)
        return lock

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self, resume: str) -> Path | None:
        """The checkpoint to resume from: ``auto``, the newest valid one of the run directory
        (None: a fresh start); ``none``; or a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return find_resume_point(self.run_dir / self.cfg.checkpoint.dirname)
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no checkpoint directory there")
        return path

    def _resume(self) -> str | None:
        """Loads the checkpoint to resume from; returns the MLflow run id it recorded."""
        path = self.resume_path
        if path is None:
            return None
        self._check_same_model(path)
        meta = self.ckpt.load(path, self.state_io)
        self.step = int(read_manifest(path).step)
        if "sampler" in meta:
            self.sampler.load_state_dict(meta["sampler"])
        else:
            # A converted checkpoint (checkpoints_tools convert) records no data position:
            # continue after the samples ``step`` optimizer steps would have drawn.
            drawn = self.step * self.cfg.trainer.global_batch_size
            self.sampler.seek(drawn)
            self._log_main(f"{path} has no sampler position: starting the data stream at sample {drawn}")
        self._log_main(f"resumed from {path} at step {self.step}")
        if self.env.is_main:  # the record continues from the checkpoint: later steps are redone
            MetricsLog.truncate_after(self.run_dir / "metrics.jsonl", self.step)
        return meta.get("mlflow_run_id")

    def _check_same_model(self, path: Path) -> None:
        """A checkpoint resumes under any layout, but only into the same network: name the
        first model field that differs rather than letting a loader fail on a tensor shape."""
        try:
            saved = (read_manifest(path).meta.get("config") or {}).get("model")
        except CheckpointError:
            return  # load() refuses it with the full list of problems
        if saved is None:
            return
        try:  # a checkpoint from before a field existed ran with what its default means now
            saved = validate_config(ModelConfig, saved).model_dump(mode="json")
        except ConfigError:
            pass  # compared as recorded: the difference names the field
        ours = self.cfg.model.model_dump(mode="json")
        for key, theirs, mine in differences(saved, ours, "model"):
            if key == "model.from_hf":  # where the pretrained files are, not the network: they may move
                continue
            raise CheckpointError(
                f"--resume {path}: {key} = {theirs!r} in the checkpoint but {mine!r} in the config; "
                "a checkpoint resumes only into the same model (the layout may change)"
            )

    def save_checkpoint(self) -> None:
        meta = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "mlflow_run_id": self.reporter.run_id if self.reporter is not None else None,
            "config": self.cfg.model_dump(mode="json"),
            "engine": self.cfg.engine,
            "backend": self.job.backend,
            "layout": self.backend.layout_tag(),
        }
        if self.pretrained is not None:
            meta["pretrained"] = self.pretrained
        self.ckpt.save(self.step, self.state_io, meta)

    # ------------------------------------------------------------------ helpers
    def _log_main(self, msg: str) -> None:
        if self.env.is_main:
            self.log(msg)

    def stop_requested(self) -> bool:
        """True on every rank when any rank got SIGUSR1/SIGTERM or RUN_DIR/STOP exists."""
        return self.stop.requested()

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns global metrics."""
        t0 = time.perf_counter()
        self.watchdog.step_started(self.step + 1)  # (train() started it already, for the whole iteration)
        memory.start_step(self.env.device)
        debug_stall(self.env.rank, self.step + 1)  # the test seam (MODMOE_DEBUG_STALL); nothing otherwise
        t_data = time.perf_counter()
        batches = [self.sampler.next_batch() for _ in range(self.job.accum_steps)]
        data_wait = time.perf_counter() - t_data
        # The rank's own work ends here: the forward pass meets the peers (the MoE load
        # all-reduce; else the backward's gradient reduction), after which a fast rank waits.
        self.watchdog.phase("forward/backward", synchronizing=True)
        stats = self.backend.forward_backward(batches, self.step)
        self.watchdog.phase("optimizer step")
        lr = self.backend.lr()
        if self.cfg.trainer.numerics.on_nonfinite == "skip":
            grad_norm = self.backend.optimizer_step(apply=lambda norm: is_finite(stats.loss) and is_finite(norm))
        else:
            grad_norm = self.backend.optimizer_step()
        self.step += 1
        # Loss and norm are global (reduced with the step's statistics): every rank decides alike.
        decision = self.guard.decide(self.step, stats.loss, grad_norm)
        step_time = time.perf_counter() - t0
        cfg = self.cfg
        wd = cfg.trainer.watchdog
        self.watchdog.phase("straggler metric")
        straggler = straggler_metrics(
            self.step,
            self.watchdog.local_s(),
            self.env.device,
            wd.straggler_factor,
            wd.straggler_min_s,
            log=self.log if self.env.is_main else None,
        )
        peak = throughput.peak_tflops_per_device(self.env.device, cfg.logging.peak_tflops_per_device)
        metrics = {
            "step": self.step,
            "loss": stats.loss,
            **stats.metrics,
            "lr": lr,
            "step_time_s": step_time,
            "data_wait_s": data_wait,
            # Executed FLOPs of the native model's count: skipped tokens are not counted.
            **throughput.throughput_metrics(
                cfg.trainer.global_batch_size * cfg.data.seq_len,
                step_time,
                self.flops.training_per_token,
                self.env.world_size,
                peak,
            ),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics.update(straggler)
        metrics.update(self.sampler.metrics())  # data/tokens_<source>, data/epochs_<source>
        metrics.update(self.backend.step_metrics())
        metrics.update(memory.step_memory(self.env.device))
        metrics.update(self.spikes.update(stats.loss))
        metrics.update(self.guard.metrics())
        if decision == "skip":
            self._log_main(f"step {self.step}: loss {stats.loss}, gradient norm {grad_norm}: step skipped")
        elif decision == "rollback":
            self._rollback(stats.loss, grad_norm)
        self.rolled_back = decision == "rollback"  # the step's record is then not logged: it was undone
        return metrics

    def _final_update_rolled_back(self) -> bool:
        """Applies the non-finite policy to the state after the last update (collective: the
        validation loss is global, so every rank decides alike)."""
        val_loss = self.last_eval["eval/loss_topk"]
        if self.guard.decide_final(self.step, val_loss) == "ok":
            return False
        self._rollback(val_loss, None)
        return True

    def _rollback(self, loss: float, grad_norm: float | None) -> None:
        """Back to the newest valid checkpoint, going on with the data after the failing step
        (the window since the checkpoint is skipped). Collective."""
        failed_at, position = self.step, self.sampler.state_dict()
        self.ckpt.wait()
        path = self.ckpt.find_latest_valid()
        if path is None:
            raise NumericalFault(
                f"step {failed_at}: loss {loss}, gradient norm {grad_norm}; no checkpoint to roll back to "
                "(trainer.numerics.on_nonfinite = 'rollback' needs one: lower checkpoint.interval_steps)"
            )
        self.ckpt.load(path, self.state_io)
        self.step = int(read_manifest(path).step)
        self.sampler.load_state_dict(position)
        if self.metrics is not None:  # the record goes on from the checkpoint, like after a resume
            self.metrics.close()
            MetricsLog.truncate_after(self.metrics.path, self.step)
            self.metrics = MetricsLog(self.metrics.path)
        self._log_main(
            f"step {failed_at}: loss {loss}, gradient norm {grad_norm}: rolled back to {path} (step {self.step}); "
            f"skipping the data of steps {self.step + 1}-{failed_at}"
        )

    def evaluate(self) -> dict[str, float]:
        return self.backend.evaluate(self.val_batches)

    def _log_plots(self) -> None:
        """Expert-load heatmap of the last step and a depth-routing map over a validation text.
        Every rank runs the sample forward (a sharded model needs all of them); rank 0 logs it."""
        if not self.cfg.logging.mlflow.enabled:
            return
        tokenizer = self.data.load_tokenizer()
        plots = self.backend.plot_data(self.val_batches[0][0][:1, :64], tokenizer.decode)
        if self.reporter is not None:
            self.reporter.log_plots(self.step, plots)

    # ------------------------------------------------------------------ loop
    def describe(self) -> str:
        c = self.cfg
        counts = parameter_counts(c.model)
        routed = [i for i in range(c.model.num_layers) if c.model.depth.is_routed(i)]
        capacity = c.model.depth.capacity if c.model.depth.enabled else "-"
        experts = c.model.moe.num_experts if c.model.moe.enabled else 0
        return (
            f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per token), "
            f"{c.model.num_layers} blocks, routed blocks {routed} at capacity {capacity}, "
            f"experts {experts} top-{c.model.moe.top_k}; "
            f"{self.flops.training_per_token / 1e6:.1f} MFLOP/token (training); "
            f"ranks {self.env.world_size} on {self.env.device}, {self.backend.describe()}, "
            f"global batch {c.trainer.global_batch_size} x {c.data.seq_len} tokens, "
            f"{self.job.accum_steps} accumulation step(s)"
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
            self._log_main(
                f"the run in {self.run_dir} is complete: it is at step {self.step} of trainer.max_steps = "
                f"{tc.max_steps}; nothing to do (raise trainer.max_steps to train on)"
            )
        error: BaseException | None = None
        self.watchdog.start()
        try:
            while self.step < tc.max_steps:
                # The watched step is the whole iteration: evaluation, logging and saves included.
                self.watchdog.step_started(self.step + 1)
                metrics = self.train_step()
                if self.rolled_back:
                    continue
                if (blocked := self.ckpt.pop_save_blocking_s()) is not None:  # the save after the previous step
                    metrics["checkpoint/save_blocking_s"] = blocked
                last = self.step == tc.max_steps
                if (tc.eval_every and self.step % tc.eval_every == 0) or last or first_eval is None and self.step == 1:
                    self.last_eval = self.evaluate()
                    first_eval = first_eval or dict(self.last_eval)
                    metrics.update(self.last_eval)
                    progress.note(_eval_line(self.step, self.last_eval))
                    if last and self._final_update_rolled_back():
                        continue
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
                self.watchdog.step_finished()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.watchdog.close()
            progress.close()
            try:
                self.ckpt.close()  # finishes an async save in flight
            finally:
                if self.reporter is not None:
                    self.reporter.close(error)
                if self.metrics is not None:
                    self.metrics.close()
                self._release_lock()
        if self.env.is_main:
            record = {"step": self.step, **({"skipped_steps": self.guard.skipped} if self.guard.skipped else {})}
            (self.run_dir / COMPLETED_FILE).write_text(json.dumps(record) + "\n")
            if first_eval is not None:
                self.log(
                    f"done: {self.step} steps; val loss (top-k) {first_eval['eval/loss_topk']:.4f} -> "
                    f"{self.last_eval['eval/loss_topk']:.4f}; results in {self.run_dir.resolve()} "
                    f"(config.yaml, metrics.jsonl)"
                )
        return metrics

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self) -> None:
        """Releases the sampler's workers, the backend and the run-directory lock (once)."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._release_lock()


def _eval_line(step: int, result: dict[str, float]) -> str:
    line = f"step {step}: val loss top-k {result['eval/loss_topk']:.4f}"
    if "eval/loss_causal" in result:
        line += f", causal {result['eval/loss_causal']:.4f}"
    return line


def run_training(cfg: JobConfig | ResolvedJob, resume: str = "auto") -> dict[str, float]:
    """Trains one job in this process (one rank of it under torchrun); returns the last metrics."""
    job = cfg if isinstance(cfg, ResolvedJob) else resolve_job(cfg)  # every config error before any work
    trainer = Trainer(job, resume=resume)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
        sys.stdout.flush()
    # Every rank leaves the process group together; exiting with it alive can abort a rank
    # in the communication library's teardown after the run has completed.
    shutdown()
    return metrics


__all__ = ["Trainer", "run_training", "STOP_FILE", "COMPLETED_FILE"]
