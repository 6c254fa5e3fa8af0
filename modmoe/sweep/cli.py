"""``modmoe sweep SPEC.yaml``: the command (a thin layer over the sweep package)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from modmoe.sweep.points import Point
    from modmoe.sweep.spec import SweepSpec


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"modmoe sweep: {msg}", err=True)
    return typer.Exit(2)


def sweep_command(
    spec_path: Annotated[Path, typer.Argument(help="Sweep spec (YAML); fields in modmoe/sweep/spec.py")],
    point: Annotated[
        str | None, typer.Option(help="Train only this point (index or name): what each Slurm array task runs")
    ] = None,
    report: Annotated[bool, typer.Option("--report", help="Only print and write the findings and the plot")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="List the points (steps, FLOPs, state) and exit")] = False,
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit the unfinished points as a Slurm job array")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --slurm: print the batch scripts only")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a spec field (runs_root=/big/disk) or a common config override "
            "(overrides.data.prepared_dir=/big/data); repeatable; give the same on every call",
        ),
    ] = None,
) -> None:
    """Train a grid of configs, each to a fixed budget of executed training FLOPs, then the further
    seeds of each variant's best point, then print and write the findings and one isoFLOP plot.
    Finished points are skipped; interrupted ones resume."""
    from modmoe.config_base import ConfigError
    from modmoe.sweep import expand, load_spec, run_local, run_point, state, submit_sweep, write_report
    from modmoe.sweep.runner import SweepInterrupted, prepare_data_once
    from modmoe.sweep.seeds import make_plan

    if sum([point is not None, report, plan, slurm]) > 1:
        raise _fail("--point, --report, --plan and --slurm exclude each other")
    if dry_run and not slurm:
        raise _fail("--dry-run goes with --slurm")
    sets = list(set_ or [])
    try:
        spec = load_spec(spec_path, sets)
        grid = expand(spec)
        if point is not None:
            raise typer.Exit(run_point(spec, make_plan(spec, grid).find(point), typer.echo))
        if plan:
            _print_plan(spec, grid)
            return
        if slurm:
            known = make_plan(spec, grid)
            pending = [p for p in known.points if state(p) != "finished"]
            if not pending:
                typer.echo("every point is finished: writing the report")
                write_report(spec, known, typer.echo)
                return
            if not dry_run:
                prepare_data_once(grid, typer.echo)
            submit_sweep(spec, spec_path, pending, dry_run=dry_run, echo=typer.echo, sets=sets)
            if known.waiting:
                typer.echo(
                    f"{len(known.waiting)} seed point(s) wait for their grid to finish: submit the sweep again then"
                )
            return
        failed = [] if report else run_local(spec, grid, typer.echo)
        write_report(spec, make_plan(spec, grid), typer.echo)
    except SweepInterrupted as err:
        typer.echo(f"modmoe sweep: {err}", err=True)
        raise typer.Exit(1) from None
    except (ConfigError, ValueError) as err:
        raise _fail(str(err).splitlines()[0]) from None
    if failed:
        typer.echo(f"modmoe sweep: {len(failed)} point(s) did not finish: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def _print_plan(spec: SweepSpec, grid: list[Point]) -> None:
    from modmoe.sweep import state
    from modmoe.sweep.seeds import make_plan

    known = make_plan(spec, grid)
    for p in known.grid:
        typer.echo(_plan_line(p, state(p)))
    for slot in known.slots:
        if slot.point is None:
            typer.echo(
                f"{slot.index:3d} {slot.describe()}: waits for that grid "
                f"({slot.grid_finished} of {slot.grid_total} points finished)"
            )
        else:
            typer.echo(_plan_line(slot.point, state(slot.point)) + f" ({slot.describe()})")


def _plan_line(p: Point, where: str) -> str:
    return (
        f"{p.index:3d} {p.name}: {p.max_steps} steps x {p.flops_per_step:.3g} FLOPs = "
        f"{p.executed_flops:.4g} of {p.budget:.4g}; {where}"
    )
