"""Stop requests of a training job, shared by both engines' trainers.

A job is asked to stop by SIGUSR1 (Slurm's warning before the time limit, see
``launch/train.sbatch``), SIGTERM (preemption), or a ``STOP`` file in the run directory. Any
rank may see the request; all ranks agree on it with one all-reduce, so they checkpoint and
exit at the same step.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from modmoe.parallel.distributed import all_reduce_sum

STOP_FILE, COMPLETED_FILE = "STOP", "COMPLETED"


class StopRequests:
    def __init__(self, run_dir: Path, is_main: bool, device: torch.device) -> None:
        self.run_dir, self.is_main, self.device = Path(run_dir), is_main, device
        self.signalled = False

    def clear_stale(self) -> None:
        """Removes a STOP file left by a previous job (rank 0)."""
        if self.is_main:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)

    def install_signal_handlers(self) -> None:
        def request_stop(_signum, _frame):
            self.signalled = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def requested(self) -> bool:
        """True on every rank when any rank got a signal or rank 0 sees the STOP file."""
        local = self.signalled or (self.is_main and (self.run_dir / STOP_FILE).exists())
        flag = all_reduce_sum(torch.tensor([float(local)], device=self.device))  # all ranks, TP peers too
        return bool(flag.item() > 0)


def open_run_dir(cfg, is_main: bool, device: torch.device) -> StopRequests:
    """Creates the run directory with the resolved ``config.yaml`` (rank 0) and returns the
    job's stop requests, with a STOP file left by a previous job removed."""
    from modmoe.config import dump_config  # modmoe.config imports every section's config

    run_dir = Path(cfg.trainer.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    stop = StopRequests(run_dir, is_main, device)
    stop.clear_stale()
    return stop
