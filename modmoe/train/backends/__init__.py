"""The Trainer's backends (see :mod:`.base`); each module imports its heavy dependencies
(DeepSpeed, Megatron-Core) only when its backend is built."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modmoe.parallel.distributed import DistEnv
    from modmoe.train.backends.base import Backend
    from modmoe.train.resolve import ResolvedJob


def build_backend(job: ResolvedJob, env: DistEnv) -> Backend:
    if job.backend == "megatron":
        from modmoe.train.backends.megatron import MegatronBackend

        return MegatronBackend(job, env)
    if job.backend == "deepspeed":
        from modmoe.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(job, env)
    from modmoe.train.backends.native import NativeBackend

    return NativeBackend(job, env)
