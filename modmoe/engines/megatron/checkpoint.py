"""Megatron dist checkpoints of a run, and export of one to the native model's tensors.

A checkpoint is ``RUN_DIR/<checkpoint.dirname>/step_XXXXXXXX/``: ``megatron.core.dist_checkpointing``
(``torch_dist`` format) holds the model (``model.*``, from the unwrapped ``GPTModel``, so the
keys do not depend on DDP/bf16 wrappers) and the Megatron optimizer (``optimizer.*``, in the
``fully_reshardable`` format), so a run resumes under another TP/PP/EP/DP layout. With
DeepSpeed, the optimizer's ZeRO partitions go to ``deepspeed/`` inside the step directory
(DeepSpeed's own format: same DP size to resume).

Rank 0 seals the directory last with the same ``manifest.json`` as a native checkpoint (every
file's size and SHA-256; layout ``megatron``; ``meta`` holds the step, sampler position and
config). A directory without it is an interrupted save; one that fails its checksums is
damaged: ``--resume auto`` skips both with a warning, and ``checkpoints_tools validate`` and
``modmoe export`` read Megatron checkpoints like native ones.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch import Tensor, nn

from modmoe.checkpoint import find_latest_valid, validate
from modmoe.checkpoint.manifest import (
    LAYOUT_MEGATRON,
    MANIFEST_NAME,
    CheckpointError,
    build_manifest,
    read_manifest,
    step_dirname,
    write_manifest,
)
from modmoe.config_base import ConfigError
from modmoe.engines.megatron.config import MegatronConfig
from modmoe.engines.megatron.convert import megatron_to_native
from modmoe.model.config import ModelConfig
from modmoe.parallel.config import ParallelConfig

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(root: Path, step: int) -> Path:
    return root / step_dirname(step)


def latest_valid_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that validates (each newer one that does not is
    skipped with a warning), refused in one line when the native engine wrote it."""
    path = find_latest_valid(root)
    if path is not None:
        read_meta(path)
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """The step and the trainer's metadata of a sealed Megatron checkpoint; a native one, or an
    unreadable manifest, is refused in one line."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint error: {err}") from None
    if manifest.layout != LAYOUT_MEGATRON:
        raise ConfigError(
            f"checkpoint error: {path} was written by the native engine (manifest layout "
            f"{manifest.layout!r}); resume it with engine: native"
        )
    return {"step": manifest.step, **manifest.meta}


def _apply_retention(root: Path, newest: Path, keep_last: int) -> None:
    """Deletes all but the ``keep_last`` newest sealed checkpoints, and every unsealed (interrupted)
    save older than ``newest``, which no resume would take."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    sealed = [p for p in steps if (p / MANIFEST_NAME).is_file()]
    doomed = [p for p in steps if p < newest and not (p / MANIFEST_NAME).is_file()]
    if keep_last:
        doomed += sealed[:-keep_last]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded(model: nn.Module, optimizer, is_loading: bool) -> dict[str, Any]:
    sd: dict[str, Any] = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading, metadata=OPTIM_METADATA)
    return sd


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer,
    meta: dict[str, Any],
    keep_last: int = 0,
    also_save: Callable[[Path], None] | None = None,
) -> Path:
    """model: the unwrapped GPTModel of this rank's stage; optimizer: a MegatronOptimizer or
    None (DeepSpeed saves its own, in ``also_save(path)``, before the seal). Every rank calls it."""
    path = step_dir(root, step)
    if dist.get_rank() == 0:
        if path.exists():  # an interrupted save of the same step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded(model, optimizer, is_loading=False), str(path))
    if also_save is not None:
        also_save(path)
    _barrier()
    if dist.get_rank() == 0:
        manifest = build_manifest(
            path,
            step=step,
            world_size=dist.get_world_size(),
            meta=meta,
            model_prefix=None,
            created=time.time(),
            layout=LAYOUT_MEGATRON,
        )
        write_manifest(path, manifest)  # last: seals the checkpoint
        _apply_retention(root, path, keep_last)
    _barrier()
    return path


def _check_before_reading(path: Path) -> None:
    """Rank 0 checks every file's size and checksum (the files hold pickles) before any rank
    reads them; every rank raises the same one-line error."""
    problems = validate(path) if not dist.is_initialized() or dist.get_rank() == 0 else []
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problems]
        dist.broadcast_object_list(box, src=0)
        problems = box[0]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(f"checkpoint error: refusing to load {path}: {problems[0]}{more}")


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict[str, Any]:
    """Loads into ``model`` (and ``optimizer`` unless None) whatever layout wrote ``path``."""
    _check_before_reading(path)
    meta = read_meta(path)
    loaded = dist_checkpointing.load(_sharded(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return meta


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A 1-rank process group and Megatron parallel state (TP = PP = 1), torn down after; an
    existing single-process state is reused as it is."""
    if parallel_state.model_parallel_is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                "export: Megatron's parallel state spans several ranks (run the export in its own process)"
            )
        yield
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("export: runs in a single process")
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def megatron_checkpoint_to_native(path: str | Path, model_cfg: ModelConfig, check: bool = True) -> dict[str, Tensor]:
    """The native ``MoDETransformer`` state dict of a Megatron dist checkpoint written under any
    layout (TE or local layers), read on CPU in this process with Megatron's local layers."""
    from modmoe.engines.megatron.cpu_emulation import megatron_on_cpu
    from modmoe.engines.megatron.spec import build_gpt_model
    from modmoe.engines.megatron.translate import build_transformer_config, translate

    path = Path(path)
    if check:  # skipped by a caller that just validated it
        _check_before_reading(path)
    read_meta(path)  # a native checkpoint is refused here
    # Only the module structure matters here, not how a balance loss would count loads.
    engine = MegatronConfig(dispatcher="allgather", transformer_impl="local", aux_loss_with_expert_bias="megatron")
    plan = translate(model_cfg, ParallelConfig(), engine, world_size=1, seq_len=model_cfg.max_seq_len, precision="fp32")
    with single_process_megatron(), megatron_on_cpu():
        tconfig = build_transformer_config(plan, use_cpu_initialization=True, perform_initialization=False)
        model = build_gpt_model(plan, tconfig)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(loaded["model"])
        state = {
            k: v.detach().float() if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
    return megatron_to_native(state, model_cfg)


__all__ = [
    "latest_valid_checkpoint",
    "load_checkpoint",
    "megatron_checkpoint_to_native",
    "read_meta",
    "save_checkpoint",
    "step_dir",
]
