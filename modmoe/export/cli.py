"""``modmoe export``: the command (a thin layer over :func:`export_checkpoint`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``2GB``, ``500MiB``, ``300000`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        from modmoe.export import ExportError

        raise ExportError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MiB or 300000 (bytes)")
    return int(float(m.group(1)) * _UNITS[unit])


def fail(msg: str) -> typer.Exit:
    typer.echo(f"modmoe: {msg}", err=True)
    return typer.Exit(2)


def export_command(
    source: Annotated[
        Path,
        typer.Argument(help="A run directory (its newest valid checkpoint) or a checkpoints/step_XXXXXXXX directory"),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist unless --overwrite)")],
    dtype: Annotated[
        str, typer.Option(help="Weight dtype: fp32, bf16 or fp16 (routers and expert_bias stay fp32)")
    ] = "fp32",
    max_shard_size: Annotated[
        str, typer.Option(help="Split weights into shards of at most this size, with an index")
    ] = "2GB",
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json to ship (default: the run's, from data.prepared_dir)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out if it is an earlier export (or empty); nothing else is ever replaced")
    ] = False,
    standard: Annotated[
        bool,
        typer.Option(
            "--standard",
            help="Write the stock transformers architecture (the imported one, or Llama/Mixtral/Qwen3-MoE), "
            "no remote code; a MoDE model is refused",
        ),
    ] = False,
) -> None:
    """Export a checkpoint to a Hugging Face style directory (safetensors, tokenizer, config, and
    self-contained modeling code for trust_remote_code; with --standard a stock architecture)."""
    from safetensors import SafetensorError

    from modmoe.errors import UserError, os_errors_in_one_line
    from modmoe.export import export_checkpoint
    from modmoe.export.standard import export_standard

    try:
        with os_errors_in_one_line(f"export to --out {out} failed"):  # a read-only or full output location
            summary = (export_standard if standard else export_checkpoint)(
                source,
                out,
                dtype=dtype,
                max_shard_bytes=parse_size(max_shard_size),
                tokenizer=tokenizer,
                overwrite=overwrite,
                log=lambda m: typer.echo(m, err=True),
            )
    except UserError as err:
        raise fail(str(err).splitlines()[0]) from None
    except SafetensorError as err:  # the Rust writer reports a failed write as its own error, not an OSError
        if "I/O error" not in str(err):
            raise
        raise fail(f"export to --out {out} failed: {str(err).splitlines()[0]}") from None
    shards = f"{summary.shards} shards + index" if summary.shards > 1 else "1 file"
    typer.echo(
        f"exported step {summary.step} of {summary.checkpoint} to {summary.out}: {summary.tensors} tensors, "
        f"{summary.weight_bytes / 2**20:.1f} MiB {summary.dtype} in {shards}"
    )
