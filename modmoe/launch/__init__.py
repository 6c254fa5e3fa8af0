"""Launching training on Slurm: ``modmoe submit`` renders ``launch/train.sbatch`` and submits it."""

from modmoe.launch.submit import SubmitResult, submit

__all__ = ["SubmitResult", "submit"]
