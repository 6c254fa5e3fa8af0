"""Forward+backward step time of MoDE vs MoE-only vs dense, in one process, alternating.

    python benchmarks/step_time.py [--config configs/bench-cpu.yaml] [--reps 6] [--set k=v ...]

The three models are the same code with routing switched off: MoE-only disables depth
routing; dense also disables experts and uses a SwiGLU of width top_k * expert_hidden (the
same active MLP parameters per token). Steps alternate between the models so that machine
noise hits all three alike; the median of the timed repetitions is reported.

The routing share is measured in the forward pass with the profiler labels the model carries
(``mod_router``, ``mod_gather_scatter``, ``moe_router``): the time inside those ranges over
the forward time. Backward of a gather is a scatter-add of the same size, so the forward
share stands for the whole step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from modmoe.config import load_config
from modmoe.model import ModelConfig, MoDETransformer
from modmoe.model.flops import count_flops


def variants(m: ModelConfig) -> dict[str, ModelConfig]:
    moe_only = m.model_copy(update={"depth": m.depth.model_copy(update={"enabled": False})})
    dense = moe_only.model_copy(
        update={
            "moe": m.moe.model_copy(update={"enabled": False}),
            "ffn_hidden": m.moe.top_k * m.moe.expert_hidden,
        }
    )
    return {"mode": m, "moe_only": moe_only, "dense": dense}


def step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(tokens, tokens)
    (out.loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def routing_shares(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        model(tokens)
        forward = time.perf_counter() - t0
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key in ("mod_router", "mod_gather_scatter", "moe_router"):
            totals[event.key] = event.cpu_time_total / 1e6 / forward
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--reps", type=int, default=6, help="timed repetitions per model (after 2 warm-up)")
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default: trainer.micro_batch_size)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    T, B = cfg.data.seq_len, args.batch or cfg.trainer.micro_batch_size
    torch.manual_seed(0)
    configs = variants(cfg.model)
    models = {name: MoDETransformer(c).train() for name, c in configs.items()}
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T))
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.reps + 2):
        for name, model in models.items():
            dt = step(model, tokens)
            if rep >= 2:
                times[name].append(dt)
    flops = {name: count_flops(c, T).training_per_token for name, c in configs.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    shares = routing_shares(models["mode"], tokens)

    print(
        f"config {args.config}: batch {B} x {T} tokens, {cfg.model.num_layers} blocks, "
        f"{cfg.model.moe.num_experts} experts top-{cfg.model.moe.top_k}, MoD capacity {cfg.model.depth.capacity} "
        f"every {cfg.model.depth.every}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<10} {'step ms':>9} {'min ms':>9} {'tokens/s':>10} {'MFLOP/token':>12} {'GFLOP/s':>9}")
    for name in models:
        tok_s = B * T / median[name]
        print(
            f"{name:<10} {median[name] * 1e3:9.1f} {min(times[name]) * 1e3:9.1f} {tok_s:10.0f} "
            f"{flops[name] / 1e6:12.2f} {flops[name] * tok_s / 1e9:9.1f}"
        )
    measured = median["moe_only"] / median["mode"]
    predicted = flops["moe_only"] / flops["mode"]
    dense_ratio = median["dense"] / median["mode"]
    routing = shares.get("mod_router", 0.0) + shares.get("mod_gather_scatter", 0.0)
    print(
        f"MoDE vs MoE-only: measured {measured:.3f}x, FLOPs-predicted {predicted:.3f}x, "
        f"ratio {measured / predicted:.3f}; MoDE vs dense: {dense_ratio:.3f}x"
    )
    print("forward share of MoDE step: " + ", ".join(f"{k} {v:.2%}" for k, v in sorted(shares.items())))
    print(
        f"speedup_measured={measured:.3f} speedup_predicted={predicted:.3f} "
        f"ratio={measured / predicted:.3f} routing_overhead={routing:.4f}"
    )


if __name__ == "__main__":
    main()
