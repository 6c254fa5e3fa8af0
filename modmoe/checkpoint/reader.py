"""Reading a committed checkpoint's model tensors on one process, in bounded memory.

Shared by ``checkpoints_tools`` (inspect, consolidate) and ``modmoe export``: the DCP index is
unpickled only after its checksum matched the manifest, and tensors are loaded in groups of
bounded size into preallocated CPU tensors (DCP reassembles each from however many ranks'
shards wrote it), so peak memory is about one group, never the checkpoint twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from modmoe.checkpoint.manifest import DCP_METADATA, Manifest, read_manifest, verify_files

T = TypeVar("T")


def read_dcp_metadata(ckpt_dir: Path) -> tuple[Manifest, Metadata]:
    """Manifest and DCP ``Metadata`` of ``ckpt_dir``. ``.metadata`` is a pickle, so it is
    unpickled only after its size and sha256 matched the manifest (raises ``CheckpointError``)."""
    manifest = read_manifest(ckpt_dir)
    verify_files(ckpt_dir, manifest, [DCP_METADATA])
    return manifest, FileSystemReader(ckpt_dir).read_metadata()


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the model's parameter or buffer name
    fqn: str  # key in the checkpoint (name with the state prefix)
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def model_tensors(md: Metadata, prefix: str) -> list[TensorSpec]:
    """The tensors under ``prefix`` (e.g. ``train.model.``), in checkpoint key order."""
    return [
        TensorSpec(fqn[len(prefix) :], fqn, tm.properties.dtype, tuple(tm.size))
        for fqn, tm in md.state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(tm, TensorStorageMetadata)
    ]


def pack_by_bytes(items: list[T], nbytes: Callable[[T], int], budget: int) -> list[list[T]]:
    """Consecutive groups of at most ``budget`` bytes; an item larger than that comes alone."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if groups[-1] and size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return [g for g in groups if g]


def load_tensor_groups(ckpt_dir: Path, specs: list[TensorSpec], group_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yields ``{name: tensor}`` for ``specs`` in order, one bounded group at a time."""
    for group in pack_by_bytes(specs, lambda s: s.nbytes, group_bytes):
        buffers = {s.fqn: torch.empty(s.shape, dtype=s.dtype) for s in group}
        dcp.load(buffers, checkpoint_id=ckpt_dir, no_dist=True)
        yield {s.name: buffers[s.fqn] for s in group}
