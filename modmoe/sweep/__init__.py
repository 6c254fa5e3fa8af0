"""``modmoe sweep``: a grid of training runs at fixed training-FLOP budgets (isoFLOP studies),
then further seeds of each variant's best point, run locally or as a Slurm job array, with the
findings (best size per variant and budget, seed spread, equal-time tables) and one isoFLOP plot
at the end."""

from modmoe.sweep.points import Point, SweepError, expand, state
from modmoe.sweep.report import write_report
from modmoe.sweep.runner import run_local, run_point
from modmoe.sweep.seeds import Plan, make_plan
from modmoe.sweep.slurm import submit_sweep
from modmoe.sweep.spec import SweepSpec, load_spec

__all__ = [
    "Plan",
    "Point",
    "SweepError",
    "SweepSpec",
    "expand",
    "load_spec",
    "make_plan",
    "run_local",
    "run_point",
    "state",
    "submit_sweep",
    "write_report",
]
