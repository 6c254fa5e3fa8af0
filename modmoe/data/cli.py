"""``modmoe data prepare|inspect``: the data commands (mounted by the main CLI as a typer sub-app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from modmoe.data.errors import DataError
from modmoe.errors import UserError

data_app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.echo(f"modmoe: {msg}", err=True)
    raise typer.Exit(2)


@data_app.callback()
def _group() -> None:
    """Prepare and inspect training data."""


@data_app.command("prepare")
def prepare(
    config: Annotated[Path, typer.Argument(help="The training config (YAML) whose data: section to prepare")],
    workers: Annotated[int | None, typer.Option(help="Tokenizing processes (default data.prepare_workers)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (repeatable)")] = None,
    bar: Annotated[bool | None, typer.Option("--bar/--no-bar", help="Progress bar (default: on a terminal)")] = None,
) -> None:
    """Tokenize the config's sources into data.prepared_dir (resumable: re-run after a kill),
    so that training only opens the result. On a cluster: launch/prepare.sbatch."""
    from modmoe.config import load_config
    from modmoe.data.prepare import prepare_data

    if workers is not None and workers < 1:
        _fail(f"--workers {workers}: must be >= 1")
    try:
        cfg = load_config(config, set_ or [])
        prepared = prepare_data(cfg.data, log=typer.echo, workers=workers, bar=bar)
    except UserError as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if prepared is not None:
        typer.echo(f"data: ready in {prepared.dir} (fingerprint {prepared.fingerprint})")


@data_app.command("inspect")
def inspect(directory: Annotated[Path, typer.Argument(help="A prepared data directory")]) -> None:
    """Print what a preparation holds: tokenizer, token type, sources, tokens and documents per split."""
    from modmoe.data.prepare import PreparedData

    try:
        prepared = PreparedData.load(directory)
    except DataError as err:
        _fail(str(err))
    index = prepared.index
    typer.echo(
        f"{prepared.dir}: fingerprint {prepared.fingerprint}, {index['output_format']} format, {index['dtype']} "
        f"tokens, vocabulary {prepared.vocab_size}, separator {prepared.eos_token!r} (id {prepared.eot_id})"
    )
    for name, entry in index["sources"].items():
        splits = ", ".join(
            f"{split} {e['num_tokens']:,} tokens / {e['num_documents']:,} documents"
            for split, e in entry["splits"].items()
        )
        typer.echo(f"  {name}: {splits}; {entry['bytes']:,} input bytes, skipped {json.dumps(entry['skipped'])}")
