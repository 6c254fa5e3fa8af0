"""modmoe token shards: flat files of little-endian uint16 or uint32 token ids (the type is
recorded in the index), each split one stream cut into files of at most ``shard_tokens``
tokens, and a memory-mapped reader that checks them against the index."""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from modmoe.data.errors import DataError

SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_name(dtype: np.dtype) -> str:
    for name, known in DTYPES.items():
        if np.dtype(dtype) == known:
            return name
    raise DataError(f"token dtype {dtype}: modmoe shards hold uint16 or uint32")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Streams one split's tokens of one work unit into files ``<stem>_<k>.bin`` of at most
    ``shard_tokens`` tokens (files end mid-document; readers see one continuous stream).
    Files are written under a temporary name and renamed by :meth:`close`, so a file with the
    final name is always complete."""

    def __init__(self, out_dir: Path, stem: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out_dir, self.stem, self.shard_tokens, self.dtype = out_dir, stem, shard_tokens, np.dtype(dtype)
        self.shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self._fh: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._in_file = 0
        self._done: list[tuple[Path, Path]] = []

    def add(self, tokens: np.ndarray) -> None:
        """Appends tokens to the current document."""
        data = tokens.astype(self.dtype, copy=False)
        while len(data):
            if self._fh is None:
                self._open()
            take = min(len(data), self.shard_tokens - self._in_file)
            block = data[:take].tobytes()
            self._fh.write(block)
            self._digest.update(block)
            self._in_file += take
            data = data[take:]
            if self._in_file == self.shard_tokens:
                self._finish_file()

    def end_document(self) -> None:
        self.num_documents += 1

    def _name(self, k: int) -> str:
        return f"{self.stem}_{k:03d}.bin"

    def _open(self) -> None:
        tmp = self.out_dir / f".{self._name(len(self.shards))}.tmp"
        self._fh = tmp.open("wb")
        self._digest, self._in_file = hashlib.sha256(), 0

    def _finish_file(self) -> None:
        assert self._fh is not None
        name = self._name(len(self.shards))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        self._done.append((self.out_dir / f".{name}.tmp", self.out_dir / name))
        size = self._in_file * self.dtype.itemsize
        self.shards.append({"file": name, "tokens": self._in_file, "bytes": size, "sha256": self._digest.hexdigest()})

    def close(self) -> dict[str, Any]:
        """Finishes the last file and gives every file its final name; returns the split's
        entry for this unit."""
        if self._fh is not None:
            self._finish_file()
        for tmp, final in self._done:
            os.replace(tmp, final)
        return {
            "num_tokens": sum(s["tokens"] for s in self.shards),
            "num_documents": self.num_documents,
            "shards": self.shards,
        }


def random_access_map(path: Path, dtype: np.dtype) -> np.memmap:
    """A read-only memory map told that reads are random (samples): the kernel then reads no
    pages ahead, so resident memory grows with the samples read, not with the file's size."""
    mapped = np.memmap(path, dtype=dtype, mode="r")
    raw = getattr(mapped, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
        raw.madvise(mmap.MADV_RANDOM)
    return mapped


def check_shard(path: Path, shard: dict[str, Any], itemsize: int, verify: bool) -> None:
    """The file exists with the recorded size (and, with ``verify``, the recorded sha256)."""
    hint = " (the preparation is damaged: prepare it again)"
    if not path.is_file():
        raise DataError(f"shard {path}: missing{hint}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"shard {path}: empty file, index expects {shard['bytes']} bytes{hint}")
    if size != shard["bytes"] or shard["bytes"] != shard["tokens"] * itemsize:
        raise DataError(
            f"shard {path}: size {size} bytes, index expects {shard['bytes']} (truncated or replaced){hint}"
        )
    if verify and sha256_file(path) != shard["sha256"]:
        raise DataError(f"shard {path}: sha256 does not match the index (corrupted){hint}")


class TokenShards:
    """One split of one source as a single token stream, memory-mapped (nothing is read up
    front). Opening checks every shard exists with its recorded size; ``verify=True`` also
    checks each sha256 (reads all the data)."""

    def __init__(self, directory: Path, entry: dict[str, Any], dtype: str, label: str, verify: bool = False) -> None:
        self.dir = Path(directory)
        self.split = label
        self.label = label
        if dtype not in DTYPES:
            raise DataError(f"{label}: token dtype {dtype!r}: allowed {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        if not entry.get("shards"):
            raise DataError(f"{label}: has no shards")
        self._maps: list[np.memmap] = []
        self._files: list[Path] = []
        starts = [0]
        for shard in entry["shards"]:
            path = self.dir / shard["file"]
            check_shard(path, shard, self.dtype.itemsize, verify)
            self._maps.append(random_access_map(path, self.dtype))
            self._files.append(path)
            starts.append(starts[-1] + int(shard["tokens"]))
        self._starts = starts  # global offset of each shard's first token, then the total
        self.num_tokens = starts[-1]

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of the split as a fresh array (crosses shard
        boundaries as needed)."""
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(f"window [{offset}, {offset + length}) outside {self.label} of {self.num_tokens} tokens")
        out = np.empty(length, dtype=self.dtype)
        shard = bisect.bisect_right(self._starts, offset) - 1
        filled = 0
        while filled < length:
            local = offset + filled - self._starts[shard]
            take = min(length - filled, self._starts[shard + 1] - self._starts[shard] - local)
            out[filled : filled + take] = self._maps[shard][local : local + take]
            filled += take
            shard += 1
        return out

    def where(self, offset: int) -> str:
        """The shard file holding token ``offset``."""
        shard = bisect.bisect_right(self._starts, offset) - 1
        return f"{self._files[shard]} (token {offset - self._starts[shard]})"
