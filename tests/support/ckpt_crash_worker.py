"""Toy training run that checkpoints every few steps; the crash test SIGKILLs it at random.

    python tests/ckpt_crash_worker.py run RUN_DIR STEPS [--async]   one run (resumes if it can)
    python tests/ckpt_crash_worker.py serve                         fork server (see below)

``serve`` imports torch once, then for each stdin line ``RUN_DIR STEPS ASYNC(0|1) SAVE_EVERY`` forks a
child that does one run and prints ``CHILD <pid>``; once the child ends (or is killed) it prints
``EXIT <pid> <status>``. Forking a process that has imported but never run torch is safe and
saves the ~3 s start-up per trial. Run lines: ``READY <leftovers>``, ``RESUMED <step>`` or
``FRESH``, ``SAVE-BEGIN <step>``, ``SAVE-END <step>``, ``DONE``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ckpt_toy as toy
import torch
from safetensors.torch import save_file
from torch import nn

from modmoe.checkpoint import CheckpointConfig, CheckpointManager

SAVE_EVERY = 4


class PaddedToy(toy.ToyMoE):
    """The toy plus a 2 MiB parameter, so that saves take long enough to be hit by a kill."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.Parameter(torch.randn(512, 1024) * 0.01)  # (512, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, D)
        return super().forward(x) + 1e-3 * self.pad.mean()


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def run(run_dir: Path, steps: int, async_save: bool, save_every: int = SAVE_EVERY) -> None:
    torch.set_num_threads(1)
    model, opt, sched = toy.build(seed=0, model_cls=PaddedToy)
    sampler = toy.ToySampler()
    mgr = CheckpointManager(run_dir, CheckpointConfig(interval_steps=save_every, keep_last=2, async_save=async_save))
    say(f"READY {sum(p.name.startswith('.tmp-') for p in run_dir.iterdir())}")
    state = toy.app_state(model, opt, sched)
    step = 0
    latest = mgr.find_latest_valid()
    if latest is not None:
        meta = mgr.load(latest, state)
        sampler.load_state_dict(meta["toy_sampler"])
        step = meta["step"]
        say(f"RESUMED {step}")
    else:
        say("FRESH")
    while step < steps:
        toy.train_step(model, opt, sched, sampler)
        step += 1
        time.sleep(0.003)
        if mgr.should_save(step):
            say(f"SAVE-BEGIN {step}")
            mgr.save(step, state, {"step": step, "toy_sampler": sampler.state_dict()})
            say(f"SAVE-END {step}")
    mgr.close()
    save_file(toy.plain_state(model), run_dir / "final.safetensors")
    say("DONE")


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            break
        run_dir, steps, async_save, save_every = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(Path(run_dir), int(steps), async_save == "1", int(save_every))
            except BaseException as err:  # report and exit without running the server's code
                say(f"ERROR {err!r}")
                code = 1
            os._exit(code)
        say(f"CHILD {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"EXIT {pid} {status}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        run(Path(sys.argv[2]), int(sys.argv[3]), "--async" in sys.argv[4:])
