"""Causal-routing quality of the main job's config under training-side options.

Each variant is ``configs/tiny.yaml`` (the README's main job) with a few ``--set`` overrides,
trained by ``modmoe train`` in a fresh process, exported (``modmoe export``), and evaluated as
``modmoe eval`` evaluates it: validation loss under top-k and under causal routing, the gap, and
per routed layer the agreement of the causal decision with top-k and the causal entry fraction,
once for each causal router the run can use (``aux_loss``: sigmoid(r) > 0.5; ``predictor``: the
stop-gradient MLP, when trained). A finished variant (its export exists) is evaluated again
without training, so the table can be rebuilt and the study extended.

    python benchmarks/causal_routing.py --work-dir runs/causal                   # the default variants
    python benchmarks/causal_routing.py --work-dir runs/causal --steps 150 \\
        --variant bce1:model.depth.bce_loss_coef=1.0 --variant w256:model.depth.predictor_hidden=256

The last line is machine-readable: ``best_variant=… best_router=… min_layer_agreement=… loss_gap=…``
(the row with the highest worst-layer agreement among those with a gap of at most 1 %).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modmoe.config import load_config  # noqa: E402
from modmoe.export import export_checkpoint  # noqa: E402
from modmoe.inference.evaluate import evaluate, load_validation  # noqa: E402
from modmoe.inference.loading import load_exported  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"
DEFAULT_VARIANTS = [
    "shipped:",
    "bce0.1:model.depth.bce_loss_coef=0.1",
    "bce1:model.depth.bce_loss_coef=1.0",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,key=value (or NAME: for none)")
    return name, [item for item in rest.split(",") if item]


def train(name: str, overrides: list[str], args) -> tuple[Path, float]:
    run_dir = Path(args.work_dir) / name
    sets = [*overrides, f"trainer.run_dir={run_dir}", "trainer.progress_bar=false"]
    if args.steps:
        sets.append(f"trainer.max_steps={args.steps}")
    load_config(TINY, sets)  # a bad override fails here, before any training
    command = [sys.executable, "-m", "modmoe", "train", str(TINY), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{name}.log").open("w") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir, time.perf_counter() - t0


def evaluate_variant(name: str, overrides: list[str], args) -> list[dict]:
    export = Path(args.work_dir) / f"{name}-export"
    wall = float("nan")
    if not (export / "config.json").is_file():
        run_dir, wall = train(name, overrides, args)
        export_checkpoint(run_dir, export, overwrite=True, log=lambda _: None)
        (Path(args.work_dir) / f"{name}.wall_s").write_text(f"{wall:.1f}\n")
    elif (Path(args.work_dir) / f"{name}.wall_s").is_file():
        wall = float((Path(args.work_dir) / f"{name}.wall_s").read_text())
    loaded = load_exported(export, need_tokenizer=False)
    batches = load_validation(loaded)
    routers = ["aux_loss"] + (["predictor"] if loaded.config.depth.predictor else [])
    rows = []
    for router in routers:
        res = evaluate(loaded, batches, causal_router=router)
        rows.append(
            {
                "variant": name,
                "overrides": " ".join(overrides) or "(as shipped)",
                "router": router + (" *" if router == loaded.config.depth.causal_router else ""),
                "loss_topk": res.loss_topk,
                "loss_causal": res.loss_causal,
                "gap": res.loss_gap,
                "agreement": res.agreement,
                "entry": res.causal_entry,
                "wall_s": wall,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| variant | overrides | causal router | loss top-k | loss causal | gap | agreement per routed layer | min | causal entry | train wall s |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|---|---:|")
    for r in rows:
        agree = ", ".join(f"{i}: {a:.3f}" for i, a in r["agreement"].items())
        entry = ", ".join(f"{i}: {e:.3f}" for i, e in r["entry"].items())
        print(
            f"| {r['variant']} | {r['overrides']} | {r['router']} | {r['loss_topk']:.4f} | {r['loss_causal']:.4f} | "
            f"{r['gap']:+.2%} | {agree} | {min(r['agreement'].values()):.3f} | {entry} | {r['wall_s']:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/causal", help="run directories, exports and logs")
    ap.add_argument("--variant", action="append", help="NAME:key=value,... (repeatable; default: a BCE-weight screen)")
    ap.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the config's, 300)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training run")
    args = ap.parse_args()
    rows = []
    for text in args.variant or DEFAULT_VARIANTS:
        name, overrides = parse_variant(text)
        rows += evaluate_variant(name, overrides, args)
        print(f"{name}: done", file=sys.stderr, flush=True)
    print_table(rows)
    within = [r for r in rows if r["gap"] <= 0.01] or rows
    best = max(within, key=lambda r: min(r["agreement"].values()))
    print(
        f"best_variant={best['variant']} best_router={best['router'].rstrip(' *')} "
        f"min_layer_agreement={min(best['agreement'].values()):.4f} loss_gap={best['gap']:.4f}"
    )


if __name__ == "__main__":
    main()
