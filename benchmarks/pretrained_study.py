"""What adding depth routing or experts to a pretrained model costs and buys (docs/research.md §4).

1. Pretrain a dense model with modmoe itself: the main job's config (``configs/tiny.yaml``) with
   depth routing and experts off, trained ``--pretrain-steps`` steps.
2. Export it with ``modmoe export --standard`` (a stock Llama, no remote code).
3. Import it (``model.from_hf``) and continue training ``--continue-steps`` steps, the same tokens
   for every arm, as: ``dense``; ``mod`` (MoD-ified, capacity 0.125 every other block, router
   weight ``unit``: exact at step 0); ``mod-sigmoid`` (the same with the main job's ``sigmoid``);
   ``mod-routers-first`` (the same, only the routers training for the first
   ``--routers-only-steps`` steps); ``upcycled`` (each MLP into 8 experts, top-2); ``mod+upcycled``.
4. Report each arm's validation loss before and after (top-k and causal routing), executed
   training FLOPs per token, and median step time.

Every arm is a normal ``modmoe train`` run in its own directory, started in a fresh process; an arm
whose run is complete is read, not retrained, so the study resumes. The continuation uses another
seed than the pretraining, so it draws its samples in another order.

    python benchmarks/pretrained_study.py --work-dir runs/pretrained [--pretrain-steps 600] [--continue-steps 300]

The last line is machine-readable: ``arm=val_loss`` for each arm, then ``dense_pretrained=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# The main job's config sets router_weight sigmoid; an import's default is unit (exact at step 0).
MOD = [
    "model.depth.enabled=true",
    "model.depth.capacity=0.125",
    "model.depth.every=2",
    "model.depth.offset=1",
    "model.depth.router_weight=unit",
]
# Copies of the pretrained MLP (its width is the main job's ffn_hidden, 344), top-2 of 8.
UPCYCLE = ["model.moe.enabled=true", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=344"]
NO_MOD = ["model.depth.enabled=false"]  # the main job's config enables depth routing
ARMS: dict[str, list[str]] = {
    "dense": NO_MOD,
    "mod": MOD,
    "mod-sigmoid": [*MOD, "model.depth.router_weight=sigmoid"],  # the main job's weight: not exact at step 0
    "mod-routers-first": MOD,  # + optimizer.routers_only_steps (set from the flags)
    "upcycled": NO_MOD + UPCYCLE,
    "mod+upcycled": MOD + UPCYCLE,
}


def run_train(run_dir: Path, sets: list[str], threads: int) -> None:
    if (run_dir / "COMPLETED").is_file():
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "modmoe", "train", str(TINY), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with (run_dir.parent / f"{run_dir.name}.log").open("a") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def read_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/loss_topk" in r]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][5:]  # after warm-up
    return {
        "first": evals[0],
        "last": evals[-1],
        "step_s": statistics.median(times) if times else float("nan"),
        "steps": max(r["step"] for r in rows if "step" in r),
    }


def flops_per_token(run_dir: Path) -> float:
    from modmoe.config import load_config
    from modmoe.model.flops import count_flops

    cfg = load_config(run_dir / "config.yaml", [])
    return count_flops(cfg.model, cfg.data.seq_len).training_per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/pretrained")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--continue-steps", type=int, default=300)
    ap.add_argument("--routers-only-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prepared-dir", default=None, help="data.prepared_dir (default: the config's)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    work = Path(args.work_dir).resolve()
    data = [f"data.prepared_dir={args.prepared_dir}"] if args.prepared_dir else []
    common = [*data, "trainer.progress_bar=false", "logging.plots_every_eval=false"]

    pretrained = work / "dense-pretrain"
    run_train(
        pretrained,
        [
            *common,
            "model.depth.enabled=false",
            "model.moe.enabled=false",
            f"trainer.max_steps={args.pretrain_steps}",
            f"trainer.eval_every={args.pretrain_steps}",
            f"trainer.run_dir={pretrained}",
        ],
        args.threads,
    )
    exported = work / "dense-pretrain-hf"
    if not (exported / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "modmoe", "export", str(pretrained), "--out", str(exported), "--standard"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=True,
        )

    results = {}
    for arm in args.arms.split(","):
        run_dir = work / arm
        extra = [f"optimizer.routers_only_steps={args.routers_only_steps}"] if arm == "mod-routers-first" else []
        run_train(
            run_dir,
            [
                *common,
                f"model.from_hf={exported}",
                *ARMS[arm],
                *extra,
                "trainer.seed=7",
                f"trainer.max_steps={args.continue_steps}",
                f"trainer.eval_every={args.continue_steps}",
                f"trainer.run_dir={run_dir}",
                "optimizer.warmup_steps=10",
            ],
            args.threads,
        )
        results[arm] = read_run(run_dir) | {"flops": flops_per_token(run_dir)}

    base = read_run(pretrained)
    print(f"pretrained dense: {base['steps']} steps, val loss {base['last']['eval/loss_topk']:.4f}")
    print(
        "| arm | val loss after step 1 | val loss after | causal loss after | gap | causal agreement | "
        "training MFLOP/token | median step s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        first, last = r["first"], r["last"]
        causal = last.get("eval/loss_causal", last["eval/loss_topk"])
        agreement = last.get("eval/causal_agreement")
        print(
            f"| {arm} | {first['eval/loss_topk']:.4f} | {last['eval/loss_topk']:.4f} | {causal:.4f} | "
            f"{causal / last['eval/loss_topk'] - 1:+.2%} | {'-' if agreement is None else f'{agreement:.3f}'} | "
            f"{r['flops'] / 1e6:.2f} | {r['step_s']:.3f} |"
        )
    print(
        " ".join(f"{arm}={r['last']['eval/loss_topk']:.4f}" for arm, r in results.items())
        + f" dense_pretrained={base['last']['eval/loss_topk']:.4f}"
    )


if __name__ == "__main__":
    main()
