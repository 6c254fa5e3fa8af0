"""Reading a committed checkpoint's model tensors on one process, in bounded memory.

Shared by ``checkpoints_tools`` (inspect, consolidate, convert) and ``modmoe export``: the DCP
index is read only after its checksum matched the manifest, and then only through the
allowlisted unpickler of :mod:`modmoe.checkpoint.safe_read`; tensors are loaded in groups of
bounded size into preallocated CPU tensors (DCP reassembles each from however many ranks'
shards wrote it), so peak memory is about one group, never the checkpoint twice.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from modmoe.checkpoint.errors import CheckpointError, iter_causes
from modmoe.checkpoint.manifest import DCP_METADATA, LAYOUT_MEGATRON, Manifest, read_manifest, verify_files
from modmoe.checkpoint.safe_read import SafeFileSystemReader, weights_only_loads

T = TypeVar("T")


def read_dcp_metadata(ckpt_dir: Path) -> tuple[Manifest, Metadata]:
    """Manifest and DCP ``Metadata`` of ``ckpt_dir``. ``.metadata`` is a pickle, so it is
    unpickled only after its size and sha256 matched the manifest (raises ``CheckpointError``)."""
    manifest = read_manifest(ckpt_dir)
    verify_files(ckpt_dir, manifest, [DCP_METADATA])
    return manifest, index_reader(ckpt_dir, manifest).read_metadata()


def index_reader(ckpt_dir: Path, manifest: Manifest) -> SafeFileSystemReader:
    """The DCP storage reader of a checkpoint: its index is unpickled through the allowlist and
    checked against the manifest's files before DCP follows it."""
    files = {e.path: e.size for e in manifest.files}
    return SafeFileSystemReader(ckpt_dir, files, allow_bytes=manifest.layout == LAYOUT_MEGATRON)


ITEM_READ_ERRORS = (
    RuntimeError,
    ValueError,
    EOFError,
    AssertionError,
    KeyError,
    IndexError,
    zipfile.BadZipFile,
    OSError,
)


def checkpoint_fault(err: BaseException, path: Path) -> CheckpointError | None:
    """The checkpoint's fault inside a failed read (DCP and Megatron wrap each rank's
    exception): a refused index, or a pickle the weights-only loader refused; None when it is
    something else (a bug)."""
    causes = list(iter_causes(err))
    for cause in causes:
        if isinstance(cause, CheckpointError):
            return cause
        if isinstance(cause, pickle.UnpicklingError):
            named = re.search(r"GLOBAL ([\w.]+)", str(cause))
            what = f"names the global {named.group(1)}" if named else str(cause).strip().splitlines()[-1][:300]
            return CheckpointError(f"refusing to load {path}: an item {what}, which weights-only loading refuses")
    # What DCP raises while reading a validated checkpoint's items is the items' fault: a torn
    # torch.save archive, a size that does not match, a missing key.
    if any(isinstance(c, CheckpointException) for c in causes):
        for cause in causes:
            if isinstance(cause, ITEM_READ_ERRORS):
                first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
                return CheckpointError(
                    f"refusing to load {path}: an item cannot be read ({type(cause).__name__}: {first})"
                )
    return None


def safe_dcp_load(
    state: dict, ckpt_dir: Path, manifest: Manifest | None = None, process_group=None, no_dist: bool = True
) -> None:
    """``dcp.load`` of ``state`` from ``ckpt_dir`` through :func:`index_reader`, with every
    ``torch.load`` weights-only; a refusal becomes one :class:`CheckpointError` line."""
    manifest = manifest if manifest is not None else read_manifest(ckpt_dir)
    reader = index_reader(Path(ckpt_dir), manifest)
    reader.read_metadata()  # refusals of the index here, in our words (DCP would restate them)
    try:
        with weights_only_loads():
            dcp.load(
                state,
                storage_reader=reader,
                process_group=process_group,
                no_dist=no_dist,
            )
    except (CheckpointException, CheckpointError, pickle.UnpicklingError) as err:
        if (found := checkpoint_fault(err, Path(ckpt_dir))) is None:
            raise
        raise found from None


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
    manifest = read_manifest(ckpt_dir)
    for group in pack_by_bytes(specs, lambda s: s.nbytes, group_bytes):
        buffers = {s.fqn: torch.empty(s.shape, dtype=s.dtype) for s in group}
        safe_dcp_load(buffers, ckpt_dir, manifest)
        yield {s.name: buffers[s.fqn] for s in group}
