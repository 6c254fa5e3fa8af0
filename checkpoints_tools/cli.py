"""``python -m checkpoints_tools``: inspect, validate, consolidate and convert modmoe checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints_tools.consolidate import consolidate as consolidate_ckpt
from checkpoints_tools.convert import ConvertError, Target
from checkpoints_tools.convert import convert as convert_ckpt
from modmoe.checkpoint.manifest import LAYOUT_MEGATRON, CheckpointError
from modmoe.checkpoint.manifest import validate as validate_ckpt
from modmoe.checkpoint.reader import read_dcp_metadata
from modmoe.errors import UserError, os_errors_in_one_line

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Inspect, validate, consolidate and convert modmoe checkpoints."
)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code=1)


@app.command()
def validate(path: Path = typer.Argument(..., help="A step_XXXXXXXX checkpoint directory.")) -> None:
    """Check sizes and checksums of every file; exit 0 when valid, 1 with the problems listed."""
    problems = validate_ckpt(path)
    if problems:
        typer.echo(f"INVALID {path}: {len(problems)} problem(s)")
        for p in problems:
            typer.echo(f"  - {p}")
        raise typer.Exit(code=1)
    typer.echo(f"OK {path}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A step_XXXXXXXX checkpoint directory.")) -> None:
    """Print step, world size, layout, tensors (shape, dtype, size, shards) and meta."""
    try:
        manifest, md = read_dcp_metadata(path)
    except CheckpointError as err:
        raise _fail(str(err)) from None
    total = sum(f.size for f in manifest.files)
    typer.echo(f"checkpoint: {path}")
    typer.echo(f"step: {manifest.step}")
    typer.echo(f"world size: {manifest.world_size}")
    kind = "Megatron-Core dist checkpointing" if manifest.layout == LAYOUT_MEGATRON else "torch.distributed.checkpoint"
    typer.echo(f"layout: {manifest.layout} ({kind}), {len(manifest.files)} files, {_human(total)}")
    typer.echo(f"model prefix: {manifest.model_prefix}")
    tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    others = sorted(k for k in md.state_dict_metadata if k not in tensors)
    typer.echo(f"tensors ({len(tensors)}):")
    width = max((len(k) for k in tensors), default=0)
    for name in sorted(tensors):
        tm = tensors[name]
        nbytes = tm.size.numel() * tm.properties.dtype.itemsize
        dtype = str(tm.properties.dtype).removeprefix("torch.")
        typer.echo(
            f"  {name:<{width}}  {dtype:<9} {list(tm.size)!s:<16} {_human(nbytes):>10}  {len(tm.chunks)} shard(s)"
        )
    typer.echo(f"other items ({len(others)}): {', '.join(others)}")
    typer.echo("meta:")
    typer.echo(json.dumps(manifest.meta, indent=1, sort_keys=True))
    problems = validate_ckpt(path)
    typer.echo("valid: yes" if not problems else f"valid: NO ({'; '.join(problems)})")


@app.command()
def consolidate(
    path: Path = typer.Argument(..., help="A step_XXXXXXXX checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    prefix: str | None = typer.Option(None, help="Key prefix of the model weights (default: from the manifest)."),
    group_mb: int = typer.Option(256, min=1, help="Load at most this many MiB of tensors at a time."),
    overwrite: bool = typer.Option(False, help="Replace --out, its .meta.json and the config.json beside it."),
) -> None:
    """Merge the sharded model weights into one safetensors file (+ meta/config JSON beside it)."""
    if out.suffix != ".safetensors":
        raise _fail(f"--out = {str(out)!r}: must end with .safetensors")
    try:
        with os_errors_in_one_line(f"consolidate to --out {out} failed"):  # a read-only or full output location
            info = consolidate_ckpt(path, out, prefix=prefix, group_bytes=group_mb << 20, overwrite=overwrite)
    except UserError as err:
        raise _fail(str(err)) from None
    typer.echo(f"wrote {out}: {info['tensors']} tensors, {_human(info['bytes'])}, step {info['step']}")


@app.command()
def convert(
    src: Path = typer.Argument(
        ...,
        help="--to dcp: a DeepSpeed checkpoint (dir with 'latest', or a tag dir); --to deepspeed: a step_XXXXXXXX checkpoint.",
    ),
    dst: Path = typer.Argument(..., help="Output directory (must be new or empty)."),
    to: Target = typer.Option(
        ..., "--to", help="dcp: DeepSpeed -> modmoe; deepspeed: modmoe -> DeepSpeed universal checkpoint."
    ),
    config: Path | None = typer.Option(
        None, help="--to dcp: a modmoe config; check the tensors against its model and record it."
    ),
    tag: str | None = typer.Option(None, help="--to dcp: the DeepSpeed tag to read (default: the 'latest' file)."),
    group_mb: int = typer.Option(256, min=1, help="--to deepspeed: load at most this many MiB of tensors at a time."),
) -> None:
    """Convert between DeepSpeed's checkpoint layout and modmoe's (DCP) layout."""
    try:
        info = convert_ckpt(src, dst, to, config=config, tag=tag, group_bytes=group_mb << 20)
    except (ConvertError, CheckpointError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"wrote {info['out']}: step {info['step']}, {info['parameters']} parameters, {info['buffers']} buffers")
