"""The GPU check of the native engine (issue 16): one command, at most 8 minutes, on a bare GPU.

    python benchmarks/gpu_check.py --out-dir OUT [--doc docs/gpu.md]           # a lent GPU
    python benchmarks/gpu_check.py --out-dir /tmp/gc --device cpu --quick      # the CPU rehearsal (CI)

It first prints what it found (Python, torch, CUDA, the GPU, which optional packages import),
then runs phases, each in its own process under its own time cap, so a failure or a timeout
leaves the other phases' results (a phase writes its JSON as it goes):

1. ``correctness``: bf16 vs fp32 logits; grouped-GEMM vs per-expert-loop experts (fp32 and
   bf16 training steps); compiled vs eager training step; and, on CUDA, one top-k training
   forward + backward of each MoE variant under ``torch.cuda.set_sync_debug_mode("error")``
   (any device-to-host sync raises).
2. ``speed``: tokens/s, executed TFLOP/s (``modmoe.model.flops``) and MFU of MoDE vs MoE-only vs
   dense at ``--config`` (default ``configs/gpu-1b.yaml``, sequence 2048), eager / compiled /
   CUDA graphs in bf16, and compiled FP8 (torchao) for MoDE and MoE-only. One process per
   variant and precision: optimizer step included, ``trainer.deterministic`` off (atomics).
3. ``megatron``: ``benchmarks/gpu_verify_megatron.py --quick --phases logits,bench`` when
   ``megatron.core`` imports (its wheel was carried), with what time is left.
4. The report: ``OUT/gpu_check.json`` (every number) and ``OUT/gpu.md`` (``--doc`` with its
   results section replaced by the tables and the exact command; ``--doc`` itself is rewritten
   too). Phases that did not fit in ``--budget-s`` are listed as skipped.

On CPU (the rehearsal) the model is tiny, compile uses ``aot_eager`` (inductor's compile takes
minutes on two cores), FP8 runs torchao's emulation, and CUDA-only checks report ``n/a``.
Exit status 0 when every check that ran passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
BEGIN, END = "<!-- gpu_check results: begin -->", "<!-- gpu_check results: end -->"
OPTIONAL = ("torchao", "megatron.core", "transformer_engine", "pydantic", "yaml", "safetensors", "triton")


# ---------------------------------------------------------------------------- configs
def model_config(args, purpose: str):
    """The model a phase runs. ``speed`` on a GPU: the config's model (``--quick``: a 0.1B cut);
    ``correctness`` on a GPU: a small model (fast compiles); on CPU everything is tiny."""
    from modmoe.config import load_config

    cfg = load_config(REPO / args.config).model
    if args.device == "cpu":
        return cfg.model_copy(
            update={
                "vocab_size": 256,
                "dim": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "ffn_hidden": 128,
                "max_seq_len": 64,
                "moe": cfg.moe.model_copy(update={"num_experts": 4, "expert_hidden": 64}),
                "depth": cfg.depth.model_copy(update={"predictor_hidden": 16}),
            }
        )
    if purpose == "correctness" or args.quick:
        small = {
            "dim": 512,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 4,
            "ffn_hidden": 1408,
            "max_seq_len": 1024,
        }
        return cfg.model_copy(update={**small, "moe": cfg.moe.model_copy(update={"expert_hidden": 512})})
    return cfg


def seq_len(args, cfg) -> int:
    return min(args.seq_len or cfg.max_seq_len, cfg.max_seq_len)


def fmt(v) -> str:
    from gpu_verify_megatron import fmt as table_value  # one table format for both GPU reports

    return table_value(v)


def variant_config(cfg, variant: str):
    from step_time import variants

    return variants(cfg)[variant]


# ---------------------------------------------------------------------------- helpers
def device_of(args) -> torch.device:
    return torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def training_step(model, tokens, bf16: bool):
    with autocast(tokens.device, bf16):
        out = model(tokens, tokens)
    (out.loss + out.aux_total).backward()
    return out.loss.detach().float()


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(value: float, limit: float) -> dict:
    return {"value": value, "limit": limit, "ok": bool(math.isfinite(value) and value <= limit)}


def set_kernel(model, kernel: str) -> None:
    from modmoe.model.moe import GroupedExperts

    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.kernel = kernel


def compile_backend(args) -> str:
    return "inductor" if args.device == "cuda" else "aot_eager"


def save(out: Path, name: str, result: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))


# ---------------------------------------------------------------------------- phase 1
def phase_correctness(args, out: Path) -> None:
    from modmoe.model import MoDETransformer
    from modmoe.parallel.compile import apply_compile

    device = device_of(args)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    cfg = model_config(args, "correctness")
    T, B = seq_len(args, cfg), 2
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    result: dict = {"model": f"dim {cfg.dim}, {cfg.num_layers} blocks, seq {T}, batch {B}", "checks": {}}
    checks = result["checks"]

    def fresh(c=cfg):
        torch.manual_seed(0)
        return MoDETransformer(c).to(device).train()

    model = fresh()
    with torch.no_grad():
        ref = model(tokens).logits.float()
        with autocast(device):
            low = model(tokens).logits.float()
    checks["bf16_vs_fp32_logits"] = check(float((low - ref).abs().max() / ref.abs().max()), 5e-2)
    checks["bf16_vs_fp32_argmax_disagreement"] = check(float((low.argmax(-1) != ref.argmax(-1)).float().mean()), 0.05)
    save(out, "correctness", result)

    for precision, limit in (("fp32", 1e-5), ("bf16", 2e-2)):
        runs = {}
        for kernel in ("loop", "grouped"):
            model = fresh()
            set_kernel(model, kernel)
            runs[kernel] = (training_step(model, tokens, precision == "bf16"), grads(model))
        (loss_l, g_l), (loss_g, g_g) = runs["loop"], runs["grouped"]
        checks[f"grouped_vs_loop_{precision}_loss"] = check(float((loss_g - loss_l).abs() / loss_l.abs()), limit)
        checks[f"grouped_vs_loop_{precision}_grads"] = check(rel(g_g, g_l), 10 * limit)
        save(out, "correctness", result)

    model = fresh()
    loss_e, g_e = training_step(model, tokens, False), grads(model)
    model = fresh()
    t0 = time.perf_counter()
    apply_compile(model, "model", backend=compile_backend(args))
    loss_c, g_c = training_step(model, tokens, False), grads(model)
    result["compile_s"] = time.perf_counter() - t0
    checks["compiled_vs_eager_loss"] = check(float((loss_c - loss_e).abs() / loss_e.abs()), 1e-4)
    checks["compiled_vs_eager_grads"] = check(rel(g_c, g_e), 1e-3)
    save(out, "correctness", result)

    if device.type != "cuda":
        result["sync_debug"] = "n/a on cpu (tests/unit/model/test_static_graph.py checks the graphs instead)"
    else:
        variants = {
            "staged_dropless": cfg,
            "staged_capacity": cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"capacity_factor": 1.25})}),
            "integrated": cfg.model_copy(
                update={"depth": cfg.depth.model_copy(update={"variant": "integrated", "noop_experts": 4})}
            ),
        }
        for name, c in variants.items():
            model = fresh(c)
            training_step(model, tokens, True)  # warm-up: lazy initialisations may sync once
            sync(device)
            model.zero_grad()
            try:
                torch.cuda.set_sync_debug_mode("error")
                training_step(model, tokens, True)
                checks[f"no_host_sync_{name}"] = {"value": "no sync", "ok": True}
            except RuntimeError as err:
                checks[f"no_host_sync_{name}"] = {"value": str(err).splitlines()[0][:200], "ok": False}
            finally:
                torch.cuda.set_sync_debug_mode("default")
            save(out, "correctness", result)
    result["ok"] = all(c["ok"] for c in checks.values())
    save(out, "correctness", result)


# ---------------------------------------------------------------------------- phase 2
def measure(args, variant: str, precision: str, mode: str) -> dict:
    """Median step time of one (variant, precision, mode) after warm-up steps."""
    from modmoe.model import MoDETransformer
    from modmoe.model.flops import count_flops
    from modmoe.parallel.compile import apply_compile
    from modmoe.parallel.fp8 import apply_fp8
    from modmoe.train.config import OptimizerConfig
    from modmoe.train.optim import build_optimizer
    from modmoe.train.throughput import lookup_peak

    device = device_of(args)
    cfg = variant_config(model_config(args, "speed"), variant)
    T = seq_len(args, cfg)
    B = args.micro_batch
    torch.manual_seed(0)
    model = MoDETransformer(cfg).to(device).train()
    t0 = time.perf_counter()
    if precision == "fp8":
        apply_fp8(model, "tensorwise", emulate=device.type == "cpu")
    if mode != "eager":
        apply_compile(model, args.compile, backend=compile_backend(args), cuda_graphs=mode == "cuda_graphs")
    optimizer = build_optimizer(model, OptimizerConfig())
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    bf16 = device.type == "cuda"
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        losses.append(training_step(model, tokens, bf16))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i == 0:
            first_step_s = time.perf_counter() - t0  # building, compiling and the first step
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    flops = count_flops(cfg, T).training_per_token
    tokens_per_s = B * T / step_s
    peak = lookup_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None
    return {
        "variant": variant,
        "precision": precision if bf16 else f"{precision} (cpu: fp32{', emulated' if precision == 'fp8' else ''})",
        "mode": mode,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens_per_s,
        "training_gflop_per_token": flops / 1e9,
        "executed_tflops": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
        "first_step_s": first_step_s,
        "last_loss": float(losses[-1]),
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "ok": all(math.isfinite(float(x)) for x in losses),
    }


def phase_speed(args, out: Path) -> None:
    modes = ["compiled"] if args.precision == "fp8" else ["eager", "compiled"]
    if args.device == "cuda" and args.precision == "bf16" and args.variant != "dense":
        modes.append("cuda_graphs")
    name = f"speed-{args.variant}-{args.precision}"
    results = []
    for mode in modes:
        results.append(measure(args, args.variant, args.precision, mode))
        torch._dynamo.reset()
        save(out, name, {"rows": results, "ok": all(r["ok"] for r in results)})


# ---------------------------------------------------------------------------- orchestration
def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))
        if torch.cuda.is_available()
        else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30
        if torch.cuda.is_available()
        else None,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }
    for name in OPTIONAL:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        env[name] = found
    wheels = sorted(p.name for p in (REPO / ".whl").glob("*.whl")) if (REPO / ".whl").is_dir() else []
    env["carried_wheels"] = ", ".join(wheels) or "none"
    return env


def run_worker(args, out: Path, name: str, extra: list[str], cap: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name.split("-")[0], *passthrough(args), *extra]
    log = out / f"{name}.log"
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, cap))
        code, text = proc.returncode, proc.stdout + "\n--- stderr ---\n" + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, text = "timeout", f"timed out after {cap:.0f} s\n{err.stdout or ''}\n{err.stderr or ''}"
    log.write_text(text if isinstance(text, str) else str(text))
    path = out / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if code != 0:
        tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        result.update(ok=False, error=f"exit {code}: {tail[0][:300]}")
    result["wall_s"] = round(time.time() - t0, 1)
    result["command"] = shlex.join(cmd)
    return result


def passthrough(args) -> list[str]:
    return [
        "--out-dir", str(args.out_dir), "--device", args.device, "--config", args.config,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch),
        "--compile", args.compile, *(["--seq-len", str(args.seq_len)] if args.seq_len else []),
        *(["--quick"] if args.quick else []),
    ]  # fmt: skip


def plan(args) -> list[tuple[str, list[str], float]]:
    """(name, worker arguments, time cap in seconds), most important first."""
    phases = {p.strip() for p in args.phases.split(",")}
    jobs: list[tuple[str, list[str], float]] = []
    if "correctness" in phases:
        jobs.append(("correctness", [], 120))
    if "speed" in phases:
        for precision, variants in (("bf16", ("mode", "moe_only", "dense")), ("fp8", ("mode", "moe_only"))):
            for variant in variants:
                cap = 150 if variant != "dense" else 90
                jobs.append((f"speed-{variant}-{precision}", ["--variant", variant, "--precision", precision], cap))
    if "megatron" in phases and importlib.util.find_spec("megatron") is not None:
        jobs.append(("megatron", [], 240))
    return jobs


def run_megatron(args, out: Path, cap: float) -> dict:
    work = out / "megatron-work"
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "gpu_verify_megatron.py"), "--quick", "--phases", "logits,bench",
        "--device", args.device, "--work", str(work), "--out", str(out / "megatron.md"), "--bench-steps", "3",
        "--phase-timeout", str(int(cap)),
    ]  # fmt: skip
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, cap))
        ok, note = proc.returncode == 0, (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        ok, note = False, f"timed out after {cap:.0f} s"
    phases = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))} if work.exists() else {}
    return {"ok": ok, "note": note, "phases": phases, "wall_s": round(time.time() - t0, 1), "command": shlex.join(cmd)}


def summary_ratios(rows: list[dict]) -> list[str]:
    by = {(r["variant"], r["precision"].split(" ")[0], r["mode"]): r for r in rows if r.get("tokens_per_s")}
    lines = []
    for mode in ("eager", "compiled", "cuda_graphs"):
        a, b = by.get(("mode", "bf16", mode)), by.get(("moe_only", "bf16", mode))
        if a and b:
            predicted = b["training_gflop_per_token"] / a["training_gflop_per_token"]
            lines.append(
                f"- MoDE / MoE-only tokens/s, bf16 {mode}: {a['tokens_per_s'] / b['tokens_per_s']:.3f} "
                f"(FLOPs predict {predicted:.3f}; target >= 1.5)"
            )
    for variant in ("mode", "moe_only"):
        f8, b16 = by.get((variant, "fp8", "compiled")), by.get((variant, "bf16", "compiled"))
        if f8 and b16:
            lines.append(
                f"- FP8 / bf16 tokens/s, {variant} compiled: {f8['tokens_per_s'] / b16['tokens_per_s']:.3f} (target >= 1.25)"
            )
        g, c = by.get((variant, "bf16", "cuda_graphs")), by.get((variant, "bf16", "compiled"))
        if g and c:
            lines.append(
                f"- CUDA graphs / compiled tokens/s, {variant}: {g['tokens_per_s'] / c['tokens_per_s']:.3f} (target >= 1.0)"
            )
    best = max(
        (r for r in rows if r["variant"] == "mode" and r["precision"] == "bf16" and r.get("mfu")),
        key=lambda r: r["mfu"],
        default=None,
    )
    if best:
        lines.append(f"- best MoDE bf16 MFU (executed FLOPs): {best['mfu']:.3f} ({best['mode']}; target >= 0.40)")
    return lines


def report(args, env: dict, results: dict, skipped: list[str], command: str) -> str:
    ran_ok = all(r.get("ok") for r in results.values())
    lines = [
        BEGIN,
        "",
        f"Written by `benchmarks/gpu_check.py` on {time.strftime('%Y-%m-%d %H:%M')}: "
        f"{'every check that ran passed' if ran_ok else 'SOME CHECKS FAILED'}"
        f"{'; skipped (time budget): ' + ', '.join(skipped) if skipped else ''}.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| environment | |",
        "|---|---|",
        *(f"| {k} | {fmt(v)} |" for k, v in env.items()),
    ]
    corr = results.get("correctness")
    if corr:
        lines += ["", f"### Correctness ({fmt(corr.get('model'))}, {corr.get('wall_s')} s)", ""]
        lines += ["| check | value | limit | ok |", "|---|---:|---:|---|"]
        for name, c in corr.get("checks", {}).items():
            lines.append(f"| {name} | {fmt(c.get('value'))} | {fmt(c.get('limit'))} | {fmt(c.get('ok'))} |")
        if "error" in corr:
            lines.append(f"\nError: `{corr['error']}`")
    rows = [row for name, r in results.items() if name.startswith("speed") for row in r.get("rows", [])]
    errors = [f"{name}: `{r['error']}`" for name, r in results.items() if name.startswith("speed") and "error" in r]
    if rows or errors:
        m = model_config(args, "speed")
        lines += [
            "",
            f"### Speed (`{args.config}`{' --quick' if args.quick else ''}: dim {m.dim}, {m.num_layers} blocks, "
            f"batch {args.micro_batch} x {seq_len(args, m)}; {args.warmup} warm-up + {args.steps} timed steps, median; "
            f"compile = {args.compile})",
            "",
            "| variant | precision | mode | step ms | tokens/s | GFLOP/token | TFLOP/s | MFU | build+first step s | max mem GiB | ok |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['variant']} | {r['precision']} | {r['mode']} | {fmt(r['step_ms'])} | {fmt(r['tokens_per_s'])} | "
                f"{fmt(r['training_gflop_per_token'])} | {fmt(r['executed_tflops'])} | {fmt(r['mfu'])} | "
                f"{fmt(r['first_step_s'])} | {fmt(r['max_mem_gib'])} | {fmt(r['ok'])} |"
            )
        lines += ["", *summary_ratios(rows), *(f"- failed: {e}" for e in errors)]
    meg = results.get("megatron")
    if meg:
        lines += ["", f"### Megatron engine ({meg['wall_s']} s): {'ok' if meg['ok'] else 'FAILED'} ({meg['note']})", ""]
        lines += [f"- {name}: ok = {fmt(p.get('ok'))}" for name, p in meg["phases"].items()]
    lines += ["", END]
    return "\n".join(lines)


def write_doc(path: Path, section: str) -> str:
    text = path.read_text() if path.exists() else f"# GPU check\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, required=True, help="where gpu_check.json, gpu.md and the logs go")
    p.add_argument("--doc", type=Path, default=None, help="also rewrite this doc's results section (docs/gpu.md)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="speed at a 0.1B cut of the config's model")
    p.add_argument("--config", default="configs/gpu-1b.yaml")
    p.add_argument("--phases", default="correctness,speed,megatron")
    p.add_argument("--budget-s", type=float, default=450, help="wall time for all phases (the lease allows 8 min)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the model's max_seq_len")
    p.add_argument("--compile", choices=["blocks", "model"], default="blocks")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="mode", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        {"correctness": phase_correctness, "speed": phase_speed}[args.worker](args, args.out_dir)
        return

    start = time.time()
    command = "python " + shlex.join(["benchmarks/gpu_check.py", *sys.argv[1:]])
    env = environment(args)
    for k, v in env.items():
        print(f"[gpu-check] {k}: {v}", flush=True)
    results: dict = {}
    skipped: list[str] = []
    for name, extra, cap in plan(args):
        left = args.budget_s - (time.time() - start)
        if left < 20:
            skipped.append(name)
            continue
        cap = min(cap, left - 5)
        results[name] = (
            run_megatron(args, args.out_dir, cap)
            if name == "megatron"
            else run_worker(args, args.out_dir, name, extra, cap)
        )
        r = results[name]
        print(
            f"[gpu-check] {name}: {'ok' if r.get('ok') else 'FAILED ' + r.get('error', '')} ({r['wall_s']} s)",
            flush=True,
        )
    (args.out_dir / "gpu_check.json").write_text(
        json.dumps(
            {"environment": env, "command": command, "results": results, "skipped": skipped}, indent=1, default=float
        )
    )
    section = report(args, env, results, skipped, command)
    doc = write_doc(args.doc if args.doc is not None else REPO / "docs" / "gpu.md", section)
    (args.out_dir / "gpu.md").write_text(doc)
    if args.doc is not None:
        args.doc.write_text(doc)
    print(section)
    ok = all(r.get("ok") for r in results.values())
    print(f"gpu_check_ok={int(ok)} phases_run={len(results)} skipped={len(skipped)} wall_s={time.time() - start:.0f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
