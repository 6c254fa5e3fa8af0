"""Throughput and expert-parallel traffic of each parallel layout, one after another on this machine.

    python benchmarks/parallel_layouts.py [--config configs/tiny.yaml] [--steps 20] [--nproc 2]
        [--layouts ddp,ep2_ddp,...] [--set k=v ...]

Each layout is a real ``torchrun -m modmoe train`` run (gloo on CPU, nccl on GPU). From its
``metrics.jsonl`` the table reports the median over steps after the first quarter (warm-up)
of: tokens/s, step time, the forward all-to-all volume this rank sent to other ranks and the
time spent in those calls (``ep/…`` metrics, EP layouts only; backward moves the same
volume again), and the final training loss. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "ddp": [],
    "ep2_ddp": ["parallel.ep=2"],
    "fsdp2": ["parallel.dp_backend=fsdp2"],
    "ep2_fsdp2": ["parallel.ep=2", "parallel.dp_backend=fsdp2"],
    "tp2": ["parallel.tp=2"],
    "ep2_zero1": ["parallel.ep=2", "parallel.dp_backend=deepspeed", "parallel.zero_stage=1"],
    "ep2_zero2": ["parallel.ep=2", "parallel.dp_backend=deepspeed", "parallel.zero_stage=2"],
    "ep2_zero3": ["parallel.ep=2", "parallel.dp_backend=deepspeed", "parallel.zero_stage=3"],
}


def run_layout(config: str, layout: list[str], extra: list[str], steps: int, nproc: int, run_dir: Path) -> list[dict]:
    overrides = [
        f"trainer.max_steps={steps}",
        f"trainer.run_dir={run_dir}",
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        "logging.mlflow.enabled=false",
        "checkpoint.interval_steps=0",
        *extra,
        *layout,
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "modmoe",
        "train",
        config,
        *sum((["--set", o] for o in overrides), []),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc))),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"layout {layout} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(records: list[dict]) -> dict[str, float]:
    steady = records[len(records) // 4 :] or records

    def med(key: str) -> float:
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else float("nan")

    return {
        "tokens_per_s": med("tokens_per_s"),
        "step_s": med("step_time_s"),
        "a2a_mb": med("ep/a2a_forward_mb"),
        "a2a_s": med("ep/a2a_forward_time_s"),
        "remote": med("ep/a2a_remote_fraction"),
        "loss": records[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="config override, repeatable")
    args = parser.parse_args()
    names = [n for n in args.layouts.split(",") if n]
    if importlib.util.find_spec("deepspeed") is None:
        names = [n for n in names if "zero" not in n]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows[name] = summarize(
                run_layout(args.config, LAYOUTS[name], args.extra, args.steps, args.nproc, Path(tmp) / name)
            )
    base = rows.get("ddp", next(iter(rows.values())))["tokens_per_s"]
    print(
        f"{'layout':<12} {'tokens/s':>10} {'vs ddp':>7} {'step s':>8} {'a2a MB/step':>12} {'a2a s/step':>11} {'remote':>7} {'loss':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<12} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / base:>7.2f} {r['step_s']:>8.3f} "
            f"{r['a2a_mb']:>12.3f} {r['a2a_s']:>11.4f} {r['remote']:>7.2f} {r['loss']:>8.4f}"
        )
    print(" ".join(f"{name}_tokens_per_s={r['tokens_per_s']:.0f}" for name, r in rows.items()))


if __name__ == "__main__":
    main()
