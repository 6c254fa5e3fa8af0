"""The weights of a pretrained checkpoint, read through safetensors memory maps.

:class:`PretrainedCheckpoint` opens ``model.safetensors`` or the files a
``model.safetensors.index.json`` names, reading only headers until a tensor is asked for; then
only the bytes of the asked slice are read (safetensors' ``get_slice``). :class:`PretrainedReader`
puts the recipes of :mod:`modmoe.hf.names` on top: ``reader.read(native_name, index)`` gives a
native tensor, or any slice of it, in the checkpoint's dtype, which is what every layout needs
(a plain rank reads whole tensors, an FSDP2 / EP / TP rank its shard, and the Megatron engine can
ask for its own partition by native name). :meth:`PretrainedReader.check` compares every
tensor's name and shape with what the model needs before anything is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from modmoe.config_json import JSONInputError, read_json
from modmoe.errors import UserError
from modmoe.hf.config import read_pretrained
from modmoe.hf.families import Pretrained
from modmoe.hf.names import Experts, Generated, Source, Whole, expected_tensors, native_sources
from modmoe.model import MoDETransformer
from modmoe.model.args import ModelArgs
from modmoe.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20  # an index of ~100k tensors is a few MB

Index = tuple[slice, ...]


class PretrainedError(UserError, ValueError):
    """A pretrained checkpoint cannot be imported; one line naming the directory and the tensor."""


def _error(directory: Path, msg: str) -> PretrainedError:
    return PretrainedError(f"model.from_hf = {str(directory)!r}: {msg}")


def _read_index(directory: Path) -> dict[str, str]:
    path = directory / INDEX_FILE
    try:
        index = read_json(path, MAX_INDEX_BYTES, INDEX_FILE)
    except JSONInputError as err:
        raise _error(directory, str(err)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise _error(directory, f"{INDEX_FILE} has no weight_map")
    for name, file in weight_map.items():
        # A file name, nothing else: an index may not point outside the directory.
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise _error(directory, f"{INDEX_FILE}: tensor {name!r} is in {file!r}, not a .safetensors file here")
    return weight_map


class PretrainedCheckpoint:
    """A directory's safetensors weights: names, shapes and slices, opened lazily."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._handles: dict[str, Any] = {}  # file name -> open safetensors handle (memory-mapped)
        if (self.directory / INDEX_FILE).is_file():
            self.file_of = _read_index(self.directory)
        elif (self.directory / SINGLE_FILE).is_file():
            self.file_of = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}  # noqa: SIM118
        else:
            raise _error(self.directory, f"no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, file: str) -> Any:
        handles = self._handles
        if file not in handles:
            path = self.directory / file
            if not path.is_file():
                raise _error(self.directory, f"{file} does not exist")
            try:
                handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise _error(self.directory, f"{file} is not a readable safetensors file ({err})") from None
        return handles[file]

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def _slice(self, name: str) -> Any:
        if name not in self.file_of:
            raise _error(self.directory, f"the checkpoint has no tensor {name!r}")
        try:
            return self._open(self.file_of[name]).get_slice(name)
        except SafetensorError as err:
            raise _error(self.directory, f"tensor {name!r}: {err}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: Sequence[slice | int] = ()) -> torch.Tensor:
        """Tensor ``name`` (or ``name[index]``), only the asked bytes read from disk."""
        part = self._slice(name)
        return part[tuple(index)] if index else part[:]

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every needed tensor is present with the needed shape (headers only)."""
        for name, shape in expected.items():
            if name not in self.file_of:
                raise _error(self.directory, f"the checkpoint has no tensor {name!r}, which its config.json implies")
            found = self.shape(name)
            if found != tuple(shape):
                raise _error(
                    self.directory, f"tensor {name!r} has shape {list(found)}, its config.json implies {list(shape)}"
                )


def _full(shape: Sequence[int], index: Sequence[slice] | None) -> Index:
    """``index`` completed to one slice per dimension (None: everything)."""
    index = tuple(index or ())
    return index + tuple(slice(0, n) for n in shape[len(index) :])


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("pretrained reads take contiguous slices")
    return start, stop


@dataclass
class PretrainedReader:
    """Native tensors (or slices of them) of a model ``args`` read from ``checkpoint``."""

    checkpoint: PretrainedCheckpoint
    sources: dict[str, Source]
    shapes: dict[str, tuple[int, ...]]  # native name -> global shape

    @classmethod
    def open(cls, args: ModelArgs, pretrained: Pretrained, directory: str | Path, seed: int = 0) -> PretrainedReader:
        """The reader for a model ``args`` imported from ``directory``, whose ``config.json``
        says ``pretrained`` (upcycling when the model has experts the checkpoint has not)."""
        checkpoint = PretrainedCheckpoint(directory)
        upcycle = args.moe.enabled and not pretrained.model["moe"].get("enabled", False)
        sources = native_sources(args, pretrained.architecture, checkpoint.names, upcycle=upcycle, seed=seed)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in MoDETransformer(args).named_parameters()}
        return cls(checkpoint, sources, shapes)

    def check(self) -> None:
        self.checkpoint.check(expected_tensors(self.sources))

    def read(self, native: str, index: Sequence[slice] | None = None) -> torch.Tensor | None:
        """Native tensor ``native``, or its ``index`` slice (one contiguous slice per leading
        dimension); None when the checkpoint does not make it (a depth router keeps its init)."""
        source = self.sources.get(native)
        if source is None:
            return None
        index = _full(self.shapes[native], index)
        if isinstance(source, Whole):
            return self.checkpoint.read(source.name, index)
        if isinstance(source, Generated):
            return source.full()[index]
        return self._experts(source, self.shapes[native], index)

    def _experts(self, source: Experts, shape: tuple[int, ...], index: Index) -> torch.Tensor:
        """Stacked (E, A, B) experts: each expert's block read transposed, only the asked rows."""
        (e0, e1), (a0, a1), (b0, b1) = (_bounds(s, n) for s, n in zip(index, shape, strict=True))
        parts = []
        for block in source.blocks[e0:e1]:
            rows, cols = slice(block.rows + b0, block.rows + b1), slice(block.cols + a0, block.cols + a1)
            where = (rows, cols) if block.lead is None else (block.lead, rows, cols)
            parts.append(self.checkpoint.read(block.name, where).t())  # (a, b)
        stacked = torch.stack(parts) if parts else torch.empty(0, a1 - a0, b1 - b0)
        return stacked * source.scale if source.scale != 1.0 else stacked


def reader_for(model: ModelConfig, seed: int = 0) -> PretrainedReader:
    """The reader of ``model.from_hf`` for the (completed) model section ``model``."""
    if model.from_hf is None:
        raise ValueError("model.from_hf is not set")
    directory = Path(model.from_hf).expanduser()
    return PretrainedReader.open(model.to_args(), read_pretrained(directory), directory, seed)


def check_pretrained(model: ModelConfig) -> None:
    """Before any work: every tensor the model needs is in ``model.from_hf`` with its shape."""
    reader_for(model).check()
