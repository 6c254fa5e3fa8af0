"""The Trainer's backends (see :mod:`.base`); each module imports its heavy dependencies
(DeepSpeed, Megatron-Core) only when its backend is built."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modmoe.parallel.distributed import DistEnv
    from modmoe.train.backends.base import Backend
    from modmoe.train.resolve import ResolvedJob


def build_backend(job: ResolvedJob, env: DistEnv, load_pretrained: bool = False) -> Backend:
    """``load_pretrained``: a fresh start of a ``model.from_hf`` job."""
    if job.backend == "megatron":
        from modmoe.train.backends.megatron import MegatronBackend

        return MegatronBackend(job, env, load_pretrained)
    if job.backend == "deepspeed":
        from modmoe.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(job, env, load_pretrained)
    from modmoe.train.backends.native import NativeBackend

    return NativeBackend(job, env, load_pretrained)
