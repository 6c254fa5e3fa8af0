"""``modmoe tracking …`` commands (mounted by the main CLI as a typer sub-app)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from modmoe.tracking.spool import read, replay_spool, spool_path

tracking_app = typer.Typer(help="MLflow tracking utilities.", no_args_is_help=True)


@tracking_app.callback()
def _group() -> None:
    """MLflow tracking utilities."""


@tracking_app.command("replay")
def replay(
    run_dir: Annotated[Path, typer.Argument(help="Run directory holding mlflow_spool.jsonl.")],
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="Send to this URI instead of the one stored with each record.")
    ] = None,
) -> None:
    """Re-send tracking records that could not be delivered during training."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not run_dir.is_dir():
        typer.echo(f"error: run directory {run_dir} does not exist", err=True)
        raise typer.Exit(2)
    if not spool_path(run_dir).exists():
        typer.echo(f"nothing to replay: {spool_path(run_dir)} does not exist")
        return
    try:
        sent = replay_spool(run_dir, tracking_uri)
        left = len(read(spool_path(run_dir)))
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"sent {sent} record(s); {left} left in {spool_path(run_dir)}")
    if left:
        raise typer.Exit(1)
