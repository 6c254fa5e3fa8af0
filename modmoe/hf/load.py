"""Fill a native model, plain or parallelized, with a pretrained checkpoint's weights.

Runs after the parallelize step: a parameter that TP, EP or FSDP2 made a DTensor is filled with
the slice this rank holds (its global offset and local shape come from the DTensor's mesh and
placements), read straight from the safetensors memory maps, so no rank reads or holds the
whole checkpoint. Parameters the checkpoint does not make (depth routers) keep their
initialisation, which is the same on every rank (the model is built from the same seed before
it is sharded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from modmoe.hf.checkpoint import PretrainedReader, reader_for
from modmoe.model import MoDETransformer
from modmoe.model_config import ModelConfig

log = logging.getLogger(__name__)

# Wrapper names that may appear inside parameter names (compile, activation checkpointing, DDP).
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def native_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@dataclass
class LoadReport:
    loaded: int = 0  # parameters (or local slices of them) filled from the checkpoint
    kept: list[str] = field(default_factory=list)  # parameters not in the checkpoint (new routers)
    bytes_read: int = 0


def _local_target(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The tensor to write (the rank's shard for a DTensor) and the global slice it holds."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return param, tuple(slice(0, n) for n in param.shape)


@torch.no_grad()
def load_pretrained(model: nn.Module, reader: PretrainedReader) -> LoadReport:
    """Copies every parameter the checkpoint makes into ``model`` (cast to the parameter's dtype)."""
    report = LoadReport()
    for name, param in model.named_parameters():
        native = native_name(name)
        if native not in reader.shapes:
            raise KeyError(f"{native}: not a parameter of the model the checkpoint was read for")
        target, index = _local_target(param)
        if target.numel() == 0:
            continue
        value = reader.read(native, index)
        if value is None:
            report.kept.append(native)
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(f"{native}: read {list(value.shape)} for a local slice of {list(target.shape)}")
        target.copy_(value)
        report.loaded += 1
        report.bytes_read += value.numel() * value.element_size()
    log.info(
        "pretrained weights: %d tensors (%.1f MiB read); kept their initialisation: %s",
        report.loaded,
        report.bytes_read / 2**20,
        ", ".join(report.kept) or "none",
    )
    return report


def pretrained_model(model: ModelConfig, seed: int = 0) -> MoDETransformer:
    """``model.from_hf`` as one plain :class:`MoDETransformer` on the CPU, its weights loaded (for
    tools and tests; training loads into the parallelized model instead)."""
    torch.manual_seed(seed)
    module = MoDETransformer(model.to_args())
    load_pretrained(module, reader_for(model, seed))
    return module
