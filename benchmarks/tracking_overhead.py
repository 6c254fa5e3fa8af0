"""Cost of logging every step to MLflow, on the tiny config, in one process.

    python benchmarks/tracking_overhead.py [--config configs/tiny.yaml] [--steps 10] [--reps 3] [--set k=v ...]

Each repetition trains two fresh trainers for ``--steps`` steps each, in alternating order:
one logs every step to MLflow (the embedded SQLite default in its run directory, or
``logging.mlflow.tracking_uri``), the other has MLflow disabled; both write metrics.jsonl as
the training loop does. A timed step is what the loop does per step: ``train_step``, the
metrics.jsonl line and, when on, ``RunReporter.log_step``. The background sender's work
(batching, SQLite or HTTP) runs during the following steps, so it shows in their times; the
final flush is reported on its own and counted in the mean-based overhead.
The process's CPU time per step (all threads, the final flush included) is reported too, and
the added work itself: the sender thread's CPU time plus the ``log_step`` calls, per step, as a
share of the median step with MLflow off (``added_work``). Serialized with training, that work
could not cost more wall time than that, so on a machine shared with other jobs, where step
times swing by more than the effect, it is the figure to compare with a budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from modmoe.config import load_config
from modmoe.train.loop import Trainer


def sender_cpu_seconds() -> float:
    """CPU seconds (user + system) the tracker's background thread has used so far."""
    (sender,) = [t for t in threading.enumerate() if t.name == "modmoe-mlflow-sender"]
    (times,) = [t for t in psutil.Process().threads() if t.id == sender.native_id]
    return times.user_time + times.system_time


def run_block(cfg, run_dir: Path, tracking: bool, steps: int, warmup: int) -> dict[str, list[float] | float]:
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.run_dir = str(run_dir)
    cfg.trainer.max_steps = warmup + steps
    cfg.logging.mlflow.enabled = tracking
    trainer = Trainer(cfg, log=lambda _: None, resume="none")
    step_s, log_s = [], []
    try:
        for i in range(warmup + steps):
            if i == warmup:
                if trainer.reporter is not None:  # run creation, params, warm-up steps: not counted
                    trainer.reporter.tracker.flush()
                    sender0 = sender_cpu_seconds()
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            trainer.metrics.write(metrics)
            t1 = time.perf_counter()
            if trainer.reporter is not None:
                trainer.reporter.log_step(metrics)
            t2 = time.perf_counter()
            if i >= warmup:
                step_s.append(t2 - t0)
                log_s.append(t2 - t1)
        t0 = time.perf_counter()
        sender_cpu_s = 0.0
        if trainer.reporter is not None:
            trainer.reporter.tracker.flush()  # the last batch is sent: all of this block's work is done
            sender_cpu_s = sender_cpu_seconds() - sender0
        close_s = time.perf_counter() - t0
        # CPU seconds of the whole process (training and sender threads), the final flush
        # included: unlike wall time, hardly moved by other processes on a shared machine.
        cpu_s = time.process_time() - cpu0
        if trainer.reporter is not None:
            trainer.reporter.close()
    finally:
        trainer.sampler.close()
        trainer.ckpt.close()
        trainer.metrics.close()
    return {"step_s": step_s, "log_s": log_s, "close_s": close_s, "cpu_s": cpu_s, "sender_cpu_s": sender_cpu_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the on/off pair")
    parser.add_argument("--out", default=None, help="directory for the run directories (default: a temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, ["trainer.progress_bar=false", "trainer.log_every=1", *args.overrides])
    out = Path(args.out or tempfile.mkdtemp(prefix="modmoe-tracking-bench-"))

    results: dict[str, list[dict]] = {"mlflow": [], "off": []}
    for rep in range(args.reps):
        order = ("mlflow", "off") if rep % 2 == 0 else ("off", "mlflow")  # neither always runs first
        for mode in order:
            results[mode].append(run_block(cfg, out / f"rep{rep}-{mode}", mode == "mlflow", args.steps, args.warmup))
            gc.collect()

    def pooled(mode: str, key: str) -> list[float]:
        return [v for block in results[mode] for v in block[key]]

    median = {m: statistics.median(pooled(m, "step_s")) for m in results}
    # Mean over all timed steps, the flush at close spread over them.
    mean = {
        m: (sum(pooled(m, "step_s")) + sum(b["close_s"] for b in results[m])) / len(pooled(m, "step_s"))
        for m in results
    }
    cpu = {m: sum(b["cpu_s"] for b in results[m]) / len(pooled(m, "step_s")) for m in results}
    last = json.loads((out / "rep0-mlflow" / "metrics.jsonl").read_text().splitlines()[-1])
    print(
        f"config {args.config}: {args.reps} x {args.steps} timed steps per mode (after {args.warmup} warm-up), "
        f"{len(last) - 1} metrics per step; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"run directories in {out}"
    )
    print(
        "| mode | median step ms | mean step ms (incl. close) | min step ms | CPU ms per step (incl. close) "
        "| log_step call µs (median) | flush at close ms (mean) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in ("off", "mlflow"):
        steps = pooled(m, "step_s")
        log_us = statistics.median(pooled(m, "log_s")) * 1e6
        close_ms = statistics.mean(b["close_s"] for b in results[m]) * 1e3
        print(
            f"| {m} | {median[m] * 1e3:.1f} | {mean[m] * 1e3:.1f} | {min(steps) * 1e3:.1f} | {cpu[m] * 1e3:.1f} "
            f"| {log_us:.0f} | {close_ms:.0f} |"
        )
    n_on = len(pooled("mlflow", "step_s"))
    sender_ms = sum(b["sender_cpu_s"] for b in results["mlflow"]) / n_on * 1e3
    log_ms = sum(pooled("mlflow", "log_s")) / n_on * 1e3
    # The work tracking adds, per step: the log_step call on the training thread and the sender
    # thread's CPU time. Even fully serialized with training it cannot cost more wall time.
    added = (sender_ms + log_ms) / (median["off"] * 1e3)
    print(f"sender thread CPU {sender_ms:.1f} ms/step, log_step {log_ms:.2f} ms/step")
    print(
        f"overhead_median={median['mlflow'] / median['off'] - 1:+.2%} "
        f"overhead_mean={mean['mlflow'] / mean['off'] - 1:+.2%} "
        f"overhead_cpu={cpu['mlflow'] / cpu['off'] - 1:+.2%} added_work={added:.2%}"
    )


if __name__ == "__main__":
    main()
