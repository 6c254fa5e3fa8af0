"""Tokenizing one work unit into its finished files and record: the step a preparation worker
repeats. A unit's record is written last (atomically), so a record on disk means the unit's
files are complete; a preparation killed midway keeps those units and redoes the rest."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modmoe.config_json import JSONInputError, read_json
from modmoe.data.documents import chunk_stream, val_score
from modmoe.data.errors import DataError
from modmoe.data.inputs import Unit
from modmoe.data.megatron_format import MegatronWriter
from modmoe.data.readers import ReadLimits, Skipped, read_unit
from modmoe.data.shards import SPLITS, ShardWriter, check_shard, sha256_file
from modmoe.data.tokenizer import load_tokenizer
from modmoe.file_paths import escape_problem

_MAX_RECORD_BYTES = 64 << 20  # a unit's record lists its shards: a few kB
_ENCODE_BATCH_CHARS = 4_000_000  # text per encode_batch call: bounded memory per worker
Report = Callable[[int, int], None]
"""Progress callback: (input bytes done, tokens written) since the last call."""


@dataclass(frozen=True)
class UnitContext:
    """What every worker needs besides the unit (small and picklable)."""

    root: str
    """The preparation's work directory."""
    tokenizer_path: str
    eos_id: int
    dtype: str
    """numpy dtype of the written token ids."""
    output_format: str
    shard_tokens: int
    val_fraction: float
    max_document_bytes: int
    max_compression_ratio: float


class _Writer(Protocol):
    def add(self, tokens: np.ndarray) -> None: ...
    def end_document(self) -> None: ...
    def close(self) -> dict[str, Any]: ...


class _MegatronUnitWriter:
    """A pair per unit and split; the preparation's last step concatenates them."""

    def __init__(self, out_dir: Path, stem: str, ctx: UnitContext) -> None:
        self.out_dir, self.stem = out_dir, stem
        self._tmp = str(out_dir / f".{stem}.tmp")
        self._writer = MegatronWriter(self._tmp, np.dtype(ctx.dtype).type)
        self.add, self.end_document = self._writer.add, self._writer.end_document

    def close(self) -> dict[str, Any]:
        self._writer.close()
        entry: dict[str, Any] = {
            "prefix": self.stem,
            "num_tokens": self._writer.num_tokens,
            "num_documents": self._writer.num_documents,
        }
        for suffix in ("bin", "idx"):
            final = self.out_dir / f"{self.stem}.{suffix}"
            os.replace(f"{self._tmp}.{suffix}", final)
            entry[f"{suffix}_bytes"] = final.stat().st_size
            entry[f"{suffix}_sha256"] = sha256_file(final)
        return entry


def _modmoe_writer(out_dir: Path, stem: str, ctx: UnitContext) -> ShardWriter:
    return ShardWriter(out_dir, stem, ctx.shard_tokens, np.dtype(ctx.dtype))


def unit_dir(root: Path, source: str) -> Path:
    return root / "sources" / source / "units"


def record_path(root: Path, unit: Unit) -> Path:
    return unit_dir(root, unit.source) / f"{unit.index:06d}.json"


_TOKENIZERS: dict[str, Any] = {}


def use_tokenizer(path: str, tok: Any) -> None:
    """Makes ``tok`` (already loaded from ``path``) the one this process encodes with."""
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a separator
    _TOKENIZERS[path] = tok


def _tokenizer(path: str) -> Any:
    if path not in _TOKENIZERS:
        use_tokenizer(path, load_tokenizer(path))
    return _TOKENIZERS[path]


def process_unit(ctx: UnitContext, unit: Unit, report: Report) -> dict[str, Any]:
    """Tokenizes ``unit`` and writes its files and record; returns the record."""
    root = Path(ctx.root)
    out = unit_dir(root, unit.source)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(ctx.tokenizer_path)
    make = _modmoe_writer if ctx.output_format == "modmoe" else _MegatronUnitWriter
    writers: dict[str, _Writer] = {split: make(out, f"{split}_{unit.index:06d}", ctx) for split in SPLITS}
    eos = np.array([ctx.eos_id], dtype=np.int64)
    skipped = Skipped()
    pieces: list[str] = []
    marks: list[tuple[str, bool]] = []  # (split, last piece of its document) per piece
    state = {"chars": 0, "bytes_sent": 0, "max_id": -1, "documents": 0}

    def encode() -> None:
        if not pieces:
            return
        encodings = tok.encode_batch_fast(pieces, add_special_tokens=False)  # one thread in a worker
        tokens_out = 0
        for enc, (split, last) in zip(encodings, marks):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if last:
                ids = np.concatenate([ids, eos])
            if len(ids):
                state["max_id"] = max(state["max_id"], int(ids.max()))
                writers[split].add(ids)
                tokens_out += len(ids)
            if last:
                writers[split].end_document()
        done = min(unit.nbytes - state["bytes_sent"], sum(len(p) for p in pieces))
        state["bytes_sent"] += done
        report(done, tokens_out)
        pieces.clear()
        marks.clear()
        state["chars"] = 0

    for doc, rest in read_unit(unit, ReadLimits(ctx.max_document_bytes, ctx.max_compression_ratio), skipped):
        stream = chunk_stream([doc.text] if rest is None else itertools.chain([doc.text], rest))
        split = None
        piece = next(stream, None)
        if piece is None:  # nothing but an empty text
            skipped.empty += 1
            continue
        while piece is not None:
            following = next(stream, None)
            if split is None:  # the first piece holds the characters the split hash reads
                split = "val" if val_score(piece) < ctx.val_fraction else "train"
            pieces.append(piece)
            marks.append((split, following is None))
            state["chars"] += len(piece)
            if state["chars"] >= _ENCODE_BATCH_CHARS:
                encode()
            piece = following
        state["documents"] += 1
    encode()
    report(unit.nbytes - state["bytes_sent"], 0)
    record = {
        "source": unit.source,
        "unit": unit.index,
        "digest": unit.digest(),
        "bytes": unit.nbytes,
        "documents": state["documents"],
        "skipped": {"unreadable": skipped.unreadable, "empty": skipped.empty},
        "max_token_id": state["max_id"],
        "splits": {split: writer.close() for split, writer in writers.items()},
    }
    path = record_path(root, unit)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)  # the record last: its presence means the unit is complete
    return record


def finished_record(root: Path, unit: Unit, output_format: str) -> dict[str, Any] | None:
    """The unit's record if it finished under the same plan and its files verify (size and
    sha256); None means the unit must be redone."""
    path = record_path(root, unit)
    try:
        record = read_json(path, _MAX_RECORD_BYTES)
    except JSONInputError:
        return None
    if not isinstance(record, dict) or record.get("digest") != unit.digest():
        return None
    out = unit_dir(root, unit.source)
    try:
        for entry in record["splits"].values():
            if output_format == "modmoe":
                for shard in entry["shards"]:
                    if escape_problem(out, shard["file"]) or "/" in shard["file"]:
                        return None
                    itemsize = shard["bytes"] // shard["tokens"] if shard["tokens"] else 1
                    check_shard(out / shard["file"], shard, itemsize, verify=True)
            else:
                if escape_problem(out, f"{entry['prefix']}.bin") or "/" in entry["prefix"]:
                    return None
                for suffix in ("bin", "idx"):
                    file = out / f"{entry['prefix']}.{suffix}"
                    if not file.is_file() or file.stat().st_size != entry[f"{suffix}_bytes"]:
                        return None
                    if sha256_file(file) != entry[f"{suffix}_sha256"]:
                        return None
    except (DataError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    return record
