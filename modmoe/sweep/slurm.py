"""``modmoe sweep SPEC --slurm``: the unfinished points as one Slurm job array (one task per
point, each running the sweep's own point command), then a report job that runs once the
array has ended, however its tasks ended.

A task gets Slurm's USR1 ``slurm.signal_grace_s`` before its time limit and SIGTERM on
preemption; both reach the trainer, which checkpoints and exits. Submitting the sweep again
submits only the points that are not finished, and those resume from their checkpoints.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modmoe.sweep.points import Point, SweepError
from modmoe.sweep.spec import SweepSpec


@dataclass(frozen=True)
class SlurmSubmission:
    array_script: str
    report_script: str
    array_job: str | None = None  # None for a dry run
    report_job: str | None = None


def _header(spec: SweepSpec, job_name: str, log_name: str, workdir: Path, time: str, cpus: int) -> list[str]:
    s = spec.slurm
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={job_name}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={time}",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={spec.sweep_dir() / 'slurm-logs' / log_name}",
    ]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    lines += [f"#SBATCH {arg}" for arg in s.sbatch_args]
    return lines


def _command(spec_path: Path, sets: list[str], *args: str) -> str:
    words = [sys.executable, "-m", "modmoe", "sweep", str(spec_path), *(f"--set={s}" for s in sets), *args]
    return " ".join(shlex.quote(w) for w in words)


def array_indices(points: list[Point]) -> str:
    """``--array`` ranges of the point indices, e.g. ``0-3,6,8-9``."""
    indices = sorted(p.index for p in points)
    ranges, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(ranges)


def render_array(
    spec: SweepSpec, spec_path: Path, pending: list[Point], workdir: Path, sets: list[str] | None = None
) -> str:
    s = spec.slurm
    array = array_indices(pending) + (f"%{s.max_parallel}" if s.max_parallel else "")
    lines = _header(spec, f"sweep-{spec.name}", "%x-%A_%a.out", workdir, s.time, s.cpus_per_task)
    lines += [
        f"#SBATCH --array={array}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{s.signal_grace_s}",
    ]
    if s.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={s.gpus_per_task}")
    lines += [
        "# One sweep point per array task: the task id is the point's index in the sweep.",
        "# exec: the point command itself receives Slurm's signals and passes them to the trainer.",
        f'exec {_command(spec_path, sets or [], "--point")} "$SLURM_ARRAY_TASK_ID"',
    ]
    return "\n".join(lines) + "\n"


def render_report(spec: SweepSpec, spec_path: Path, workdir: Path, sets: list[str] | None = None) -> str:
    lines = _header(spec, f"sweep-{spec.name}-report", "%x-%j.out", workdir, "30", 1)
    lines.append(f"exec {_command(spec_path, sets or [], '--report')}")
    return "\n".join(lines) + "\n"


def _sbatch(script: str, workdir: Path, extra: list[str]) -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SweepError(
            "sweep error: sbatch not found on PATH (is this a Slurm login node? --dry-run prints the scripts)"
        )
    proc = subprocess.run([sbatch, "--parsable", *extra], input=script, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SweepError(f"sweep error: sbatch refused the job: {reason}")
    return proc.stdout.strip().split(";")[0]


def submit_sweep(
    spec: SweepSpec,
    spec_path: Path,
    pending: list[Point],
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    sets: list[str] | None = None,
) -> SlurmSubmission:
    """Submits the array of ``pending`` points and the report job after it (``afterany``); both
    run the sweep command with the same ``--set`` options."""
    workdir = Path.cwd()
    spec_path = spec_path.resolve()
    array = render_array(spec, spec_path, pending, workdir, sets)
    report = render_report(spec, spec_path, workdir, sets)
    if dry_run:
        echo(array.rstrip("\n"))
        echo("# ---- report job, submitted with --dependency=afterany:<array job id> ----")
        echo(report.rstrip("\n"))
        return SlurmSubmission(array, report)
    (spec.sweep_dir() / "slurm-logs").mkdir(parents=True, exist_ok=True)
    array_job = _sbatch(array, workdir, [])
    report_job = _sbatch(report, workdir, [f"--dependency=afterany:{array_job}"])
    echo(f"submitted job array {array_job} ({len(pending)} point(s): {array_indices(pending)})")
    echo(f"submitted report job {report_job} (after the array); logs in {spec.sweep_dir() / 'slurm-logs'}")
    return SlurmSubmission(array, report, array_job, report_job)
