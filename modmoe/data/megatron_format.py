"""Megatron indexed datasets (a ``.bin`` of tokens and its ``.idx``) read as one token stream
and written for Megatron-LM, through megatron-core's own ``IndexedDataset`` reader and
``IndexedDatasetBuilder`` where it is installed.

Without megatron-core (the bare GPU image has none) a small reader of the same ``.idx``
layout takes over; tests check it against files megatron-core wrote. Writing always needs
megatron-core: modmoe keeps no second writer of the format.
"""

from __future__ import annotations

import bisect
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from modmoe.data.errors import DataError
from modmoe.data.shards import random_access_map
from modmoe.file_paths import not_regular_problem

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# megatron.core.datasets.indexed_dataset.DType codes; float codes are refused (not tokens).
_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CHECK_CHUNK = 1 << 20


def prefix_of(path: str | Path) -> str:
    """``data/x_text_document.bin`` / ``.idx`` / ``data/x_text_document`` -> the prefix."""
    text = str(Path(path).expanduser())
    return text[:-4] if text.endswith((".bin", ".idx")) else text


def _megatron_indexed() -> Any | None:
    """megatron-core's indexed_dataset module, or None where it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" on import
            from megatron.core.datasets import indexed_dataset
    except ImportError:
        return None
    return indexed_dataset


def megatron_available() -> bool:
    return _megatron_indexed() is not None


def _check_header(idx_path: str) -> tuple[int, int, int]:
    """(dtype code, sequence count, document count) of a well-formed ``.idx``: the layout is a
    header, then int32 sequence lengths, int64 byte pointers, int64 document indices."""
    size = Path(idx_path).stat().st_size
    with open(idx_path, "rb") as fh:
        head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise DataError(f"{idx_path}: {size} bytes, too short for a Megatron index header")
    magic, version, code, count, docs = _HEADER.unpack(head)
    if magic != _MAGIC or version != 1:
        raise DataError(f"{idx_path}: not a Megatron index (bad header)")
    if code not in _CODES:
        raise DataError(f"{idx_path}: dtype code {code} does not hold token ids")
    need = _HEADER.size + count * 4 + count * 8 + docs * 8
    if size < need:
        raise DataError(f"{idx_path}: {size} bytes, its header promises {need} (truncated)")
    return code, count, docs


class _OwnIndex:
    """The ``.idx`` arrays, read without megatron-core."""

    def __init__(self, idx_path: str, bin_path: str) -> None:
        code, count, docs = _check_header(idx_path)
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.dtype = np.dtype(_CODES[code])
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, np.int32, count, offset)
        self.sequence_pointers = np.frombuffer(raw, np.int64, count, offset + count * 4)
        self.document_indices = np.frombuffer(raw, np.int64, docs, offset + count * 12)
        self._bin = random_access_map(Path(bin_path), self.dtype) if Path(bin_path).stat().st_size else None

    def read(self, count: int, byte_offset: int) -> np.ndarray:
        assert self._bin is not None
        first = byte_offset // self.dtype.itemsize
        return self._bin[first : first + count]


class _CoreIndex:
    """The same arrays, from megatron-core's ``IndexedDataset``."""

    def __init__(self, module: Any, prefix: str) -> None:
        try:
            self._ds = module.IndexedDataset(prefix, mmap=True)
        except (AssertionError, ValueError, OSError, struct.error, KeyError) as err:
            raise DataError(f"{prefix}.idx: megatron-core cannot read it ({err or type(err).__name__})") from None
        index = self._ds.index
        self.dtype = np.dtype(index.dtype)
        self.sequence_lengths = index.sequence_lengths
        self.sequence_pointers = index.sequence_pointers
        self.document_indices = index.document_indices

    def read(self, count: int, byte_offset: int) -> np.ndarray:
        return self._ds.bin_reader.read(dtype=self.dtype.type, count=count, offset=byte_offset)


def _check_contiguous(lengths: np.ndarray, pointers: np.ndarray, itemsize: int, bin_path: str) -> int:
    """Sequences must lie back to back from byte 0 and fill the ``.bin`` exactly (what Megatron's
    builder writes); returns the number of tokens."""
    size = Path(bin_path).stat().st_size
    count = len(lengths)
    if count == 0:
        raise DataError(f"{bin_path}: its index lists no sequences (empty dataset)")
    expected = 0
    for start in range(0, count, _CHECK_CHUNK):
        lens = lengths[start : start + _CHECK_CHUNK].astype(np.int64)
        ptrs = pointers[start : start + _CHECK_CHUNK]
        if (lens < 0).any():
            raise DataError(f"{bin_path}: its .idx lists a negative sequence length (damaged index)")
        starts = expected + np.concatenate(([0], np.cumsum(lens[:-1] * itemsize)))
        if not np.array_equal(starts, ptrs):
            bad = start + int(np.flatnonzero(starts != ptrs)[0])
            raise DataError(f"{bin_path}: does not match its .idx (sequence {bad} is not where the index puts it)")
        expected = int(starts[-1] + lens[-1] * itemsize)
    if expected != size:
        raise DataError(
            f"{bin_path}: {size} bytes, its .idx describes {expected} ({expected // itemsize} tokens); "
            "the pair does not match (truncated or from another dataset)"
        )
    return expected // itemsize


def _check_documents(docs: np.ndarray, count: int, idx_path: str) -> None:
    """Document boundaries are sequence numbers from 0 to ``count``, never decreasing: every
    lookup through them then stays inside the sequences."""
    if len(docs) < 2 or int(docs[0]) != 0 or int(docs[-1]) != count:
        raise DataError(f"{idx_path}: document indices do not cover its sequences (damaged index)")
    for start in range(0, len(docs), _CHECK_CHUNK):
        part = docs[start : start + _CHECK_CHUNK + 1]
        if (part < 0).any() or (part > count).any() or (np.diff(part) < 0).any():
            raise DataError(
                f"{idx_path}: its document indices point outside its {count} sequences or go backwards (damaged index)"
            )


class MegatronStream:
    """Tokens ``[start, stop)`` of a Megatron indexed dataset's stream (all sequences back to
    back, as Megatron's GPT dataset reads them), memory-mapped in place: no copy, no conversion."""

    def __init__(self, prefix: str | Path, start: int = 0, stop: int | None = None, use_core: bool = True) -> None:
        self.prefix = prefix_of(prefix)
        self.bin_path, self.idx_path = f"{self.prefix}.bin", f"{self.prefix}.idx"
        for path in (self.bin_path, self.idx_path):
            if (why := not_regular_problem(path)) is not None:
                raise DataError(f"Megatron dataset {self.prefix}: {path}: {'not found' if why.startswith('no such') else why}")
        _check_header(self.idx_path)  # also spares megatron-core's reader a file it would choke on
        if Path(self.bin_path).stat().st_size == 0:  # megatron-core cannot map it, and says so twice on stderr
            raise DataError(f"{self.bin_path}: empty file (no tokens)")
        module = _megatron_indexed() if use_core else None
        self.reader = "megatron-core" if module is not None else "modmoe"
        self._index = _CoreIndex(module, self.prefix) if module is not None else _OwnIndex(self.idx_path, self.bin_path)
        self.dtype = self._index.dtype
        if self.dtype.kind not in "iu":
            raise DataError(f"{self.idx_path}: dtype {self.dtype} does not hold token ids")
        total = _check_contiguous(
            self._index.sequence_lengths, self._index.sequence_pointers, self.dtype.itemsize, self.bin_path
        )
        _check_documents(self._index.document_indices, len(self._index.sequence_lengths), self.idx_path)
        self.total_tokens = total
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise DataError(f"{self.bin_path}: window [{start}, {stop}) outside its {total} tokens")
        self.num_tokens = self.stop - self.start
        self.label = self.bin_path

    @property
    def num_documents(self) -> int:
        return len(self._index.document_indices) - 1

    def document_start(self, doc: int) -> int:
        """Token offset (in the whole dataset) where document ``doc`` begins."""
        if doc >= self.num_documents:
            return self.total_tokens
        seq = int(self._index.document_indices[doc])
        return int(self._index.sequence_pointers[seq]) // self.dtype.itemsize

    def tail_split(self, val_fraction: float) -> tuple[MegatronStream, MegatronStream]:
        """Train = the documents before the one where the last ``val_fraction`` of tokens
        begins; val = the rest (cut at a document boundary)."""
        target = int(self.total_tokens * (1.0 - val_fraction))
        doc = bisect.bisect_left(range(self.num_documents), target, key=self.document_start)
        cut = self.document_start(doc)
        if cut <= 0 or cut >= self.total_tokens:
            raise DataError(
                f"{self.bin_path}: {self.num_documents} document(s) cannot be split {1 - val_fraction:.0%}/"
                f"{val_fraction:.0%} into train and val at a document boundary; set the source's val_path"
            )
        return self.window(0, cut), self.window(cut, self.total_tokens)

    def window(self, start: int, stop: int) -> MegatronStream:
        twin = object.__new__(MegatronStream)
        twin.__dict__.update(self.__dict__)
        twin.start, twin.stop, twin.num_tokens = start, stop, stop - start
        return twin

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of the window, as a fresh array."""
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(f"window [{offset}, {offset + length}) outside {self.num_tokens} tokens of {self.label}")
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        return np.array(self._index.read(length, (self.start + offset) * self.dtype.itemsize))

    def where(self, offset: int) -> str:
        """The file and document holding token ``offset`` of the window."""
        token = self.start + offset
        doc = bisect.bisect_right(range(self.num_documents), token, key=self.document_start) - 1
        return f"{self.bin_path} (document {doc})"


def writer_dtype(vocab: int) -> type:
    """The token type Megatron-LM's own tools choose for this vocabulary."""
    module = _require_core()
    return module.DType.optimal_dtype(vocab)


def _require_core() -> Any:
    module = _megatron_indexed()
    if module is None:
        raise DataError("data.output_format = 'megatron' needs megatron-core (pip install 'modmoe[megatron]')")
    return module


class MegatronWriter:
    """One ``.bin``/``.idx`` pair written by megatron-core's ``IndexedDatasetBuilder``. A
    document is one sequence (its tokens and the separator, like ``preprocess_data.py
    --append-eod``), or several for a document longer than one encoding piece."""

    def __init__(self, prefix: str, dtype: type) -> None:
        import torch

        self._torch = torch
        module = _require_core()
        self.prefix = prefix
        self._builder = module.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        self.num_tokens = self.num_documents = 0

    def add(self, tokens: np.ndarray) -> None:
        """Appends one sequence to the current document."""
        self._builder.add_item(self._torch.from_numpy(np.ascontiguousarray(tokens)))
        self.num_tokens += len(tokens)

    def end_document(self) -> None:
        self._builder.end_document()
        self.num_documents += 1

    def add_index(self, prefix: str, num_tokens: int, num_documents: int) -> None:
        """Appends a whole finished pair (megatron-core's own concatenation)."""
        self._builder.add_index(prefix)
        self.num_tokens += num_tokens
        self.num_documents += num_documents

    def close(self) -> None:
        self._builder.finalize(f"{self.prefix}.idx")
