"""modmoe side by side with plain transformers on the same imported model (issue: pretrained import).

For a Llama and a Mixtral of the sizes given by the flags (random weights made by transformers,
saved, then imported through ``model.from_hf``), in one process, alternating rep by rep so both
see the same machine load:

- training step: forward + backward + optimizer step of the same batch, modmoe's native backend
  (the trainer's own step: autocast, aux losses, clipping, AdamW) against the transformers model
  with the same weights, autocast, loss (+ its router load-balancing loss for Mixtral), clipping
  and ``torch.optim.AdamW``; the first step's losses are printed to show both compute the same;
- generation: modmoe's runtime (``modmoe generate``'s ``Generator``, KV cache) against
  transformers' ``generate`` (greedy, no early stop) for the same weights; prefill tokens/s from a
  one-token generation, decode tokens/s from the time the other ``new_tokens - 1`` add, at batch
  1 and 8.

Tables in Markdown; the last line is ``key=value`` pairs: ``<family>_train_ratio`` (modmoe over
transformers tokens/s) and ``<family>_{prefill,decode}_b{1,8}_ratio``. ``--tiny`` runs in
seconds on a CPU to check the script; timings are meant for a quiet GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modmoe.config import JobConfig  # noqa: E402
from modmoe.config_base import validate_config  # noqa: E402
from modmoe.inference.generate import Generator  # noqa: E402
from modmoe.inference.loading import LoadedModel  # noqa: E402
from modmoe.inference.sampling import SamplingConfig  # noqa: E402
from modmoe.parallel.config import ParallelConfig  # noqa: E402
from modmoe.parallel.distributed import init_distributed  # noqa: E402
from modmoe.train.backends.native import NativeBackend  # noqa: E402
from modmoe.train.resolve import resolve_job  # noqa: E402

FAMILIES = ("llama", "mixtral")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_config(family: str, args):
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, args.prompt_len + args.new_tokens),
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common, intermediate_size=args.ffn)
    return MixtralConfig(
        **common,
        intermediate_size=args.expert_ffn,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
    )


def make_checkpoint(family: str, args, work: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(hf_config(family, args))
        model.save_pretrained(work / family, safe_serialization=True)
    return work / family


def load_transformers(directory: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)


def modmoe_backend(directory: Path, args, work: Path, family: str) -> NativeBackend:
    """The trainer's native backend with ``model.from_hf`` loaded (one rank)."""
    cfg = validate_config(
        JobConfig,
        {
            "model": {"from_hf": str(directory), "moe": {"aux_loss_coef": 0.001, "z_loss_coef": 0.0}},
            "data": {"seq_len": args.seq_len, "vocab_size": min(args.vocab, 4096)},
            "optimizer": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant"},
            "trainer": {
                "run_dir": str(work / f"run-{family}"),
                "global_batch_size": args.batch,
                "micro_batch_size": args.batch,
                "device": args.device,
                "precision": args.precision,
                "memory_check": "off",
            },
        },
    )
    job = resolve_job(cfg, world_size=1)
    return NativeBackend(job, init_distributed(ParallelConfig(), args.device), load_pretrained=True)


class TransformersStep:
    """The same step in plain transformers: autocast like modmoe's, CE loss (+ the router's
    load-balancing loss, weighted by transformers' own coefficient), clipping at 1.0, AdamW."""

    def __init__(self, model, precision: torch.dtype | None, moe: bool) -> None:
        self.model, self.precision, self.moe = model.train(), precision, moe
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        device = inputs.device
        autocast = torch.autocast(device.type, dtype=self.precision, enabled=self.precision is not None)
        with autocast:
            out = self.model(input_ids=inputs, output_router_logits=self.moe) if self.moe else self.model(inputs)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
            total = loss + self.model.config.router_aux_loss_coef * out.aux_loss if self.moe else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def time_training(family: str, directory: Path, args, work: Path, device: torch.device) -> dict[str, float]:
    backend = modmoe_backend(directory, args, work, family)
    precision = backend.autocast
    hf = TransformersStep(load_transformers(directory, device), precision, moe=family != "llama")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g) for _ in range(4)]

    def ours(i: int) -> float:
        ids = batches[i % len(batches)].to(device)
        stats = backend.forward_backward([(ids[:, :-1], ids[:, 1:])], i)
        backend.optimizer_step()
        return stats.loss

    def theirs(i: int) -> float:
        ids = batches[i % len(batches)].to(device)
        return hf(ids[:, :-1], ids[:, 1:])

    first = {"modmoe": ours(0), "transformers": theirs(0)}  # same weights, same batch: same loss
    for i in range(1, args.warmup):
        ours(i), theirs(i)
    times: dict[str, list[float]] = {"modmoe": [], "transformers": []}
    for i in range(args.steps):
        for name, step in (("modmoe", ours), ("transformers", theirs)):
            sync(device)
            t0 = time.perf_counter()
            step(args.warmup + i)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    out = {f"{name}/step_s": statistics.median(t) for name, t in times.items()}
    out.update({f"{name}/first_loss": loss for name, loss in first.items()})
    out.update({f"{name}/tokens_per_s": tokens / out[f"{name}/step_s"] for name in times})
    return out


def time_generation(family: str, directory: Path, args, device: torch.device) -> dict[str, float]:
    cfg = validate_config(JobConfig, {"model": {"from_hf": str(directory)}})
    from modmoe.hf.load import pretrained_model

    ours_model = pretrained_model(cfg.model).to(device).eval()
    if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"):
        ours_model = ours_model.to(torch.bfloat16)
    dtype = next(ours_model.parameters()).dtype
    gen = Generator(LoadedModel(directory, ours_model, cfg.model.to_args(), {}, None, None), count_flops=False)
    hf = load_transformers(directory, device).to(dtype).eval()
    out: dict[str, float] = {}
    for batch in (1, 8):
        prompts = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))

        def ours(new: int) -> None:
            for _ in gen.stream_ids(prompts.tolist(), SamplingConfig(max_new_tokens=new, stop_at_eos=False)):
                pass

        def theirs(new: int) -> None:
            with torch.no_grad():
                hf.generate(
                    prompts.to(device),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        for run in (ours, theirs):  # warm-up
            run(2)
        samples: dict[str, dict[int, list[float]]] = {"modmoe": {1: [], args.new_tokens: []}, "transformers": {}}
        samples["transformers"] = {1: [], args.new_tokens: []}
        for _ in range(args.gen_reps):
            for new in (1, args.new_tokens):
                for name, run in (("modmoe", ours), ("transformers", theirs)):
                    sync(device)
                    t0 = time.perf_counter()
                    run(new)
                    sync(device)
                    samples[name][new].append(time.perf_counter() - t0)
        for name, by_new in samples.items():
            one, full = statistics.median(by_new[1]), statistics.median(by_new[args.new_tokens])
            out[f"{name}/b{batch}/prefill"] = batch * args.prompt_len / one
            # Below timer noise (tiny sizes), the decode rate is not measured: nan.
            out[f"{name}/b{batch}/decode"] = (
                batch * (args.new_tokens - 1) / (full - one) if full > one else float("nan")
            )
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2816, help="Llama's MLP width")
    p.add_argument("--expert-ffn", type=int, default=1408, help="Mixtral's expert width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--tiny", action="store_true", help="a seconds-long check of the script (CPU)")
    args = p.parse_args(argv)
    if args.tiny:
        args.__dict__.update(
            dim=64, layers=2, heads=4, kv_heads=2, ffn=128, expert_ffn=64, experts=4, vocab=512, seq_len=32,
            batch=2, steps=2, warmup=1, prompt_len=8, new_tokens=8, gen_reps=3,
        )  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = torch.device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf-side-by-side-"))
    results: dict[str, dict[str, float]] = {}
    for family in args.families:
        directory = make_checkpoint(family, args, work)
        results[family] = {
            **time_training(family, directory, args, work, device),
            **time_generation(family, directory, args, device),
        }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\nsizes: dim {args.dim}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), vocab {args.vocab}, "
        f"Llama MLP {args.ffn}, Mixtral {args.experts} experts x {args.expert_ffn} top-{args.top_k}; "
        f"batch {args.batch} x {args.seq_len}; device {name}, precision {args.precision}, torch {torch.__version__}"
    )
    print("\n| model | first loss modmoe / transformers | step ms modmoe | step ms transformers | tokens/s ratio |")
    print("|---|---|---:|---:|---:|")
    summary: dict[str, float] = {}
    for family, r in results.items():
        ratio = r["modmoe/tokens_per_s"] / r["transformers/tokens_per_s"]
        summary[f"{family}_train_ratio"] = ratio
        print(
            f"| {family} | {r['modmoe/first_loss']:.4f} / {r['transformers/first_loss']:.4f} | "
            f"{r['modmoe/step_s'] * 1e3:.1f} | {r['transformers/step_s'] * 1e3:.1f} | {ratio:.2f}x |"
        )
    print(
        f"\ngeneration: prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.gen_reps}"
    )
    print(
        "| model | batch | prefill tok/s modmoe | prefill tok/s transformers | ratio | decode tok/s modmoe | decode tok/s transformers | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for family, r in results.items():
        for batch in (1, 8):
            row = [f"| {family} | {batch} "]
            for kind in ("prefill", "decode"):
                a, b = r[f"modmoe/b{batch}/{kind}"], r[f"transformers/b{batch}/{kind}"]
                summary[f"{family}_{kind}_b{batch}_ratio"] = a / b
                row.append(f"| {a:,.0f} | {b:,.0f} | {a / b:.2f}x ")
            print("".join(row) + "|")
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
