"""Generation speed of MoDE vs MoE-only with causal routing, and causal-routing quality.

Speed: two models of the same size from ``benchmarks/generate_speed.yaml`` (MoDE, and the same
config with depth routing off), run through modmoe's runtime (ragged KV cache, per-token
causal decisions, the real generation loop) in one process, alternating rep by rep: prefill
tokens/s and decode tokens/s at batch 1 and 8. Their weights are random, so each routed
block's predictor bias is set to let the configured capacity (12.5%) of tokens enter, the rate
a trained causal router aims for (the trained tiny model below shows its real entry rate).

Quality: a tiny MoDE model is trained (``configs/tiny.yaml``) or taken from ``--run-dir``,
exported, and evaluated on its validation batches: agreement of the causal decisions with
top-k, and the relative loss gap of causal over top-k routing.

The last line is machine-readable:
``decode_speedup=… prefill_speedup=… causal_agreement=… loss_gap=…`` (speedups at batch 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modmoe.config import load_config  # noqa: E402
from modmoe.export import export_checkpoint  # noqa: E402
from modmoe.inference.evaluate import evaluate, load_validation  # noqa: E402
from modmoe.inference.generate import Generator  # noqa: E402
from modmoe.inference.loading import LoadedModel, load_exported  # noqa: E402
from modmoe.inference.sampling import SamplingConfig  # noqa: E402
from modmoe.model import MoDETransformer  # noqa: E402
from modmoe.model_config import ModelConfig  # noqa: E402


def build(cfg: ModelConfig, device: str, seed: int) -> LoadedModel:
    """A random model initialized as training initializes it (the runtime runs the same class)."""
    torch.manual_seed(seed)
    model = MoDETransformer(cfg)
    return LoadedModel(Path("."), model.to(device).eval(), cfg.to_args(), {}, None, None)


@torch.no_grad()
def calibrate_entry(gen: Generator, prompt_len: int, new_tokens: int) -> None:
    """Sets each routed block's predictor bias, block by block, so that a ``capacity`` fraction
    of decode-step tokens enters it (measured on the states decode steps really produce:
    prompt states sit at other positions and differ)."""
    model, capacity = gen.model, gen.loaded.config.depth.capacity
    vocab = gen.loaded.config.vocab_size
    for block in model.layers:
        if block.router is None:
            continue
        seen: list[torch.Tensor] = []
        router_logits = block.router.logits

        def recording(x: torch.Tensor, router_logits=router_logits, seen=seen) -> torch.Tensor:
            if x.dim() == 3 and x.shape[1] == 1:  # a decode step's states
                seen.append(x)
            return router_logits(x)

        block.router.logits = recording
        prompts = torch.randint(2, vocab, (16, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
        try:
            for _ in gen.stream_ids(prompts, sampling(new_tokens, 1)):
                pass
        finally:
            del block.router.logits  # back to the method
        pred = block.router.predictor
        x = torch.cat(seen).float().flatten(0, 1)  # (steps * rows, D)
        logits = pred[2](pred[1](pred[0](x))).flatten()  # with the current bias
        pred[2].bias -= torch.quantile(logits, 1.0 - capacity)


def sampling(new_tokens: int, seed: int) -> SamplingConfig:
    # Sampled, not greedy: a random model's greedy text repeats one token, whose fixed
    # decision would make a routed layer always (or never) entered.
    return SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop_at_eos=False, seed=seed)


def run_once(gen: Generator, batch: int, args, vocab: int, seed: int) -> dict[str, float]:
    """One generation for ``batch`` prompts: its timings, and the decode FLOPs and routed-layer
    entries counted from its own decisions."""
    prompts = torch.randint(2, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(seed)).tolist()
    for _ in gen.stream_ids(prompts, sampling(args.new_tokens, seed)):
        pass
    s = gen.stats
    return {
        "prefill": s.prompt_tokens / s.prefill_s,
        "decode": s.decode_tokens / s.decode_s,
        "tokens": s.decode_tokens,
        "flops": s.decode_flops,
        **{f"entered{layer}": n for layer, n in s.entered.items()},
    }


def speed(args) -> dict[str, float]:
    cfg = load_config(args.config).model
    moe_only = cfg.model_copy(update={"depth": cfg.depth.model_copy(update={"enabled": False})})
    gens = {
        "MoDE": Generator(build(cfg, args.device, 0), causal_router="predictor"),
        "MoE-only": Generator(build(moe_only, args.device, 0)),
    }
    calibrate_entry(gens["MoDE"], args.prompt_len, args.new_tokens)
    for g in gens.values():  # warm-up (allocator, kernels)
        run_once(g, 1, argparse.Namespace(prompt_len=16, new_tokens=4), cfg.vocab_size, 0)
    # Each generation alternates between the two models, so both see the same machine load
    # (the CPU may be shared); medians over many short runs damp what load remains.
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    for rep in range(args.reps):
        for batch, runs in ((1, 4), (8, 2)):
            for i in range(runs):
                for name, g in gens.items():
                    samples.setdefault((name, batch), []).append(
                        run_once(g, batch, args, cfg.vocab_size, 1000 * rep + i)
                    )
    print(
        f"\nspeed: {args.config}; prompts of {args.prompt_len} random tokens, {args.new_tokens} sampled tokens each; "
        f"{args.reps} reps (generations per rep: 4 at batch 1, 2 at batch 8); device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| model | batch | prefill tokens/s (median / best) | decode tokens/s (median / best) | decode MFLOP/token (executed) | decode entry per routed layer |"
    )
    print("|---|---:|---:|---:|---:|---|")
    result: dict[str, float] = {}
    for batch in (1, 8):
        for name in gens:
            runs = samples[(name, batch)]
            tokens = sum(r["tokens"] for r in runs)
            flops = sum(r["flops"] for r in runs) / tokens
            entry = {k[7:]: sum(r.get(k, 0.0) for r in runs) / tokens for k in runs[0] if k.startswith("entered")}
            for key in ("prefill", "decode"):
                result[f"{name}/{batch}/{key}"] = statistics.median(r[key] for r in runs)
                result[f"{name}/{batch}/{key}/best"] = max(r[key] for r in runs)
            result[f"{name}/{batch}/flops"] = flops
            entry_text = ", ".join(f"{i}: {f:.0%}" for i, f in entry.items()) or "-"
            print(
                f"| {name} | {batch} | {result[f'{name}/{batch}/prefill']:,.0f} / {result[f'{name}/{batch}/prefill/best']:,.0f} | "
                f"{result[f'{name}/{batch}/decode']:,.1f} / {result[f'{name}/{batch}/decode/best']:,.1f} | {flops / 1e6:.1f} | {entry_text} |"
            )
    for batch in (1, 8):
        ratio = lambda key: result[f"MoDE/{batch}/{key}"] / result[f"MoE-only/{batch}/{key}"]
        predicted = result[f"MoE-only/{batch}/flops"] / result[f"MoDE/{batch}/flops"]
        print(
            f"batch {batch}: decode speedup {ratio('decode'):.2f}x median, {ratio('decode/best'):.2f}x best "
            f"(executed FLOPs ratio {predicted:.2f}x); prefill speedup {ratio('prefill'):.2f}x median, {ratio('prefill/best'):.2f}x best"
        )
    result["decode_speedup"] = result["MoDE/1/decode"] / result["MoE-only/1/decode"]
    result["prefill_speedup"] = result["MoDE/1/prefill"] / result["MoE-only/1/prefill"]
    return result


def quality(args) -> dict[str, float]:
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None:
        from modmoe.train.loop import run_training

        run_dir = Path(args.work_dir) / "tiny-run"
        overrides = [
            f"trainer.run_dir={run_dir}",
            f"trainer.max_steps={args.train_steps}",
            "logging.mlflow.enabled=false",
            "trainer.progress_bar=false",
            *args.set,
        ]
        t0 = time.perf_counter()
        run_training(load_config(REPO / "configs" / "tiny.yaml", overrides), resume="none")
        print(f"trained {run_dir} ({args.train_steps} steps) in {time.perf_counter() - t0:.0f}s")
    out = Path(args.work_dir) / "tiny-export"
    export_checkpoint(run_dir, out, overwrite=True)
    loaded = load_exported(out)
    data = load_validation(loaded, batches=args.eval_batches)
    print(
        f"\nquality: {run_dir}, {len(data)} validation batches x {data[0][0].shape[0]} x {data[0][0].shape[1]} tokens"
    )
    print(
        "| causal router | loss top-k | loss causal | loss gap | agreement (mean) | agreement per routed layer | causal entry |"
    )
    print("|---|---:|---:|---:|---:|---|---|")
    rows = {}
    routers = ["aux_loss"] + (["predictor"] if loaded.config.depth.predictor else [])
    for router in routers:
        r = evaluate(loaded, data, causal_router=router)
        rows[router] = r
        per_layer = ", ".join(f"{i}: {a:.3f}" for i, a in r.agreement.items())
        entry = ", ".join(f"{i}: {e:.3f}" for i, e in r.causal_entry.items())
        print(
            f"| {router} | {r.loss_topk:.4f} | {r.loss_causal:.4f} | {r.loss_gap:+.2%} | {r.mean_agreement:.4f} | {per_layer} | {entry} |"
        )
    trained_for = rows[loaded.config.depth.causal_router]
    return {"causal_agreement": trained_for.mean_agreement, "loss_gap": trained_for.loss_gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "generate_speed.yaml"), help="speed models' config")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--run-dir", help="a trained run to measure causal quality on (default: train configs/tiny.yaml)")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], help="override for the tiny training run (repeatable)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--work-dir", default=None, help="where the tiny run and exports go (default: a temp dir)")
    ap.add_argument("--skip-quality", action="store_true", help="speed only (agreement and gap print as nan)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or tmp
        q = {"causal_agreement": float("nan"), "loss_gap": float("nan")} if args.skip_quality else quality(args)
        s = speed(args)
    print(
        f"decode_speedup={s['decode_speedup']:.3f} prefill_speedup={s['prefill_speedup']:.3f} "
        f"causal_agreement={q['causal_agreement']:.4f} loss_gap={q['loss_gap']:.4f}"
    )


if __name__ == "__main__":
    main()
