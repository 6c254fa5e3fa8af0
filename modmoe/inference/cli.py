"""``modmoe generate`` and ``modmoe eval``: the commands (thin layers over the runtime)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

DirArg = Annotated[Path, typer.Argument(help="An export directory (written by `modmoe export`)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda when available)")]
DtypeOpt = Annotated[str | None, typer.Option(help="Compute dtype fp32, bf16 or fp16 (default: as exported)")]
RouterOpt = Annotated[
    str | None,
    typer.Option(help="Causal decision: aux_loss (sigmoid(r) > 0.5), predictor or prefix_rank (default: as trained)"),
]


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"modmoe: {msg}", err=True)
    return typer.Exit(2)


def _load(directory: Path, device: str, dtype: str | None, need_tokenizer: bool = True):
    import torch

    from modmoe.inference.export_format import DTYPES
    from modmoe.inference.loading import InferenceError, load_exported

    if device not in ("cpu", "cuda", "auto"):
        raise InferenceError(f"--device {device!r}: allowed cpu, cuda, auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda: no CUDA device is available")
    if dtype is not None and dtype not in DTYPES:
        raise InferenceError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    return load_exported(
        directory, device=device, dtype=getattr(torch, DTYPES[dtype]) if dtype else None, need_tokenizer=need_tokenizer
    )


def _errors():
    from modmoe.config_base import ConfigError
    from modmoe.inference.loading import InferenceError

    return (InferenceError, ConfigError, ValueError)


def generate_command(
    directory: DirArg,
    prompt: Annotated[list[str], typer.Option("--prompt", help="Prompt text; repeat for a batch")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt at most")] = 64,
    routing: Annotated[
        str,
        typer.Option(help="causal (KV cache, per-token decisions) or topk (recompute each step; the training routing)"),
    ] = "causal",
    causal_router: RouterOpt = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample among the most likely tokens reaching probability p")
    ] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); the text ends before it")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    stats: Annotated[bool, typer.Option(help="Print speed, executed FLOPs and routed-layer entry to stderr")] = True,
) -> None:
    """Generate text from an export, streamed to stdout (one prompt), or each completion as it
    finishes, prefixed with its index (several prompts)."""
    from modmoe.config_base import validate_config
    from modmoe.inference.generate import Generator
    from modmoe.inference.sampling import SamplingConfig

    try:
        params = validate_config(
            SamplingConfig,
            {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "stop": stop or [],
                "seed": seed,
            },
        )
        gen = Generator(_load(directory, device, dtype), routing=routing, causal_router=causal_router)
        texts = ["" for _ in prompt]
        reasons: list[str] = ["" for _ in prompt]
        for ev in gen.stream(prompt, params):
            if len(prompt) == 1:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            else:
                texts[ev.index] += ev.text
            if ev.finish_reason is not None:
                reasons[ev.index] = ev.finish_reason
                if len(prompt) > 1:
                    typer.echo(f"[{ev.index}] {texts[ev.index]}")
        if len(prompt) == 1:
            sys.stdout.write("\n")
    except _errors() as err:
        raise _fail(str(err).splitlines()[0]) from None
    if stats:
        s = gen.stats
        lines = [
            f"prefill: {s.prompt_tokens} tokens in {s.prefill_s:.3f}s; decode: {s.decode_tokens} tokens in {s.decode_s:.3f}s"
            + (f" ({s.decode_tokens / s.decode_s:.1f} tokens/s)" if s.decode_s > 0 else ""),
            f"finish: {', '.join(reasons)}; routing: {routing}",
        ]
        if s.decode_tokens:
            lines.append(f"decode: {s.decode_flops / s.decode_tokens / 1e6:.3f} MFLOP/token executed")
        if s.entered:
            lines.append(
                "decode entry per routed layer: "
                + ", ".join(f"layer {i} {f:.1%}" for i, f in s.entry_fraction().items())
            )
        for line in lines:
            typer.echo(line, err=True)


def eval_command(
    directory: DirArg,
    data_dir: Annotated[
        Path | None, typer.Option(help="Prepared data directory (default: the one recorded at export)")
    ] = None,
    batches: Annotated[
        int | None, typer.Option(help="Validation batches (default: the run's trainer.eval_batches)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences per batch (default: the run's micro_batch_size)")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: the run's data.seq_len)")] = None,
    causal_router: RouterOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
) -> None:
    """Validation loss under top-k and under causal routing, and the per-layer agreement of the
    causal decisions with top-k."""
    from modmoe.inference.evaluate import evaluate, load_validation

    try:
        loaded = _load(directory, device, dtype, need_tokenizer=False)
        data = load_validation(loaded, data_dir, batches, batch_size, seq_len)
        result = evaluate(loaded, data, causal_router)
    except _errors() as err:
        raise _fail(str(err).splitlines()[0]) from None
    typer.echo(f"validation: {len(data)} batches, {result.tokens} tokens")
    typer.echo(f"loss top-k routing : {result.loss_topk:.4f}")
    typer.echo(f"loss causal routing: {result.loss_causal:.4f} ({result.loss_gap:+.2%})")
    for i, agreement in result.agreement.items():
        typer.echo(
            f"layer {i}: causal agreement {agreement:.4f}, causal entry {result.causal_entry[i]:.4f}, "
            f"precision {result.precision[i]:.4f}, recall {result.recall[i]:.4f}"
        )
    typer.echo(
        f"loss_topk={result.loss_topk:.6f} loss_causal={result.loss_causal:.6f} "
        f"loss_gap={result.loss_gap:.6f} causal_agreement={result.mean_agreement:.6f}"
    )
