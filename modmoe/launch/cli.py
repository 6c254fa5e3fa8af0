"""``modmoe submit``: the typer command the main CLI mounts (``app.command("submit")(submit_command)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modmoe.config_base import ConfigError


def submit_command(
    config: Annotated[Path, typer.Argument(help="Training config (YAML), e.g. configs/tiny.yaml")],
    nodes: Annotated[int, typer.Option(help="Nodes to allocate (one torchrun per node)")] = 1,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node, one rank each; 0 = CPU/gloo mode")] = 0,
    partition: Annotated[str | None, typer.Option(help="Slurm partition (default: the cluster's)")] = None,
    time: Annotated[str, typer.Option(help="Time limit: MM, HH:MM:SS, D-HH:MM, ...")] = "24:00:00",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the batch script instead of submitting")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a training config key (repeatable)")] = None,
    procs_per_node: Annotated[int | None, typer.Option(help="Ranks per node in CPU mode (default 1)")] = None,
    cpus_per_node: Annotated[int | None, typer.Option(help="CPUs to request per node")] = None,
    job_name: Annotated[str | None, typer.Option(help="Job name (default modmoe-<config stem>)")] = None,
    runs_root: Annotated[Path, typer.Option(help="Shared directory holding run directories and batch logs")] = Path(
        "runs"
    ),
    signal_grace: Annotated[int, typer.Option(help="Seconds before the time limit to checkpoint and stop")] = 300,
    max_requeues: Annotated[int, typer.Option(help="Give up after this many requeues")] = 3,
    socket_ifname: Annotated[str | None, typer.Option(help="Network interface for NCCL/gloo")] = None,
    sbatch_arg: Annotated[
        list[str] | None, typer.Option(help="Extra sbatch option, e.g. --sbatch-arg=--account=x (repeatable)")
    ] = None,
) -> None:
    """Submit a (multi-node) training job to Slurm; it checkpoints and requeues itself when
    preempted or near its time limit, and resumes in the same run directory."""
    from modmoe.launch.submit import submit

    options = {
        "procs_per_node": procs_per_node,
        "cpus_per_node": cpus_per_node,
        "job_name": job_name,
        "runs_root": runs_root,
        "signal_grace_s": signal_grace,
        "max_requeues": max_requeues,
        "socket_ifname": socket_ifname,
        "sbatch_args": sbatch_arg or [],
    }
    try:
        submit(
            config,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            partition=partition,
            time=time,
            dry_run=dry_run,
            overrides=set_ or [],
            echo=typer.echo,
            **options,
        )
    except ConfigError as err:
        typer.echo(f"modmoe submit: {err}", err=True)
        raise typer.Exit(2) from None


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("submit")(submit_command)

if __name__ == "__main__":
    app()
