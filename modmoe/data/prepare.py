"""``prepare_data``: corpus -> tokenizer -> train/val token shards + ``index.json``, built in a
temporary directory and renamed into place, reused while the config fingerprint matches."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from modmoe.data.config import DataConfig
from modmoe.data.corpus import Document, iter_documents
from modmoe.data.errors import DataError
from modmoe.data.shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    TOKENIZER_NAME,
    ShardWriter,
    Split,
    TokenShards,
    read_index,
    sha256_file,
)
from modmoe.data.tokenizer import EOT, PAD, load_tokenizer, train_tokenizer

Log = Callable[[str], None]
_ENCODE_BATCH_BYTES = 4_000_000  # text per encode_batch call: enough to keep all cores busy, bounded memory


@dataclass(frozen=True)
class PreparedData:
    """A finished preparation on disk."""

    dir: Path
    tokenizer_path: Path
    vocab_size: int
    """The tokenizer's real vocabulary size (can be below ``vocab_size`` on a tiny corpus)."""
    eot_id: int
    pad_id: int | None
    fingerprint: str

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        """Opens an existing preparation from its ``index.json`` (no config needed)."""
        directory = Path(directory)
        index = read_index(directory)
        tokenizer_path = directory / TOKENIZER_NAME
        if not tokenizer_path.is_file():
            raise DataError(f"tokenizer file {tokenizer_path}: not found (delete {directory} to prepare again)")
        return cls(
            dir=directory,
            tokenizer_path=tokenizer_path,
            vocab_size=int(index["vocab_size"]),
            eot_id=int(index["eot_id"]),
            pad_id=index.get("pad_id"),
            fingerprint=index["fingerprint"],
        )

    def open(self, split: Split, verify: bool = False) -> TokenShards:
        return TokenShards(self.dir, split, verify=verify)

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)


def fingerprint_fields(cfg: DataConfig) -> dict[str, Any]:
    """The inputs that change the prepared tokens; sequence length, workers and the output
    directory do not, so they are left out."""
    fields: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "corpus": cfg.corpus,
        "max_corpus_bytes": cfg.max_corpus_bytes,
        "shard_tokens": cfg.shard_tokens,
        "val_fraction": cfg.val_fraction,
    }
    if cfg.corpus == "stdlib":
        fields["python"] = platform.python_version()  # each release ships different sources
    else:
        fields["corpus_glob"] = cfg.corpus_glob
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # one-line error naming the file if it is missing or bad
        fields["tokenizer_sha256"] = sha256_file(Path(cfg.tokenizer))
    else:
        fields["vocab_size"] = cfg.vocab_size
        fields["tokenizers"] = tokenizers.__version__  # trainer changes may change the merges
    return fields


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _val_score(key: str) -> float:
    """Uniform in [0, 1), a function of the document key only."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_keys(keys: Iterable[str], val_fraction: float) -> set[str]:
    """The keys held out for validation. Both splits get at least one document: on a tiny
    corpus the lowest-scoring key is held out, or the highest-scoring one kept for training."""
    scores = {key: _val_score(key) for key in keys}
    if len(scores) < 2:
        raise DataError(f"corpus has {len(scores)} document(s); at least 2 are needed for a train/val split")
    val = {key for key, score in scores.items() if score < val_fraction}
    if not val:
        val = {min(scores, key=scores.__getitem__)}
    elif len(val) == len(scores):
        val.discard(max(scores, key=scores.__getitem__))
    return val


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _build(cfg: DataConfig, out: Path, fields: dict[str, Any], log: Log) -> dict[str, Any]:
    """Writes tokenizer, shards and (last) index.json into ``out``; returns the index."""
    t0 = time.perf_counter()
    keys: list[str] = []

    def texts() -> Iterator[str]:  # first pass over the corpus: collect keys, feed the trainer
        for doc in iter_documents(cfg, log):
            keys.append(doc.key)
            yield doc.text

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        shutil.copyfile(cfg.tokenizer, out / TOKENIZER_NAME)
        for _ in texts():
            pass
    else:
        tok = train_tokenizer(texts(), cfg.vocab_size)  # on all documents, as is usual for BPE
        tok.save(str(out / TOKENIZER_NAME))
        log(f"tokenizer: trained byte-level BPE, {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f}s")
    val_keys = split_keys(keys, cfg.val_fraction)
    eot_id = tok.token_to_id(EOT)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a source file is text, not a separator

    writers = {split: ShardWriter(out, split, cfg.shard_tokens) for split in SPLITS}
    t1 = time.perf_counter()
    for batch in _batches(iter_documents(cfg, log=lambda _: None)):
        encodings = tok.encode_batch_fast([d.text for d in batch], add_special_tokens=False)  # rayon-parallel
        for doc, enc in zip(batch, encodings):
            tokens = np.array([*enc.ids, eot_id], dtype=np.uint16)  # (doc_len + 1,)
            writers["val" if doc.key in val_keys else "train"].add(tokens)
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(fields),
        "fingerprint_fields": fields,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id,
        "pad_id": tok.token_to_id(PAD),
        "dtype": "uint16",
        "splits": {split: writer.close() for split, writer in writers.items()},
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1), encoding="utf-8")
    s = index["splits"]
    log(
        f"data: {s['train']['num_tokens']:,} train tokens ({len(s['train']['shards'])} shards), "
        f"{s['val']['num_tokens']:,} val tokens ({s['val']['num_documents']} documents); "
        f"encoded in {time.perf_counter() - t1:.1f}s, total {time.perf_counter() - t0:.1f}s"
    )
    return index


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serializes preparations of one directory between processes on this host (e.g. all
    ranks of a node calling ``prepare_data`` at once: one prepares, the others reuse)."""
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _existing_fingerprint(target: Path) -> str | None:
    """The fingerprint of a preparation at ``target``, None if there is none; refuses to touch
    a directory that holds something else."""
    if not target.exists():
        return None
    if not target.is_dir():
        raise DataError(f"data.prepared_dir {target}: exists and is not a directory")
    if not (target / INDEX_NAME).exists():
        if any(target.iterdir()):
            raise DataError(
                f"data.prepared_dir {target}: non-empty directory without {INDEX_NAME}; refusing to overwrite it"
            )
        return None
    try:
        return read_index(target).get("fingerprint")
    except DataError:
        return None  # our own damaged index: prepare again


def _sibling(target: Path, kind: str) -> Path:
    """A new hidden directory next to ``target`` (plain mkdir, so the umask applies)."""
    path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _install(tmp: Path, target: Path) -> None:
    """Moves the finished ``tmp`` to ``target``: at every instant ``target`` is either the old
    complete preparation, absent, or the new complete one."""
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old / "data")
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def prepare_data(cfg: DataConfig, log: Log = print) -> PreparedData:
    """Prepares (or reuses) the tokenized corpus described by ``cfg`` in ``cfg.prepared_dir``."""
    target = Path(cfg.prepared_dir).resolve()
    fields = fingerprint_fields(cfg)
    wanted = fingerprint(fields)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        found = _existing_fingerprint(target)
        if found == wanted:
            log(f"data: reusing {target} (fingerprint {wanted})")
            return PreparedData.load(target)
        for stale in target.parent.iterdir():  # leftovers of a crashed preparation
            if stale.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")):
                shutil.rmtree(stale, ignore_errors=True)
        log(f"data: preparing {target} (fingerprint {wanted}" + (f", replacing {found})" if found else ")"))
        tmp = _sibling(target, "tmp")
        try:
            _build(cfg, tmp, fields, log)
            _install(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PreparedData.load(target)
