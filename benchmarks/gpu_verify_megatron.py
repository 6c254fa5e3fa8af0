"""GPU verification of the Megatron-Core engine (issue 8); writes the results to docs/gpu-megatron.md
(benchmarks/gpu_check.py runs its logits and bench phases as part of the one GPU check, docs/gpu.md).

    python benchmarks/gpu_verify_megatron.py                      # one GPU, configs/gpu-1b.yaml
    python benchmarks/gpu_verify_megatron.py --quick              # a few minutes: small model, few steps
    python benchmarks/gpu_verify_megatron.py --nproc 8 --set parallel.tp=2 --megatron sequence_parallel=true
    python benchmarks/gpu_verify_megatron.py --device cpu --quick --out /tmp/gpu.md   # the script itself, on CPU

Phases (each in its own process, so one failure does not hide the others; ``--phases`` picks):

1. ``logits``: the Megatron MoDE model (Transformer Engine layers when TE imports, and
   Megatron's local layers) loaded with a native model's weights through the converter gives
   the native logits: fp32 to 1e-3 of the logit scale; bf16 within 3x the error of the native
   model's own bf16 autocast (both against native fp32), argmax agreement reported.
2. ``train``: ``run_training`` (``engine: megatron``) for N steps on the config's model (stdlib corpus, so no
   data is needed): loss falls; checkpoints at N/2 and N.
3. ``resume``: the N/2 checkpoint resumed to N follows the uninterrupted curve.
4. ``export``: the final dist checkpoint -> native state dict -> native model; its validation
   loss equals the Megatron run's.
5. ``bench``: tokens/s, executed TFLOP/s and MFU of MoDE vs MoE-only, bf16 and (with TE) FP8.

MFU = executed FLOPs (``modmoe.model.flops``: a routed layer counts its k tokens) / time /
the GPU's dense bf16 peak; FP8 rows use the same bf16 peak, so their MFU shows the speedup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
    ("L40S", 362e12),
]


# ---------------------------------------------------------------------------- shared helpers
def job_config(args, run_dir: Path, variant: str = "mode", steps: int | None = None, extra: list[str] = ()):
    """The job config of a phase: the config file's model (or a small one with --quick), the
    embedded stdlib corpus, 2 micro-batches per step. ``extra`` overrides come last."""
    from modmoe.config import load_config

    quick = args.quick or args.device == "cpu"
    over = [
        "data.corpus=stdlib",
        f"data.max_corpus_bytes={2_000_000 if quick else 8_000_000}",
        f"data.prepared_dir={Path(args.work) / 'data'}",
        "data.val_fraction=0.05",
        f"trainer.run_dir={run_dir}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={2 * args.micro_batch * args.dp}",
        f"trainer.max_steps={steps or args.train_steps}",
        "trainer.eval_every=0",
        "trainer.eval_batches=2",
        "trainer.progress_bar=false",
        f"trainer.device={args.device}",
        "logging.mlflow.enabled=false",
        f"checkpoint.interval_steps={max(1, (steps or args.train_steps) // 2)}",
        "checkpoint.keep_last=0",
        "optimizer.warmup_steps=5",
        "optimizer.lr=0.001",
    ]
    if quick:
        over += [
            "model.vocab_size=4096",
            "data.vocab_size=4096",
            "model.dim=256",
            "model.num_layers=4",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.ffn_hidden=512",
            "model.moe.num_experts=4",
            "model.moe.expert_hidden=256",
            "model.max_seq_len=512",
            "data.seq_len=512",
        ]
    if args.device == "cpu":
        over += [
            "model.dim=64",
            "model.ffn_hidden=128",
            "model.moe.expert_hidden=64",
            "model.max_seq_len=128",
            "data.seq_len=128",
            "trainer.precision=fp32",
            "optimizer.grad_clip=null",
        ]
    if variant == "moe_only":
        over.append("model.depth.enabled=false")
    cfg = load_config(REPO / args.config, over + list(args.set) + list(extra))
    if cfg.data.vocab_size > cfg.model.vocab_size:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"vocab_size": cfg.model.vocab_size})})
    return cfg


def engine_values(args, **extra) -> dict:
    """The ``megatron:`` section of a phase, as a dict."""
    import yaml

    values = {"aux_loss_with_expert_bias": "megatron"}  # configs/gpu-1b.yaml uses both (logits are unaffected)
    if args.device == "cpu":
        values.update(dispatcher="allgather", distributed_optimizer=False)  # GPU-only Megatron parts
    for item in args.megatron:
        key, value = item.split("=", 1)
        values[key] = yaml.safe_load(value)
    values.update(extra)
    return values


def engine_config(args, **extra):
    from modmoe.engines.megatron import MegatronConfig

    return MegatronConfig(**engine_values(args, **extra))


def engine_overrides(args, **extra) -> list[str]:
    """``engine: megatron`` and its section, as ``--set`` overrides of the job config."""
    return ["engine=megatron"] + [f"megatron.{k}={json.dumps(v)}" for k, v in engine_values(args, **extra).items()]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write(work: Path, phase: str, result: dict) -> None:
    (work / f"{phase}.json").write_text(json.dumps(result, indent=1, default=float))


# ---------------------------------------------------------------------------- phases
def phase_logits(args) -> dict:
    """Native vs Megatron logits, same weights, one process."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from modmoe.engines.megatron.compat import prepare_megatron, te_available
    from modmoe.engines.megatron.convert import MegatronLayout, load_into_megatron, native_to_megatron
    from modmoe.engines.megatron.cpu_emulation import megatron_on_cpu
    from modmoe.engines.megatron.spec import build_gpt_model
    from modmoe.engines.megatron.translate import build_transformer_config, translate
    from modmoe.model import MoDETransformer

    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # before CUDA starts: fp32 means fp32 on both sides (TE too)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = args.device == "cpu"
    device = torch.device("cpu" if cpu else "cuda", None if cpu else 0)
    if not cpu:
        torch.cuda.set_device(device)
    cfg = job_config(args, Path(args.work) / "logits")
    m = cfg.model
    seq, batch = min(512, m.max_seq_len), 2
    dist.init_process_group("gloo" if cpu else "nccl", store=dist.HashStore(), rank=0, world_size=1)
    prepare_megatron()
    parallel_state.initialize_model_parallel()
    impls = ["local"] + (["transformer_engine"] if te_available() and not cpu else [])
    result: dict = {
        "seq_len": seq,
        "batch": batch,
        "params_M": sum(p.numel() for p in MoDETransformer(m).parameters()) / 1e6,
    }
    with megatron_on_cpu() if cpu else contextlib.nullcontext():
        if not cpu:
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        native = MoDETransformer(m).to(device).eval()
        tokens = torch.randint(0, m.vocab_size, (batch, seq), device=device)
        with torch.no_grad():
            ref = native(tokens).logits.float()
            scale = ref.abs().max().item()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu):
                native_bf16 = native(tokens).logits.float()
        result["native_bf16_rel_err"] = (native_bf16 - ref).abs().max().item() / scale
        mask = ~torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None] if cpu else None
        for impl in impls:
            for precision in ["fp32"] if cpu else ["fp32", "bf16"]:
                eng = engine_config(args, transformer_impl=impl, fp8="none")
                one_gpu = cfg.parallel.model_copy(update={"tp": 1, "ep": 1, "dp": -1, "dp_backend": "ddp"})
                eng = eng.model_copy(update={"pp": 1, "cp": 1, "etp": None, "sequence_parallel": False})
                plan = translate(
                    m,
                    one_gpu,
                    eng,
                    world_size=1,
                    seq_len=seq,
                    precision=precision,
                    te_available=impl == "transformer_engine",
                )
                tc = build_transformer_config(plan, use_cpu_initialization=cpu, perform_initialization=False)
                meg = build_gpt_model(plan, tc).to(device)
                state = native_to_megatron(
                    native.state_dict(), m, MegatronLayout.for_plan(plan.use_te, eng.grouped_gemm)
                )
                load_into_megatron(meg, state)  # copies cast to the model's dtype
                meg.eval()
                with torch.no_grad():
                    out = meg(tokens, torch.arange(seq, device=device).expand(batch, seq), attention_mask=mask).float()
                err = (out - ref).abs().max().item() / scale
                agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
                limit = 1e-3 if precision == "fp32" else max(3 * result["native_bf16_rel_err"], 1e-2)
                result[f"{impl}/{precision}"] = {
                    "rel_err": err,
                    "argmax_agreement": agree,
                    "limit": limit,
                    "ok": err <= limit,
                }
                del meg
    result["ok"] = all(v["ok"] for v in result.values() if isinstance(v, dict))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return result


def _train(args, run_dir: Path, steps: int, resume: str = "auto") -> None:
    """The train/resume/export phases use ``--train-layers`` layers of the config's model (each
    checkpoint of the 1B model with its optimizer state is ~14 GB)."""
    from modmoe.train.loop import run_training

    layers = [f"model.num_layers={args.train_layers}"] if args.train_layers else []
    run_training(job_config(args, run_dir, steps=steps, extra=layers + engine_overrides(args)), resume=resume)


def phase_train(args) -> dict:
    run = Path(args.work) / "train"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    _train(args, run, args.train_steps)
    rank0 = metrics(run)
    if not rank0:  # not rank 0
        return {}
    losses = [m["loss"] for m in rank0]
    k = max(1, min(5, len(losses) // 4))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return {
        "steps": len(losses),
        "first_loss": first,
        "last_loss": last,
        "eval_loss": rank0[-1].get("eval/loss_topk"),
        "wall_s": time.time() - t0,
        "ok": all(math.isfinite(x) for x in losses) and last < first - 0.1,
        "losses": losses,
    }


def phase_resume(args) -> dict:
    work = Path(args.work)
    straight, run = work / "train", work / "resume"
    half = max(1, args.train_steps // 2)
    shutil.rmtree(run, ignore_errors=True)
    _train(args, run, args.train_steps, resume=str(straight / "checkpoints" / f"step_{half:08d}"))
    resumed, ref = metrics(run), metrics(straight)
    if not resumed:
        return {}
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # disk: only the metrics are needed
    diffs = [abs(r["loss"] - ref[r["step"] - 1]["loss"]) / ref[r["step"] - 1]["loss"] for r in resumed]
    return {
        "resumed_from": half,
        "steps": f"{resumed[0]['step']}..{resumed[-1]['step']}",
        "max_rel_loss_diff": max(diffs),
        "ok": resumed[0]["step"] == half + 1 and max(diffs) < 1e-2,
    }


def phase_export(args) -> dict:
    from modmoe.config import load_config
    from modmoe.data import prepare_data, validation_batches
    from modmoe.engines.megatron.checkpoint import megatron_checkpoint_to_native
    from modmoe.model import MoDETransformer

    run = Path(args.work) / "train"
    cfg = load_config(run / "config.yaml")
    t0 = time.time()
    state = megatron_checkpoint_to_native(run / "checkpoints" / f"step_{args.train_steps:08d}", cfg.model)
    convert_s = time.time() - t0
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    model = MoDETransformer(cfg.model)
    model.load_state_dict(state)
    model.to(device).eval()
    data = prepare_data(cfg.data, log=lambda _: None)
    tc = cfg.trainer  # the trainer evaluates eval_batches global batches, whatever the layout
    rows = tc.micro_batch_size * args.dp
    batches = validation_batches(
        data.open("val"), cfg.data.seq_len, rows, tc.eval_batches * tc.global_batch_size // rows
    )
    with (
        torch.no_grad(),
        torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision != "fp32" and device.type == "cuda"
        ),
    ):
        loss = statistics.mean(model(x.to(device), y.to(device)).loss.item() for x, y in batches)
    megatron_loss = metrics(run)[-1]["eval/loss_topk"]
    rel = abs(loss - megatron_loss) / megatron_loss
    tol = 1e-4 if cfg.trainer.precision == "fp32" else 1e-2
    return {
        "native_eval_loss": loss,
        "megatron_eval_loss": megatron_loss,
        "rel_diff": rel,
        "convert_s": convert_s,
        "ok": rel < tol,
    }


def peak_bf16() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def phase_bench(args) -> dict:
    """One variant/precision: warm-up steps, then timed steps through the Trainer (megatron backend)."""
    from modmoe.model.flops import count_flops
    from modmoe.train.loop import Trainer
    from modmoe.train.resolve import resolve_job

    variant, precision = args.variant, args.precision
    run = Path(args.work) / f"bench-{variant}-{precision}"
    shutil.rmtree(run, ignore_errors=True)
    total = args.warmup + args.bench_steps
    engine = engine_overrides(args, fp8="hybrid" if precision == "fp8" else "none")
    cfg = job_config(args, run, variant=variant, steps=total, extra=engine)
    trainer = Trainer(resolve_job(cfg), resume="none", log=lambda _: None)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        steps = [trainer.train_step() for _ in range(total)][args.warmup :]
    finally:
        trainer.close()
    tps = statistics.median(s["tokens_per_s"] for s in steps)
    flops = count_flops(cfg.model, cfg.data.seq_len).training_per_token
    world = int(os.environ.get("WORLD_SIZE", "1"))
    peak = peak_bf16()
    return {
        "variant": variant,
        "precision": precision if args.device == "cuda" else "fp32 (cpu)",
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / world,
        "training_gflop_per_token": flops / 1e9,
        "executed_tflops_per_gpu": tps * flops / world / 1e12,
        "mfu": tps * flops / world / peak if peak else None,
        "last_loss": steps[-1]["loss"],
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "ok": all(math.isfinite(s["loss"]) for s in steps),
    }


PHASES = {
    "logits": phase_logits,
    "train": phase_train,
    "resume": phase_resume,
    "export": phase_export,
    "bench": phase_bench,
}
DISTRIBUTED = {"train", "resume", "bench"}  # run under torchrun when --nproc > 1


# ---------------------------------------------------------------------------- orchestration
def run_phase(args, phase: str, extra: list[str] = ()) -> tuple[dict, str]:
    me = [sys.executable, str(Path(__file__).resolve())]
    passthrough = [
        "--phase",
        phase,
        "--work",
        args.work,
        "--config",
        args.config,
        "--device",
        args.device,
        "--train-steps",
        str(args.train_steps),
        "--bench-steps",
        str(args.bench_steps),
        "--warmup",
        str(args.warmup),
        "--micro-batch",
        str(args.micro_batch),
        "--dp",
        str(args.dp),
        "--train-layers",
        str(args.train_layers),
        *(["--quick"] if args.quick else []),
        *[x for s in args.set for x in ("--set", s)],
        *[x for s in args.megatron for x in ("--megatron", s)],
        *extra,
    ]
    cmd = me + passthrough
    if args.nproc > 1 and phase in DISTRIBUTED:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(args.nproc),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
            ]
            + me
            + passthrough
        )
    name = phase + "".join(f"-{x}" for x in extra if not x.startswith("--"))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.phase_timeout)
    log = Path(args.work) / f"{name}.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    out = Path(args.work) / f"{name}.json"
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:300]}", "log": str(log)}, shlex.join(cmd)
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.time() - t0, 1)
    return result, shlex.join(cmd)


def environment(args) -> dict:
    import megatron.core

    from modmoe.engines.megatron.compat import apex_available, te_available

    env = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "transformer_engine": None,
        "apex": apex_available(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU emulation)",
        "gpus": torch.cuda.device_count(),
        "peak_bf16_tflops": (peak_bf16() or 0) / 1e12 or None,
    }
    if te_available():
        import transformer_engine

        env["transformer_engine"] = transformer_engine.__version__
    return env


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report(args, env: dict, results: dict, commands: list[str]) -> str:
    lines = [
        "# GPU verification of the Megatron-Core engine",
        "",
        f"Written by `benchmarks/gpu_verify_megatron.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({'all checks passed' if all(r.get('ok') for r in results.values()) else 'SOME CHECKS FAILED'}).",
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {fmt(v)} |" for k, v in env.items()]
    lines += [
        "",
        "## Command",
        "",
        "```bash",
        "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "```",
        "",
        "## Checks",
        "",
        "| phase | ok | details |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        if name.startswith("bench"):
            continue
        details: dict = {}
        for k, v in r.items():
            if k in ("ok", "losses", "log"):
                continue
            if isinstance(v, dict):
                details.update({f"{k}.{kk}": vv for kk, vv in v.items() if kk != "ok"})
            else:
                details[k] = v
        lines.append(
            f"| {name} | {fmt(r.get('ok'))} | " + ", ".join(f"{k}={fmt(v)}" for k, v in details.items()) + " |"
        )
    bench = [r for n, r in results.items() if n.startswith("bench")]
    if bench:
        lines += [
            "",
            "## Throughput: MoDE vs MoE-only",
            "",
            f"Model `{args.config}`{' (--quick: small)' if args.quick else ''}, micro-batch {args.micro_batch}, "
            f"{args.warmup} warm-up + {args.bench_steps} timed steps (median), {args.nproc} process(es).",
            "",
            "| variant | precision | tokens/s | tokens/s/GPU | GFLOP/token (train) | TFLOP/s/GPU | MFU | max mem GiB | ok |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in bench:
            lines.append(
                f"| {r.get('variant', '?')} | {r.get('precision', '?')} | {fmt(r.get('tokens_per_s'))} | "
                f"{fmt(r.get('tokens_per_s_per_gpu'))} | {fmt(r.get('training_gflop_per_token'))} | "
                f"{fmt(r.get('executed_tflops_per_gpu'))} | {fmt(r.get('mfu'))} | {fmt(r.get('max_mem_gib'))} | "
                f"{fmt(r.get('ok'))}{' ' + r['error'] if 'error' in r else ''} |"
            )
        by = {(r.get("variant"), r.get("precision")): r for r in bench if r.get("tokens_per_s")}
        for prec in ("bf16", "fp8"):
            a, b = by.get(("mode", prec)), by.get(("moe_only", prec))
            if a and b:
                lines.append(
                    f"\n{prec}: MoDE / MoE-only tokens/s = {a['tokens_per_s'] / b['tokens_per_s']:.3f} "
                    f"(FLOPs predict {b['training_gflop_per_token'] / a['training_gflop_per_token']:.3f})"
                )
    lines += [
        "",
        "## Phase commands",
        "",
        "```bash",
        *commands,
        "```",
        "",
        "Logs of every phase are in the work directory (`--work`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpu-1b.yaml")
    p.add_argument("--out", default="docs/gpu-megatron.md")
    p.add_argument("--work", default="runs/gpu-verify")
    p.add_argument("--phases", default="logits,train,resume,export,bench")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="a small model and few steps (minutes)")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--bench-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--train-layers", type=int, default=8, help="layers of the model in train/resume/export (0 = the config's)"
    )
    p.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun) for train/resume/bench")
    p.add_argument(
        "--dp", type=int, default=1, help="data-parallel degree the --set layout leaves (sizes the global batch)"
    )
    p.add_argument("--set", action="append", default=[], help="job override key=value (repeatable)")
    p.add_argument("--megatron", action="append", default=[], help="MegatronConfig override key=value (repeatable)")
    p.add_argument("--phase-timeout", type=int, default=1800)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="mode", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)

    if args.phase:  # a worker
        if args.device == "cpu" and args.phase in ("train", "resume"):
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        result = PHASES[args.phase](args)
        if int(os.environ.get("RANK", "0")) == 0 and result:
            name = args.phase + (f"-{args.variant}-{args.precision}" if args.phase == "bench" else "")
            write(Path(args.work), name, result)
        return

    from modmoe.engines.megatron.compat import te_available

    env = environment(args)
    results, commands = {}, []
    for phase in [x.strip() for x in args.phases.split(",") if x.strip()]:
        if phase == "bench":
            precisions = ["bf16"] + (["fp8"] if te_available() and args.device == "cuda" else [])
            for precision in precisions:
                for variant in ("mode", "moe_only"):
                    r, cmd = run_phase(args, "bench", ["--variant", variant, "--precision", precision])
                    r.setdefault("variant", variant), r.setdefault("precision", precision)
                    results[f"bench-{variant}-{precision}"] = r
                    commands.append(cmd)
        else:
            results[phase], cmd = run_phase(args, phase)
            commands.append(cmd)
        print(
            f"[gpu-verify] {phase}: {'ok' if all(r.get('ok') for k, r in results.items() if k.startswith(phase)) else 'FAILED'}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report(args, env, results, commands))
    print(f"[gpu-verify] wrote {args.out}")
    sys.exit(0 if all(r.get("ok") for r in results.values()) else 1)


if __name__ == "__main__":
    main()
