"""``modmoe submit``: validate a Slurm training job, render its batch script, submit it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modmoe.config_base import ConfigError, field_error, validate_config
from modmoe.launch.config import SubmitConfig
from modmoe.launch.mlflow_link import run_link, tracking_uri
from modmoe.launch.render import render


@dataclass(frozen=True)
class SubmitResult:
    """What a submission produced (``job_id`` and ``mlflow_run`` are None for a dry run)."""

    script: str
    job_id: str | None
    run_dir: Path
    tracking_uri: str | None
    mlflow_run: str | None = None
    """Where the job's MLflow run is: a UI link for a server (see :mod:`modmoe.launch.mlflow_link`)."""


def _check_training_config(cfg: SubmitConfig) -> Any:
    """Loads the training config with the overrides, so a typo fails now rather than on the
    cluster after queueing; the run directory belongs to the launcher."""
    from modmoe.config import load_config, parse_override

    for item in cfg.overrides:
        if parse_override(item)[0] == ["trainer", "run_dir"]:
            raise field_error("overrides", item, "trainer.run_dir is set by the launcher (use --runs-root)")
    return load_config(cfg.config, cfg.overrides)


def submit(
    config_path: str | Path,
    nodes: int = 1,
    gpus_per_node: int = 0,
    partition: str | None = None,
    time: str = "24:00:00",
    dry_run: bool = False,
    overrides: Sequence[str] = (),
    *,
    echo: Callable[[str], None] = print,
    **options: Any,
) -> SubmitResult:
    """Renders ``launch/train.sbatch`` for the job and submits it with ``sbatch`` (or only
    prints it when ``dry_run``). ``options`` are the other :class:`SubmitConfig` fields
    (``procs_per_node``, ``runs_root``, ``signal_grace_s``, ``max_requeues`` ...). Raises
    :class:`ConfigError` with one line for any bad argument or a failed submission."""
    cfg = validate_config(
        SubmitConfig,
        {
            "config": str(config_path),
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "partition": partition,
            "time": time,
            "overrides": list(overrides),
            **options,
        },
    ).check()
    job_cfg = _check_training_config(cfg)
    workdir = Path.cwd()
    script = render(cfg, workdir)
    runs_root = cfg.runs_root.resolve()
    if dry_run:
        run_dir = runs_root / f"{cfg.resolved_job_name}-<JOBID>"
        echo(script.rstrip("\n"))
        return SubmitResult(script, None, run_dir, tracking_uri(job_cfg, run_dir))

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(
            "launch error: sbatch not found on PATH (is this a Slurm login node? --dry-run only prints the script)"
        )
    (runs_root / "slurm-logs").mkdir(parents=True, exist_ok=True)
    # The script goes in on stdin: Slurm keeps its own copy, which requeued attempts rerun.
    proc = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ConfigError(f"launch error: sbatch refused the job: {reason}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    run_dir = runs_root / f"{cfg.resolved_job_name}-{job_id}"
    echo(f"submitted job {job_id}")
    echo(f"run directory: {run_dir}")
    echo(f"batch log: {runs_root / 'slurm-logs' / f'{cfg.resolved_job_name}-{job_id}.out'}")
    link = run_link(job_cfg, run_dir, job_id)  # may ask the MLflow server: after the job id is out
    echo(f"MLflow run: {link}")
    return SubmitResult(script, job_id, run_dir, tracking_uri(job_cfg, run_dir), link)
