"""How the tests run modmoe as a user would, and read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# For workers started as scripts: the package and this folder (where the helpers live).
TEST_PYTHONPATH = os.pathsep.join([str(REPO), str(REPO / "tests" / "support")])


def small_overrides(data_dir: str, run_dir: Path, **extra) -> list[str]:
    """A ~0.3M-parameter MoDE model on 64-token sequences: a training step takes ~50 ms."""
    values = {
        "model.vocab_size": 512,
        "model.dim": 64,
        "model.num_layers": 4,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.ffn_hidden": 128,
        "model.max_seq_len": 64,
        "model.depth.capacity": 0.25,
        "model.depth.predictor": True,
        "model.moe.num_experts": 4,
        "model.moe.top_k": 2,
        "model.moe.expert_hidden": 64,
        "data.max_corpus_bytes": 600_000,
        "data.val_fraction": 0.15,
        "data.vocab_size": 512,
        "data.prepared_dir": data_dir,
        "data.seq_len": 64,
        "optimizer.lr": 0.01,
        "optimizer.warmup_steps": 5,
        "trainer.run_dir": str(run_dir),
        "trainer.max_steps": 30,
        "trainer.global_batch_size": 8,
        "trainer.micro_batch_size": 8,
        "trainer.eval_every": 0,
        "trainer.eval_batches": 2,
        "trainer.progress_bar": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_modmoe(
    args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs ``modmoe`` as a user would: one process, or ``nproc`` ranks under torchrun."""
    launcher = (
        [sys.executable, "-m", "modmoe"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "modmoe",
        ]
    )
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(launcher + args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"modmoe {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
