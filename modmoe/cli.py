"""Command line: ``modmoe train|flops|...`` (typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modmoe.config_base import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train Mixture-of-Depths-and-Experts language models.",
)

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set model.num_layers=4 (repeatable)")
]


def _fail(msg: str) -> None:
    typer.echo(f"modmoe: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml")],
    set_: SetOption = None,
    resume: Annotated[
        str, typer.Option(help="auto: newest valid checkpoint in the run directory; none; or a checkpoint path")
    ] = "auto",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Only check the job (config, layout, memory, run directory) and say what would run"
        ),
    ] = False,
) -> None:
    """Train (one process, or one rank per process under torchrun)."""
    from modmoe.config import load_config
    from modmoe.errors import UserError
    from modmoe.parallel.failures import exit_on_comm_failure
    from modmoe.train.loop import run_training
    from modmoe.train.resolve import resolve_job

    # Only the project's own errors (bad config, data, checkpoint, ...) become one line; any
    # other exception is a bug and keeps its traceback.
    try:
        job = resolve_job(load_config(config, set_ or []))
        if dry_run:
            typer.echo(
                f"ok: {job.backend} backend, {job.world_size} rank(s) on {job.device_type}, data-parallel {job.dp}, "
                f"{job.accum_steps} accumulation step(s), run directory {job.cfg.trainer.run_dir}"
            )
            return
        # A lost or hung peer (node failure) ends this rank with one line and status 75.
        with exit_on_comm_failure():
            run_training(job, resume=resume)
    except UserError as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


@app.command()
def flops(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    set_: SetOption = None,
) -> None:
    """Executed FLOPs per token of a config, by component, and its speedup over the MoE-only
    and dense versions of the same config."""
    from modmoe.config import load_config
    from modmoe.model.flops import count_flops, parameter_counts, theoretical_speedup

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as err:
        _fail(str(err))
    m, T = cfg.model, cfg.data.seq_len
    report = count_flops(m, T)
    for name, value in sorted(report.per_component.items(), key=lambda kv: -kv[1]):
        typer.echo(f"{name:>16}: {value / 1e6:10.3f} MFLOP/token (forward)")
    typer.echo(
        f"{'total':>16}: {report.forward_per_token / 1e6:10.3f} forward, {report.training_per_token / 1e6:.3f} training"
    )
    counts = parameter_counts(m)
    typer.echo(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    moe_only = m.model_copy(update={"depth": m.depth.model_copy(update={"enabled": False})})
    typer.echo(f"predicted training speedup over MoE-only: {theoretical_speedup(moe_only, m, T):.3f}x")


def _mount_launch() -> None:
    from modmoe.launch.cli import submit_command

    app.command("submit")(submit_command)


def _mount_sweep() -> None:
    from modmoe.sweep.cli import sweep_command

    app.command("sweep")(sweep_command)


def _mount_tracking() -> None:
    from modmoe.tracking.cli import tracking_app

    app.add_typer(tracking_app, name="tracking", help="MLflow helpers (replay a spool of unsent metrics).")


def _mount_data() -> None:
    from modmoe.data.cli import data_app

    app.add_typer(
        data_app, name="data", help="Prepare (modmoe data prepare CONFIG --workers N) and inspect training data."
    )


def _mount_inference() -> None:
    """``export``, ``generate``, ``eval``: thin commands over modmoe.export / modmoe.inference."""
    from modmoe.export.cli import export_command
    from modmoe.inference.cli import eval_command, generate_command

    app.command("export")(export_command)
    app.command("generate")(generate_command)
    app.command("eval")(eval_command)


# Sub-commands whose modules are slow to import (mlflow, transformers: seconds each) are mounted
# only when named, so every rank of `modmoe train` starts without them.
_MOUNTS = {
    "submit": _mount_launch,
    "sweep": _mount_sweep,
    "tracking": _mount_tracking,
    "data": _mount_data,
    "export": _mount_inference,
    "generate": _mount_inference,
    "eval": _mount_inference,
}
_mounted: set = set()


def mount_commands(command: str | None = None) -> None:
    """Mounts the named command's group, or every group when ``command`` is not a known name
    (``--help``, a typo: the listing must be complete)."""
    for mount in {_MOUNTS[command]} if command in _MOUNTS else set(_MOUNTS.values()):
        if mount not in _mounted:
            _mounted.add(mount)
            mount()


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("train", "flops"):
        mount_commands(args[0] if args else None)
    app(args=args)


if __name__ == "__main__":
    main()
