"""``modmoe sweep SPEC.yaml``: the command (a thin layer over the sweep package)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"modmoe sweep: {msg}", err=True)
    return typer.Exit(2)


def sweep_command(
    spec_path: Annotated[Path, typer.Argument(help="Sweep spec (YAML); fields in modmoe/sweep/spec.py")],
    point: Annotated[
        str | None, typer.Option(help="Train only this point (index or name): what each Slurm array task runs")
    ] = None,
    report: Annotated[bool, typer.Option("--report", help="Only write the table and the plot")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="List the points (steps, FLOPs, state) and exit")] = False,
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit the unfinished points as a Slurm job array")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --slurm: print the batch scripts only")] = False,
) -> None:
    """Train a grid of configs, each to a fixed budget of executed training FLOPs, then write one
    table and one isoFLOP plot. Finished points are skipped; interrupted ones resume."""
    from modmoe.config_base import ConfigError
    from modmoe.sweep import expand, load_spec, run_local, run_point, state, submit_sweep, write_report
    from modmoe.sweep.points import find_point
    from modmoe.sweep.runner import SweepInterrupted, prepare_data_once

    if sum([point is not None, report, plan, slurm]) > 1:
        raise _fail("--point, --report, --plan and --slurm exclude each other")
    if dry_run and not slurm:
        raise _fail("--dry-run goes with --slurm")
    try:
        spec = load_spec(spec_path)
        points = expand(spec)
        if point is not None:
            raise typer.Exit(run_point(spec, find_point(points, point), typer.echo))
        if plan:
            for p in points:
                typer.echo(
                    f"{p.index:3d} {p.name}: {p.max_steps} steps x {p.flops_per_step:.3g} FLOPs = "
                    f"{p.executed_flops:.4g} of {p.budget:.4g}; {state(p)}"
                )
            return
        if slurm:
            pending = [p for p in points if state(p) != "finished"]
            if not pending:
                typer.echo("every point is finished: writing the report")
                write_report(spec, points, typer.echo)
                return
            if not dry_run:
                prepare_data_once(points, typer.echo)
            submit_sweep(spec, spec_path, pending, dry_run=dry_run, echo=typer.echo)
            return
        failed = [] if report else run_local(spec, points, typer.echo)
        write_report(spec, points, typer.echo)
    except SweepInterrupted as err:
        typer.echo(f"modmoe sweep: {err}", err=True)
        raise typer.Exit(1) from None
    except (ConfigError, ValueError) as err:
        raise _fail(str(err).splitlines()[0]) from None
    if failed:
        typer.echo(f"modmoe sweep: {len(failed)} point(s) did not finish: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
