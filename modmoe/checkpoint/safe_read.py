"""Reading checkpoint bytes without running code from them.

A checkpoint is data someone else may have written (a shared filesystem, a downloaded run), and
its manifest only proves that the files are the ones its writer listed, not that the writer was
friendly. Two of its file kinds are pickles, which can name any Python callable:

- DCP's index ``.metadata``. It is unpickled here by :class:`RestrictedUnpickler`, which
  resolves only the classes DCP's metadata is made of (:data:`DCP_METADATA_GLOBALS`): inert
  dataclasses, enums, ``torch.Size``, dtypes. Anything else is refused before it is looked up.
  The result is then checked for shape (:func:`metadata_problems`): every storage range lies in
  a file the manifest lists, inside its size, without overlapping another, with no storage
  transform, and each tensor chunk fits its tensor, so no hostile index can make a reader open
  another file or allocate more than the checkpoint holds.
- ``torch.save`` files (DCP's tensor items, Megatron's ``common.pt`` and non-tensor items,
  DeepSpeed's partitions). They are read by torch's ``weights_only`` unpickler; inside
  :func:`weights_only_loads` that holds even for libraries that ask ``torch.load`` for
  ``weights_only=False`` (DCP's non-tensor items, DeepSpeed's ``load_checkpoint``), through
  torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch.

:class:`SafeFileSystemReader` is the ``storage_reader`` every DCP load in modmoe passes, so no
reader ever calls plain ``pickle`` on checkpoint bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import pickle
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.serialization import get_unsafe_globals_in_checkpoint

from modmoe.checkpoint.errors import CheckpointError

DCP_METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint"
_DTYPES = sorted(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))
DCP_METADATA_GLOBALS: frozenset[str] = frozenset(
    [
        *(
            f"{_DCP}.metadata.{name}"
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        f"{_DCP}.filesystem._StorageInfo",
        # Megatron's dist_checkpointing also stores the save plans in the index.
        *(f"{_DCP}.planner.{name}" for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        "torch.Size",
        "torch.serialization._get_layout",  # layout objects by name: torch.strided
        "pathlib.PosixPath",  # StorageMeta.checkpoint_id
        "pathlib.PurePosixPath",
        *(f"torch.{name}" for name in _DTYPES),
    ]
)
"""Every global a DCP ``.metadata`` pickle written by torch 2.13 (native engine) or Megatron-Core
0.16's ``torch_dist`` format names: data classes and enums whose construction runs no code of
consequence."""


DEEPSPEED_RECORD_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The classes DeepSpeed's ZeRO optimizer files pickle besides torch's safe types: plain
records (loss-scaler fields, the stage number, fragment offsets)."""

MEGATRON_ITEM_GLOBALS: tuple[str, ...] = ("_io.BytesIO",)
"""What Megatron's non-tensor items may hold besides torch's safe types: Transformer Engine
keeps a layer's extra state as a byte buffer."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file would need code outside the allowlist to be read; one line."""


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``allowed``; any other name is refused before it is looked
    up (``find_class`` is also what the extension-registry opcodes go through)."""

    def __init__(self, file, allowed: frozenset[str] = DCP_METADATA_GLOBALS) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self.allowed:
            raise UnsafeCheckpointError(
                f"names the global {qualified}, which DCP metadata never uses (refused without unpickling it; "
                "see docs/security.md)"
            )
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("uses a pickle persistent id, which DCP metadata never does")


def unpickle_metadata(path: Path) -> Metadata:
    """DCP ``Metadata`` from ``path`` through :class:`RestrictedUnpickler`; raises
    :class:`UnsafeCheckpointError` for anything else (one line, without the path: callers name
    the file as they show it)."""
    try:
        with open(path, "rb") as f:
            md = RestrictedUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except RecursionError:
        raise UnsafeCheckpointError("is not a readable DCP index (nested too deeply)") from None
    except Exception as err:  # noqa: BLE001 (a malformed pickle fails in many ways; none runs code here)
        raise UnsafeCheckpointError(f"is not a readable DCP index ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"holds a {type(md).__name__}, not DCP Metadata")
    return md


# ---------------------------------------------------------------------------- shape checks
def _is_size(value: Any, ndim: int | None = None) -> bool:
    return (
        isinstance(value, torch.Size)
        and (ndim is None or len(value) == ndim)
        and all(isinstance(v, int) and v >= 0 for v in value)
    )


def _tensor_problem(fqn: str, tm: TensorStorageMetadata) -> str | None:
    props = tm.properties
    if not isinstance(props, TensorProperties) or not isinstance(getattr(props, "dtype", None), torch.dtype):
        return f"tensor {fqn!r} has no valid dtype"
    if not _is_size(tm.size) or not isinstance(tm.chunks, list):
        return f"tensor {fqn!r} has a malformed size or chunk list"
    for chunk in tm.chunks:
        if not isinstance(chunk, ChunkStorageMetadata):
            return f"tensor {fqn!r} has a malformed chunk"
        if not (_is_size(chunk.offsets, len(tm.size)) and _is_size(chunk.sizes, len(tm.size))):
            return f"tensor {fqn!r} has a chunk of another rank than the tensor"
        if any(o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, tm.size, strict=True)):
            return f"tensor {fqn!r} has a chunk outside its size {list(tm.size)}"
    return None


def metadata_problems(md: Metadata, files: dict[str, int], allow_bytes: bool) -> list[str]:
    """What makes a DCP index unsafe to follow, one line each (empty: none).

    ``files``: the manifest's files and their sizes; ``allow_bytes``: whether non-tensor
    (pickled) items may appear (Megatron's layout has them; modmoe's native one never does)."""
    problems: list[str] = []
    entries = getattr(md, "state_dict_metadata", None)
    storage = getattr(md, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return ["the DCP index lacks its state_dict_metadata or storage_data mapping"]
    for fqn, item in entries.items():
        if not isinstance(fqn, str):
            problems.append(f"the DCP index has a key of type {type(fqn).__name__}")
        elif isinstance(item, TensorStorageMetadata):
            if (why := _tensor_problem(fqn, item)) is not None:
                problems.append(why)
        elif isinstance(item, BytesStorageMetadata):
            if not allow_bytes:
                problems.append(
                    f"item {fqn!r} is a pickled Python object; modmoe's native checkpoints hold tensors only"
                )
        else:
            problems.append(f"item {fqn!r} has an unknown kind {type(item).__name__}")
    ranges: dict[str, list[tuple[int, int]]] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            problems.append("the DCP index has a malformed storage entry")
            continue
        where = f"storage of {index.fqn!r}"
        path, offset, length = info.relative_path, info.offset, info.length
        if not isinstance(path, str) or path not in files:
            problems.append(f"{where} points at {path!r}, which the manifest does not list")
            continue
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            problems.append(f"{where} has a malformed byte range")
        elif offset + length > files[path]:
            problems.append(f"{where} reads bytes {offset}..{offset + length} of {path!r}, which has {files[path]}")
        else:
            ranges.setdefault(path, []).append((offset, length))
        if info.transform_descriptors:
            problems.append(f"{where} needs storage transforms {list(info.transform_descriptors)!r}; modmoe reads none")
    for path, spans in ranges.items():
        spans.sort()
        for (a_off, a_len), (b_off, _) in zip(spans, spans[1:], strict=False):
            if a_off + a_len > b_off:
                problems.append(f"two storage ranges overlap in {path!r} (at byte {b_off})")
                break
    problems += _coverage_problems(entries, storage)
    return problems


def _coverage_problems(entries: dict, storage: dict) -> list[str]:
    """Every tensor chunk must have its stored bytes (at least its raw size), and the chunks
    must cover the tensor: then what a reader allocates is bounded by the checkpoint's size."""
    problems: list[str] = []
    for fqn, tm in entries.items():
        if not isinstance(fqn, str) or not isinstance(tm, TensorStorageMetadata) or _tensor_problem(fqn, tm):
            continue
        itemsize, covered = tm.properties.dtype.itemsize, 0
        for chunk in {tuple(c.offsets): c for c in tm.chunks}.values():
            numel = math.prod(chunk.sizes)
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if not isinstance(info, _StorageInfo) or not isinstance(info.length, int):
                problems.append(f"tensor {fqn!r} has a chunk at {list(chunk.offsets)} with no storage entry")
                break
            if info.length < numel * itemsize:
                problems.append(f"tensor {fqn!r}: a chunk of {numel * itemsize} bytes is stored in {info.length}")
                break
            covered += numel
        else:
            if covered < math.prod(tm.size):
                problems.append(f"tensor {fqn!r}: its chunks hold {covered} of {math.prod(tm.size)} elements")
    return problems


# ---------------------------------------------------------------------------- pickled items
def item_bytes(root: Path, md: Metadata, fqn_kind: type) -> Iterator[tuple[str, str, bytes]]:
    """(key, file, bytes) of every storage item whose entry is of ``fqn_kind``; call it only
    after :func:`metadata_problems` found nothing (ranges are then inside listed files)."""
    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata.get(index.fqn), fqn_kind):
            with open(root / info.relative_path, "rb") as f:
                f.seek(info.offset)
                yield index.fqn, info.relative_path, f.read(info.length)


def torch_save_problem(source: str, data: bytes | Path, allowed: Iterable[str] = ()) -> str | None:
    """Why ``torch.load(weights_only=True)`` would refuse ``data`` (a ``torch.save`` file), listing
    the globals it names without unpickling it; ``allowed`` adds names to torch's safe set."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        unsafe = sorted(set(get_unsafe_globals_in_checkpoint(stream)) - set(allowed))
    except Exception as err:  # noqa: BLE001 (any parse failure: the item is unusable)
        return f"{source}: not a readable torch.save file ({type(err).__name__}: {str(err)[:200]})"
    if unsafe:
        return f"{source}: names the global {unsafe[0]}, which weights-only loading refuses"
    return None


# ---------------------------------------------------------------------------- loading
_force_lock = threading.Lock()
_force_depth = 0
_saved_env: dict[str, str | None] = {}
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads(extra_safe_globals: Iterable[Any] = ()) -> Iterator[None]:
    """Inside: every ``torch.load`` in the process is weights-only, whatever its caller asked
    (torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at each call), with ``extra_safe_globals``
    (classes) allowed besides torch's own. Re-entrant and safe to nest."""
    global _force_depth
    with _force_lock:
        if _force_depth == 0:
            _saved_env.update({key: os.environ.get(key) for key in (_FORCE, _FORCE_NO)})
            os.environ[_FORCE] = "1"
            os.environ.pop(_FORCE_NO, None)  # both set is an error in torch
        _force_depth += 1
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            yield
    finally:
        with _force_lock:
            _force_depth -= 1
            if _force_depth == 0:
                for key, value in _saved_env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with the index unpickled through :class:`RestrictedUnpickler`
    and checked by :func:`metadata_problems` against the manifest's ``files`` (path -> size).
    The checked index is kept, so repeated reads (Megatron asks twice) parse it once."""

    def __init__(self, path: str | os.PathLike, files: dict[str, int], allow_bytes: bool = False) -> None:
        super().__init__(path)
        self._files, self._allow_bytes = files, allow_bytes
        self._checked: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpointError(f"{self.path}: per-rank DCP indexes are not read by modmoe")
        if self._checked is None:
            where = Path(self.path) / DCP_METADATA
            try:
                md = unpickle_metadata(where)
            except UnsafeCheckpointError as err:
                raise UnsafeCheckpointError(f"refusing to load {where}: it {err}") from None
            problems = metadata_problems(md, self._files, self._allow_bytes)
            if problems:
                raise UnsafeCheckpointError(f"refusing to load {where}: {problems[0]}")
            self._checked = md
        md = self._checked
        if getattr(md, "storage_meta", None) is None:  # what DCP's own reader does on every read
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
