"""``modmoe sweep``: a grid of training runs at fixed training-FLOP budgets (isoFLOP studies),
run locally or as a Slurm job array, with one table and one isoFLOP plot at the end."""

from modmoe.sweep.points import Point, SweepError, expand, state
from modmoe.sweep.report import write_report
from modmoe.sweep.runner import run_local, run_point
from modmoe.sweep.slurm import submit_sweep
from modmoe.sweep.spec import SweepSpec, load_spec

__all__ = [
    "Point",
    "SweepError",
    "SweepSpec",
    "expand",
    "load_spec",
    "run_local",
    "run_point",
    "state",
    "submit_sweep",
    "write_report",
]
