"""How long a checkpoint stalls training: sync vs async saves.

    python benchmarks/checkpoint_stall.py [--config configs/tiny.yaml] [--steps 40] [--every 5]
        [--nproc 1] [--reps 2] [--set k=v ...]

Each mode is a real ``modmoe train`` run (``torchrun`` when ``--nproc`` > 1); modes alternate
``--reps`` times. From ``metrics.jsonl``, within each run (so load from elsewhere on the
machine cancels out):

- *blocking*: how long the ``save`` call held the training loop (``checkpoint/save_blocking_s``,
  logged with the step after each save). Sync: the whole write and commit. Async: the copy of
  the state to CPU memory; DCP writes the files in a thread while training goes on.
- *slowdown*: median time of the steps right after a save (when an async writer thread
  competes for the cores) minus the median of the other steps.
- *stall per save*: blocking + slowdown.

The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"sync": ["checkpoint.async_save=false"], "async": ["checkpoint.async_save=true"]}


def run(config: str, mode: str, args, run_dir: Path) -> list[dict]:
    overrides = [
        f"trainer.max_steps={args.steps}",
        f"trainer.run_dir={run_dir}",
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        "logging.mlflow.enabled=false",
        f"checkpoint.interval_steps={args.every}",
        "checkpoint.keep_last=2",
        *args.set,
        *MODES[mode],
    ]
    launcher = (
        [sys.executable, "-m", "modmoe"]
        if args.nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            "modmoe",
        ]
    )
    cmd = [*launcher, "train", config, "--resume", "none", *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stall(records: list[dict]) -> tuple[list[float], float]:
    """Blocking times of the saves, and the slowdown of the steps right after them. Step 1
    (warm-up) and the last step (evaluation) are left out."""
    steps = [r for r in records[1:] if "eval/loss_topk" not in r]
    after = [r["step_time_s"] for r in steps if "checkpoint/save_blocking_s" in r]
    others = [r["step_time_s"] for r in steps if "checkpoint/save_blocking_s" not in r]
    blocking = [r["checkpoint/save_blocking_s"] for r in steps if "checkpoint/save_blocking_s" in r]
    return blocking, statistics.median(after) - statistics.median(others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="save every N steps")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    args = parser.parse_args()

    results: dict[str, list[list[dict]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="ckpt-stall-") as tmp:
        for rep in range(args.reps):
            for mode in MODES:
                results[mode].append(run(args.config, mode, args, Path(tmp) / f"{mode}{rep}"))
    print(
        f"{args.config}, {args.steps} steps, a save every {args.every} steps, {args.nproc} rank(s), {args.reps} rep(s)"
    )
    print(
        f"{'mode':>6} | {'saves':>5} | {'blocking/save s':>15} | {'step after save, extra s':>24} | {'stall/save s':>12}"
    )
    summary = {}
    for mode, reps in results.items():
        measured = [stall(records) for records in reps]
        blocking = [b for bs, _ in measured for b in bs]
        block = statistics.median(blocking)
        slowdown = statistics.median(s for _, s in measured)
        summary[mode] = (block, block + slowdown)
        print(
            f"{mode:>6} | {len(blocking) / len(reps):5.0f} | {block:15.3f} | {slowdown:24.3f} | {block + slowdown:12.3f}"
        )
    print(
        f"sync_blocking_s={summary['sync'][0]:.3f} async_blocking_s={summary['async'][0]:.3f} "
        f"sync_stall_s={summary['sync'][1]:.3f} async_stall_s={summary['async'][1]:.3f}"
    )


if __name__ == "__main__":
    main()
