"""Megatron dist checkpoints of a run, and export of one to the native model's tensors.

A checkpoint is ``RUN_DIR/<checkpoint.dirname>/step_XXXXXXXX/``: ``megatron.core.dist_checkpointing``
(``torch_dist`` format) holds the model (``model.*``, from the unwrapped ``GPTModel``, so the
keys do not depend on DDP/bf16 wrappers) and the Megatron optimizer (``optimizer.*``, in the
``fully_reshardable`` format), so a run resumes under another TP/PP/EP/DP layout. With
DeepSpeed, the optimizer's ZeRO partitions go to ``deepspeed/`` inside the step directory
(DeepSpeed's own format: same DP size to resume).

:class:`MegatronStateIO` is how the Trainer's checkpoint manager writes and reads that state:
the manager writes it into a temporary directory, seals it with the same ``manifest.json`` as a
native checkpoint (every file's size and SHA-256; layout ``megatron``; ``meta`` holds the step,
sampler position and config) and renames it into place, so an interrupted save is never
visible and a damaged one is skipped by ``--resume auto``; ``checkpoints_tools validate`` and
``modmoe export`` read Megatron checkpoints like native ones.

Reading runs inside :func:`safe_reads`: Megatron's DCP reader is replaced by modmoe's (index
unpickled through the allowlist and checked against the manifest), and every ``torch.load``
(its ``common.pt``, its non-tensor items, DeepSpeed's partitions) is weights-only, with only
DeepSpeed's plain record classes added (modmoe/checkpoint/safe_read.py).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch import Tensor, nn

from modmoe.checkpoint import validate
from modmoe.checkpoint.manifest import (
    LAYOUT_MEGATRON,
    CheckpointError,
    read_manifest,
)
from modmoe.checkpoint.reader import checkpoint_fault, index_reader
from modmoe.checkpoint.safe_read import DEEPSPEED_RECORD_GLOBALS, weights_only_loads
from modmoe.config_base import ConfigError
from modmoe.engines.megatron.config import MegatronConfig
from modmoe.engines.megatron.convert import megatron_to_native
from modmoe.model_config import ModelConfig
from modmoe.parallel.config import ParallelConfig

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's ZeRO partitions inside a step directory


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


def _sharded(model: nn.Module, optimizer, is_loading: bool) -> dict[str, Any]:
    sd: dict[str, Any] = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading, metadata=OPTIM_METADATA)
    return sd


def _deepspeed_record_classes() -> list[type]:
    classes = []
    for qualified in DEEPSPEED_RECORD_GLOBALS:
        module, _, name = qualified.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


@contextlib.contextmanager
def safe_reads(path: Path, deepspeed: bool = False) -> Iterator[None]:
    """Megatron (and DeepSpeed) read checkpoint ``path`` inside: through modmoe's checked DCP
    reader and weights-only ``torch.load``; a refusal becomes one CheckpointError line. Megatron
    builds its reader in ``strategies.torch._get_filesystem_reader`` (megatron-core 0.16); if a
    release moves it, nothing is read rather than read unchecked."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    path = Path(path)
    manifest = read_manifest(path)
    original = getattr(mcore_torch, "_get_filesystem_reader", None)
    if original is None:
        raise CheckpointError(
            f"refusing to load {path}: this megatron-core has no strategies.torch._get_filesystem_reader, "
            "so modmoe cannot give it the checked reader (use megatron-core 0.16)"
        )

    def checked_reader(checkpoint_dir, cache_metadata: bool = False):
        if Path(checkpoint_dir).resolve() != path.resolve():
            raise CheckpointError(f"refusing to read {checkpoint_dir}: not the validated checkpoint {path}")
        reader = index_reader(path, manifest)
        reader.read_metadata()  # a refused index fails here, before Megatron's DCP call restates it
        return reader

    extra = [io.BytesIO, *(_deepspeed_record_classes() if deepspeed else [])]
    mcore_torch._get_filesystem_reader = checked_reader
    try:
        with weights_only_loads(extra):
            yield
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        if (fault := checkpoint_fault(err, path)) is None:
            raise
        raise fault from None
    finally:
        mcore_torch._get_filesystem_reader = original


class MegatronStateIO:
    """A Megatron ``GPTModel`` stage and its optimizer through ``dist_checkpointing`` (``torch_dist``
    format, which resumes under another TP/PP/EP/DP layout); with DeepSpeed, its ZeRO partitions
    in ``deepspeed/`` beside them. The checkpoint manager seals and commits the directory."""

    layout = LAYOUT_MEGATRON
    model_prefix = None
    can_save_async = False

    def __init__(
        self, model: nn.Module, optimizer=None, deepspeed=None, around=contextlib.nullcontext, ep: int = 1
    ) -> None:
        """``model``: the unwrapped GPTModel (keys do not depend on DDP/bf16 wrappers);
        ``optimizer``: a MegatronOptimizer, or None (DeepSpeed, or weights only); ``around``: a
        context every save and load runs in (e.g. pausing overlapped parameter gathers); ``ep``:
        this run's expert-parallel degree."""
        self.model, self.optimizer, self.deepspeed, self.around = model, optimizer, deepspeed, around
        self.ep = ep

    def _check_expert_optimizer(self, path: Path) -> None:
        """Megatron gives expert parameters an optimizer of their own only when ep > 1, and its
        checkpoint keeps that structure: switching expert parallelism on or off cannot resume
        the optimizer state (found on CPU: the load fails on a missing ``chained_0.`` key)."""
        if self.optimizer is None:
            return
        config = read_meta(path).get("config")
        parallel = config.get("parallel") if isinstance(config, dict) else None
        saved = parallel.get("ep", 1) if isinstance(parallel, dict) else 1
        if isinstance(saved, int) and (saved > 1) != (self.ep > 1):
            want = "> 1" if saved > 1 else "= 1"
            raise ConfigError(
                f"checkpoint error: {path} was written with parallel.ep = {saved}; Megatron keeps the experts' "
                f"optimizer state apart only when ep > 1, so it resumes with parallel.ep {want} "
                "(or export the weights: modmoe export)"
            )

    def save(self, path: Path, process_group, no_dist: bool, async_save: bool) -> None:
        with self.around():
            dist_checkpointing.save(_sharded(self.model, self.optimizer, is_loading=False), str(path))
            if self.deepspeed is not None:
                self.deepspeed.save_checkpoint(str(path / DEEPSPEED_DIR), tag="zero", save_latest=False)

    def load(self, path: Path, process_group, no_dist: bool) -> None:
        self._check_expert_optimizer(path)
        with self.around(), safe_reads(path, deepspeed=self.deepspeed is not None):
            loaded = dist_checkpointing.load(_sharded(self.model, self.optimizer, is_loading=True), str(path))
            self.model.load_state_dict(loaded["model"])
            if self.optimizer is not None:
                self.optimizer.load_state_dict(loaded["optimizer"])
            if self.deepspeed is not None:
                self.deepspeed.load_checkpoint(
                    str(path / DEEPSPEED_DIR),
                    tag="zero",
                    load_module_strict=False,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )


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
    with single_process_megatron(), megatron_on_cpu(), safe_reads(path):
        tconfig = build_transformer_config(plan, use_cpu_initialization=True, perform_initialization=False)
        model = build_gpt_model(plan, tconfig)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(loaded["model"])
        state = {
            k: v.detach().float() if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
    return megatron_to_native(state, model_cfg)


__all__ = ["MegatronStateIO", "megatron_checkpoint_to_native", "read_meta"]
