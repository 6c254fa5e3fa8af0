"""Preempts one Slurm training job K times at random moments and checks every attempt.

Starts the tests' single-node Slurm cluster (tests/slurm_cluster.py; needs root and the packages
of scripts/install-system-deps.sh), trains a reference job without interruption, then submits
the same job (configs/tiny.yaml shrunk to a ~0.3M-parameter model, 2 ranks over gloo) and
preempts it K times: at random, by ``scancel --signal=USR1 --batch`` (what Slurm's
``--signal=B:USR1@grace`` does before a time limit) or ``scontrol requeue`` (SIGTERM to every
process), while the attempt starts up or after a random number of steps. After each attempt it
checks that nothing claimed completion, the steps are contiguous and the newest checkpoint is
where the attempt stopped; at the end that each attempt resumed from the newest checkpoint, the
per-step losses equal the reference bit for bit, one MLflow run holds each step's loss once
and is the one the checkpoint names, and the final checkpoint validates.

    sudo .venv/bin/python benchmarks/slurm_preempt_stress.py [--preemptions 5] [--steps 300] [--seed 0]

Prints a table (one row per preemption) and a final line with the count; exit status 1 when
any invariant broke.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from slurm_cluster import (  # noqa: E402
    Attempt,
    Preemption,
    batch_log,
    check_finished_run,
    node_logs,
    preempt_attempt,
    skip_reason,
    start_cluster,
    tiny_job_overrides,
    training_records,
)

from modmoe.launch import submit  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"


def plan_preemptions(k: int, steps: int, rng: random.Random) -> list[Preemption]:
    """K preemptions, half of each kind (shuffled); about one in four while the attempt starts
    up, the others after a random number of steps. The step budget leaves the last attempt room
    to finish."""
    kinds = (["usr1", "requeue"] * k)[:k]
    rng.shuffle(kinds)
    span = max(3, int(0.8 * steps / (k + 1)))
    plans = []
    for how in kinds:
        if rng.random() < 0.25:
            plans.append(Preemption(how, steps=None, delay_s=round(rng.uniform(0.5, 8.0), 1)))
        else:
            plans.append(Preemption(how, steps=rng.randint(1, span)))
    return plans


def _row(a: Attempt) -> str:
    return (
        f"{a.number:>7}  {a.how:<8}  {a.sent_after_s:>8.1f}  {a.sent_at_step:>9}  {str(a.checkpoint):>10}  "
        f"{str(a.resumed_at):>10}  {'ok' if not a.problems else '; '.join(a.problems)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preemptions", type=int, default=5, help="preemptions of the one job (K)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the job")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments and kinds")
    parser.add_argument("--keep", action="store_true", help="keep the cluster and run directories")
    args = parser.parse_args()
    if args.preemptions < 1 or args.steps < 10 * (args.preemptions + 1):
        parser.error("need --preemptions >= 1 and --steps >= 10 * (preemptions + 1)")
    reason = skip_reason()
    if reason:
        print(f"slurm_preempt_stress: cannot start a cluster here: {reason}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    root = Path(tempfile.mkdtemp(prefix="modmoe-preempt-stress-"))
    t0 = time.monotonic()
    cluster = start_cluster(root / "slurm", two_nodes=False)  # one node is all it uses
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        overrides = tiny_job_overrides(root / "prepared", args.steps)
        common = dict(
            gpus_per_node=0, procs_per_node=2, time="60", signal_grace_s=60, overrides=overrides, echo=lambda _: None
        )
        ref = submit(TINY, runs_root=root / "reference", max_requeues=0, **common)
        state = cluster.wait_job(ref.job_id, timeout=900)
        if state != "COMPLETED":
            print(f"reference job ended {state}\n{batch_log(ref.run_dir)}{node_logs(ref.run_dir)}", file=sys.stderr)
            return 1
        reference = {r["step"]: r["loss"] for r in training_records(ref.run_dir)}
        print(f"reference: {len(reference)} steps uninterrupted ({time.monotonic() - t0:.0f} s incl. cluster start)")

        plans = plan_preemptions(args.preemptions, args.steps, random.Random(args.seed))
        job = submit(TINY, runs_root=root / "preempted", max_requeues=args.preemptions, **common)
        print(f"job {job.job_id}: {args.steps} steps, {args.preemptions} preemptions (seed {args.seed})")
        print(
            f"{'attempt':>7}  {'how':<8}  {'after_s':>8}  {'sent_step':>9}  {'checkpoint':>10}  {'resumed_at':>10}  check"
        )
        attempts = []
        for number, plan in enumerate(plans):
            attempts.append(preempt_attempt(cluster, job.job_id, job.run_dir, number, plan, timeout=600))
            print(_row(attempts[-1]), flush=True)
        problems = check_finished_run(cluster, job.job_id, job.run_dir, attempts, args.steps, reference, timeout=900)
        print("after completion (resumed_at filled in):")
        for a in attempts:
            print(_row(a))
        ok = sum(1 for a in attempts if not a.problems)
        for p in problems:
            print(f"PROBLEM: {p}")
        kinds = (
            f"{sum(a.how == 'usr1' for a in attempts)} USR1, "
            f"{sum(a.how == 'requeue' for a in attempts)} scontrol requeue"
        )
        if problems:
            print(
                f"preemptions: {ok}/{len(attempts)} attempts passed their own checks ({kinds}); "
                f"{len(problems)} problem(s) listed above; {time.monotonic() - t0:.0f} s"
            )
        else:
            print(
                f"preemptions: {ok}/{len(attempts)} checkpointed, requeued and resumed from the newest checkpoint "
                f"({kinds}); losses of all {args.steps} steps bit-identical to the uninterrupted run; one MLflow "
                f"run with each step once; {time.monotonic() - t0:.0f} s"
            )
        return 0 if not problems else 1
    finally:
        cluster.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
