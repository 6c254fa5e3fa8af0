"""Token shards on disk: uint16 files of at most ``shard_tokens`` tokens per split, described
by ``index.json``, and a memory-mapped reader that checks them against the index."""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modmoe.data.errors import DataError

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
DTYPE = np.dtype("<u2")  # little-endian uint16, fixed so shards move between machines
SPLITS = ("train", "val")
Split = Literal["train", "val"]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends token arrays to one split and cuts them into shard files of at most
    ``shard_tokens`` tokens (shards end mid-document; readers see one continuous stream)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, tokens: np.ndarray) -> None:
        """Adds one document's tokens (separator included)."""
        self.num_documents += 1
        self._pending.append(tokens.astype(DTYPE, copy=False))
        self._pending_len += len(tokens)
        while self._pending_len >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> dict[str, Any]:
        """Writes the last partial shard; returns this split's index entry."""
        if self._pending_len:
            self._flush(self._pending_len)
        return {
            "num_tokens": sum(s["tokens"] for s in self.shards),
            "num_documents": self.num_documents,
            "shards": self.shards,
        }

    def _flush(self, count: int) -> None:
        stream = np.concatenate(self._pending)
        head, rest = stream[:count], stream[count:]
        self._pending, self._pending_len = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        path = self.out_dir / name
        data = head.tobytes()
        path.write_bytes(data)
        self.shards.append(
            {"file": name, "tokens": int(count), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )


def read_index(directory: Path) -> dict[str, Any]:
    """Parses ``index.json``; a missing or malformed index is a one-line :class:`DataError`."""
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (not a prepared data directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable index ({err})") from None
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        found = index.get("format_version") if isinstance(index, dict) else None
        raise DataError(f"{path}: format_version {found!r} is not the supported {FORMAT_VERSION}")
    return index


class TokenShards:
    """One split's shards as a single token stream, memory-mapped (nothing is read up front).

    Opening checks every shard named in the index exists, is non-empty and has the recorded
    byte size; ``verify=True`` also checks each sha256 (reads all the data).
    """

    def __init__(self, directory: str | Path, split: Split, verify: bool = False) -> None:
        self.dir = Path(directory)
        if split not in SPLITS:
            raise DataError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
        self.split = split
        index = read_index(self.dir)
        entry = index.get("splits", {}).get(split)
        if not entry or not entry.get("shards"):
            raise DataError(f"{self.dir / INDEX_NAME}: split {split!r} has no shards")
        self._maps: list[np.memmap] = []
        starts = [0]
        for shard in entry["shards"]:
            path = self.dir / shard["file"]
            self._check_shard(path, shard, verify)
            self._maps.append(np.memmap(path, dtype=DTYPE, mode="r"))
            starts.append(starts[-1] + int(shard["tokens"]))
        self._starts = starts  # global offset of each shard's first token, then the total
        self.num_tokens = starts[-1]
        self.vocab_size = int(index["vocab_size"])

    @staticmethod
    def _check_shard(path: Path, shard: dict[str, Any], verify: bool) -> None:
        hint = f" (delete {path.parent} to prepare again)"
        if not path.is_file():
            raise DataError(f"shard {path}: missing{hint}")
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"shard {path}: empty file, index expects {shard['bytes']} bytes{hint}")
        if size != shard["bytes"] or shard["bytes"] != shard["tokens"] * DTYPE.itemsize:
            expected = shard["bytes"]
            raise DataError(f"shard {path}: size {size} bytes, index expects {expected} (truncated or replaced){hint}")
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataError(f"shard {path}: sha256 does not match the index (corrupted){hint}")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of the split as a fresh uint16 array (crosses
        shard boundaries as needed)."""
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(
                f"window [{offset}, {offset + length}) outside the {self.split} split of {self.num_tokens} tokens"
            )
        out = np.empty(length, dtype=DTYPE)
        shard = bisect.bisect_right(self._starts, offset) - 1
        filled = 0
        while filled < length:
            local = offset + filled - self._starts[shard]
            take = min(length - filled, self._starts[shard + 1] - self._starts[shard] - local)
            out[filled : filled + take] = self._maps[shard][local : local + take]
            filled += take
            shard += 1
        return out
