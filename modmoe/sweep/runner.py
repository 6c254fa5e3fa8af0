"""Training a sweep's points: each point is one ``modmoe train`` process on the point's config.

A point that is finished is skipped; an interrupted one is started again and the trainer
resumes it from its newest checkpoint (``--resume auto``). SIGTERM and SIGUSR1 sent to the
point command (Slurm's preemption and time-limit warning) are passed on to the trainer, which
checkpoints at its next step and exits; the point is then resumed by the next run of the sweep.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from modmoe.config import dump_config
from modmoe.sweep.points import COMPLETED, Point, state
from modmoe.sweep.results import ATTEMPTS
from modmoe.sweep.seeds import make_plan
from modmoe.sweep.spec import SweepSpec

POINT_CONFIG = "sweep-point.yaml"  # the config the sweep hands to `modmoe train`
TRAIN_LOG = "train.log"  # the trainer's output, appended per attempt

_FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def train_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "modmoe", "train", str(config_path), "--resume", "auto"]


def point_env(spec: SweepSpec) -> dict[str, str]:
    env = dict(os.environ)
    threads = spec.threads or (spec.slurm.cpus_per_task if "SLURM_JOB_ID" in env else None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_point(spec: SweepSpec, point: Point, echo: Callable[[str], None] = print) -> int:
    """Trains one point unless it is finished; returns 0 when the point is finished afterwards,
    else the trainer's exit status (or 1)."""
    before = state(point)
    if before == "finished":
        echo(f"{point.name}: finished, skipped")
        return 0
    run_dir = point.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / POINT_CONFIG
    dump_config(point.config, config_path)
    echo(
        f"{point.name}: {'resuming' if before == 'interrupted' else 'training'} {point.max_steps} steps "
        f"({point.flops_per_token / 1e6:.2f} MFLOP/token x {point.tokens_per_step} tokens/step, budget "
        f"{point.budget:.3g} FLOPs); log {run_dir / TRAIN_LOG}"
    )
    started, t0, cpu0, load0 = time.time(), time.perf_counter(), _children_cpu_s(), os.getloadavg()[0]
    with (run_dir / TRAIN_LOG).open("a") as log:
        proc = subprocess.Popen(
            train_command(config_path), env=point_env(spec), stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd()
        )
        previous = {sig: signal.getsignal(sig) for sig in _FORWARDED}

        def forward(signum, frame):
            proc.send_signal(signum)
            outer = previous[signum]
            if callable(outer):  # a local sweep also notes the request: no further point starts
                outer(signum, frame)

        for sig in _FORWARDED:
            signal.signal(sig, forward)
        try:
            returncode = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    wall_s, cpu_s = time.perf_counter() - t0, _children_cpu_s() - cpu0
    finished = (run_dir / COMPLETED).is_file()
    record = {
        "started": started,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),  # user + system CPU time of the trainer: wall time on a quiet machine
        # The machine's 1-minute load average around the attempt: how far wall (and, less so,
        # CPU) time is from what a quiet machine would give.
        "load_1m_start": round(load0, 2),
        "load_1m_end": round(os.getloadavg()[0], 2),
        "returncode": returncode,
        "finished": finished,
        "resumed": before == "interrupted",
        "host": socket.gethostname(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }
    with (run_dir / ATTEMPTS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    outcome = "finished" if finished else f"not finished (exit {returncode})"
    echo(f"{point.name}: {outcome} after {wall_s:.1f} s ({cpu_s:.1f} s of CPU)")
    return 0 if finished else (returncode or 1)


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prepare_data_once(points: list[Point], echo: Callable[[str], None]) -> None:
    """Prepares (or reuses) the points' shared data before any point starts, so concurrent points
    never race to build the same directory."""
    from modmoe.data import prepare_data

    prepare_data(points[0].config.data, log=echo)


class SweepInterrupted(Exception):
    """The local sweep was asked to stop (SIGTERM/SIGUSR1) while a point trained."""


def run_local(spec: SweepSpec, grid: list[Point], echo: Callable[[str], None] = print) -> list[str]:
    """Trains every unfinished point, one after another, budget by budget: the grid, then the
    further seeds of each variant's best grid point (known once that grid has finished; the plan
    is read again after every point). Returns the names of the points that did not finish. A stop
    request ends the current point with a checkpoint and starts no other."""
    prepare_data_once(grid, echo)
    stopped: list[int] = []
    failed: list[str] = []
    tried: set[str] = set()
    while not stopped:
        point = next((p for p in make_plan(spec, grid).run_order() if p.name not in tried), None)
        if point is None:
            break
        tried.add(point.name)
        handlers = {sig: signal.signal(sig, lambda signum, _f: stopped.append(signum)) for sig in _FORWARDED}
        try:
            rc = run_point(spec, point, echo)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if rc != 0:
            failed.append(point.name)
    if stopped:
        raise SweepInterrupted(f"stopped by signal {stopped[0]}; run the sweep again to resume")
    return failed
