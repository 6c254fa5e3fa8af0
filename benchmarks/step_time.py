"""Forward+backward step time of MoDE vs MoE-only vs dense, in one process, alternating.

    python benchmarks/step_time.py [--config configs/bench-cpu.yaml] [--reps 6] [--set k=v ...]
    python benchmarks/step_time.py --kernels loop,grouped --compile off,blocks   # expert kernel x torch.compile
    python benchmarks/step_time.py --seq-lens 256,512,1024,2048,4096             # MoDE vs MoE-only per length

The three models are the same code with routing switched off: MoE-only disables depth
routing; dense also disables experts and uses a SwiGLU of width top_k * expert_hidden (the
same active MLP parameters per token). Steps alternate between the models so that machine
noise hits all three alike; the median of the timed repetitions is reported.

The routing share is measured in the forward pass with the profiler labels the model carries
(``mod_router``, ``mod_gather_scatter``, ``moe_router``): the time inside those ranges over
the forward time. Backward of a gather is a scatter-add of the same size, so the forward
share stands for the whole step.

``--kernels`` and ``--compile`` add columns: every model is built once per (expert kernel,
compile mode) and all of them alternate, so the columns compare under the same machine noise
(``blocks`` compiles each block with inductor, as ``trainer.compile=blocks`` does; the compile
happens in the warm-up steps). ``--seq-lens`` measures MoDE and MoE-only at each sequence length
with the same number of tokens per step (``--tokens``): the measured and the FLOPs-predicted
speedup grow with T, because attention inside a routed block costs c^2 of a full one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from modmoe.config import load_config
from modmoe.model import MoDETransformer
from modmoe.model.flops import count_flops
from modmoe.model.moe import GroupedExperts
from modmoe.model_config import ModelConfig
from modmoe.parallel.compile import apply_compile


def variants(m: ModelConfig) -> dict[str, ModelConfig]:
    moe_only = m.model_copy(update={"depth": m.depth.model_copy(update={"enabled": False})})
    dense = moe_only.model_copy(
        update={
            "moe": m.moe.model_copy(update={"enabled": False}),
            "ffn_hidden": m.moe.top_k * m.moe.expert_hidden,
        }
    )
    return {"mode": m, "moe_only": moe_only, "dense": dense}


def build(cfg: ModelConfig, kernel: str, compile_mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MoDETransformer(cfg).train()
    for m in model.modules():
        if isinstance(m, GroupedExperts) and kernel == "loop":
            m.kernel = "loop"
    apply_compile(model, compile_mode)
    return model


def alternate(models: dict, tokens: dict, reps: int) -> dict[str, list[float]]:
    """Step times per model: 2 warm-up rounds, then ``reps`` timed rounds, models interleaved."""
    times: dict = {name: [] for name in models}
    for rep in range(reps + 2):
        for name, model in models.items():
            dt = step(model, tokens[name])
            if rep >= 2:
                times[name].append(dt)
    return times


def step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(tokens, tokens)
    (out.loss + out.aux_total).backward()
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


def seq_len_sweep(cfg, seq_lens: list[int], tokens_per_step: int, reps: int) -> None:
    """MoDE vs MoE-only at each sequence length, ``tokens_per_step`` tokens per step."""
    longest = max(seq_lens)
    model_cfg = cfg.model.model_copy(update={"max_seq_len": max(longest, cfg.model.max_seq_len)})
    configs = {k: v for k, v in variants(model_cfg).items() if k != "dense"}
    print(
        f"MoDE vs MoE-only per sequence length: {tokens_per_step} tokens per step, {model_cfg.num_layers} blocks, "
        f"MoD capacity {model_cfg.depth.capacity} every {model_cfg.depth.every}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'T':>6} {'batch':>5} {'MoDE ms':>9} {'MoE ms':>9} {'measured':>9} {'predicted':>9} {'ratio':>6} {'attn share MoE':>14}"
    )
    summary = []
    for T in seq_lens:
        B = max(1, tokens_per_step // T)
        models = {name: build(c, "grouped", "off") for name, c in configs.items()}
        tokens = torch.randint(0, model_cfg.vocab_size, (B, T))
        times = alternate(models, {n: tokens for n in models}, reps)
        median = {n: statistics.median(v) for n, v in times.items()}
        flops = {n: count_flops(c, T) for n, c in configs.items()}
        measured = median["moe_only"] / median["mode"]
        predicted = flops["moe_only"].training_per_token / flops["mode"].training_per_token
        attn = flops["moe_only"].per_component["attention_core"] / flops["moe_only"].forward_per_token
        print(
            f"{T:>6} {B:>5} {median['mode'] * 1e3:9.1f} {median['moe_only'] * 1e3:9.1f} {measured:9.3f} "
            f"{predicted:9.3f} {measured / predicted:6.3f} {attn:14.1%}"
        )
        summary.append(f"T{T}={measured:.3f}/{predicted:.3f}")
    print("speedup_measured/predicted " + " ".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--reps", type=int, default=6, help="timed repetitions per model (after 2 warm-up)")
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default: trainer.micro_batch_size)"
    )
    parser.add_argument("--kernels", default="grouped", help="expert kernels to compare: loop, grouped")
    parser.add_argument("--compile", default="off", help="compile modes to compare: off, blocks, model")
    parser.add_argument("--seq-lens", default="", help="comma-separated sequence lengths: MoDE vs MoE-only per T")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step in --seq-lens mode")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.seq_lens:
        seq_len_sweep(cfg, [int(t) for t in args.seq_lens.split(",")], args.tokens, args.reps)
        return
    T, B = cfg.data.seq_len, args.batch or cfg.trainer.micro_batch_size
    configs = variants(cfg.model)
    columns = [(k, c) for k in args.kernels.split(",") for c in args.compile.split(",")]
    models = {
        (name, kernel, mode): build(c, kernel, mode)
        for kernel, mode in columns
        for name, c in configs.items()
        if name != "dense" or kernel == "grouped" or (kernel, mode) == columns[0]  # dense has no experts
    }
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T))
    times = alternate(models, {key: tokens for key in models}, args.reps)
    flops = {name: count_flops(c, T).training_per_token for name, c in configs.items()}
    median = {key: statistics.median(v) for key, v in times.items()}
    reference = columns[0]
    shares = routing_shares(models[("mode", *reference)], tokens)

    print(
        f"config {args.config}: batch {B} x {T} tokens, {cfg.model.num_layers} blocks, "
        f"{cfg.model.moe.num_experts} experts top-{cfg.model.moe.top_k}, MoD capacity {cfg.model.depth.capacity} "
        f"every {cfg.model.depth.every}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'model':<10} {'kernel':<8} {'compile':<7} {'step ms':>9} {'min ms':>9} {'tokens/s':>10} "
        f"{'MFLOP/token':>12} {'GFLOP/s':>9}"
    )
    for (name, kernel, mode), t in median.items():
        tok_s = B * T / t
        print(
            f"{name:<10} {kernel:<8} {mode:<7} {t * 1e3:9.1f} {min(times[(name, kernel, mode)]) * 1e3:9.1f} "
            f"{tok_s:10.0f} {flops[name] / 1e6:12.2f} {flops[name] * tok_s / 1e9:9.1f}"
        )
    predicted = flops["moe_only"] / flops["mode"]
    for kernel, mode in columns:
        measured = median[("moe_only", kernel, mode)] / median[("mode", kernel, mode)]
        print(
            f"[{kernel}, compile {mode}] MoDE vs MoE-only: measured {measured:.3f}x, FLOPs-predicted {predicted:.3f}x, "
            f"ratio {measured / predicted:.3f}"
        )
    for kernel, mode in columns[1:]:
        ratio = median[("mode", *reference)] / median[("mode", kernel, mode)]
        print(f"MoDE [{kernel}, compile {mode}] vs [{reference[0]}, compile {reference[1]}]: {ratio:.3f}x faster")
    main_col = ("grouped", "off") if ("grouped", "off") in columns else reference  # the default path
    measured = median[("moe_only", *main_col)] / median[("mode", *main_col)]
    dense_ratio = median[("dense", *reference)] / median[("mode", *reference)]
    routing = shares.get("mod_router", 0.0) + shares.get("mod_gather_scatter", 0.0)
    print(f"MoDE vs dense: {dense_ratio:.3f}x")
    print("forward share of MoDE step: " + ", ".join(f"{k} {v:.2%}" for k, v in sorted(shares.items())))
    columns_kv = " ".join(
        f"mode_ms_{k}_{m}={median[('mode', k, m)] * 1e3:.1f} speedup_{k}_{m}="
        f"{median[('moe_only', k, m)] / median[('mode', k, m)]:.3f}"
        for k, m in columns
    )
    print(
        f"speedup_measured={measured:.3f} speedup_predicted={predicted:.3f} "
        f"ratio={measured / predicted:.3f} routing_overhead={routing:.4f} {columns_kv}"
    )


if __name__ == "__main__":
    main()
