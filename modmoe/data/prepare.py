"""``prepare_data``: sources -> tokenizer -> per-source train/val token files + ``index.json``.

The work happens in ``.<name>.partial`` next to ``data.prepared_dir`` (marked as modmoe's),
one work unit at a time, on ``workers`` processes. Each finished unit is recorded, so a
preparation killed at any moment resumes: finished units are verified and kept, the rest
redone. The index is written last and the directory renamed into place, so
``data.prepared_dir`` is always either absent, the previous complete preparation, or the new
one. A matching preparation (same fingerprint) is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import tokenizers
from tokenizers import Tokenizer

from modmoe import nested
from modmoe.data.blend import normalise
from modmoe.data.config import DataConfig, SourceConfig
from modmoe.data.documents import Document, utf8_prefix
from modmoe.data.errors import DataError
from modmoe.errors import os_errors_in_one_line
from modmoe.data.index_schema import read_index_file
from modmoe.data.inputs import Unit, plan_units, stdlib_root
from modmoe.data.megatron_format import MegatronWriter, writer_dtype
from modmoe.data.ownership import (
    PRODUCER,
    check_replaceable,
    clear_leftovers,
    install,
    marker_fingerprint,
    remove_ours,
    write_marker,
)
from modmoe.data.progress import PrepareProgress
from modmoe.data.readers import ReadLimits, Skipped, read_unit
from modmoe.data.shards import SPLITS, TokenShards, dtype_name, sha256_file
from modmoe.data.tokenizer import (
    CONFIG_NAME,
    EOT,
    PAD,
    TOKENIZER_NAME,
    TokenizerFiles,
    document_separator,
    load_tokenizer,
    token_dtype,
    train_tokenizer,
    vocab_bound,
)
from modmoe.data.units import UnitContext, finished_record, process_unit, unit_dir, use_tokenizer

Log = Callable[[str], None]
FORMAT_VERSION = 2
INDEX_NAME = "index.json"


# --- what a preparation is ------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """A finished preparation on disk."""

    dir: Path
    tokenizer_path: Path
    vocab_size: int
    """One more than the tokenizer's largest token id."""
    eot_id: int
    """The document separator's id."""
    eos_token: str
    pad_id: int | None
    fingerprint: str
    index: dict[str, Any]

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        """Opens an existing preparation from its ``index.json`` (no config needed)."""
        directory = Path(directory)
        index = read_index(directory)
        tokenizer_path = directory / TOKENIZER_NAME
        if not tokenizer_path.is_file():
            raise DataError(f"tokenizer file {tokenizer_path}: not found (the preparation is damaged: prepare again)")
        return cls(
            dir=directory,
            tokenizer_path=tokenizer_path,
            vocab_size=int(index["vocab_size"]),
            eot_id=int(index["eot_id"]),
            eos_token=str(index["eos_token"]),
            pad_id=index.get("pad_id"),
            fingerprint=index["fingerprint"],
            index=index,
        )

    @property
    def source_names(self) -> list[str]:
        return list(self.index["sources"])

    def open(self, split: str, source: str | None = None, verify: bool = False) -> Any:
        """One split of one source as a token stream (``TokenShards`` or ``MegatronStream``);
        ``source`` may be left out when there is only one."""
        from modmoe.data.megatron_format import MegatronStream

        if split not in SPLITS:
            raise DataError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
        names = self.source_names
        if source is None:
            if len(names) != 1:
                raise DataError(f"{self.dir}: holds sources {', '.join(names)}; name the one to open")
            source = names[0]
        if source not in names:
            raise DataError(f"{self.dir}: no source {source!r} (it holds {', '.join(names)})")
        entry = self.index["sources"][source]
        label = f"{split} split of source {source!r} in {self.dir}"
        if self.index["output_format"] == "megatron":
            split_entry = entry["splits"][split]
            stream = MegatronStream(self.dir / split_entry["prefix"])
            if verify:
                for suffix in ("bin", "idx"):
                    if sha256_file(Path(f"{stream.prefix}.{suffix}")) != split_entry[f"{suffix}_sha256"]:
                        raise DataError(f"{stream.prefix}.{suffix}: sha256 does not match the index (corrupted)")
            stream.label = label
            return stream
        return TokenShards(
            self.dir / "sources" / source / "units", entry["splits"][split], self.index["dtype"], label, verify
        )

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def damage(self) -> str | None:
        """Why the files the index lists cannot be opened (missing, another size), or None."""
        try:
            for name in self.source_names:
                for split in SPLITS:
                    self.open(split, name)
        except DataError as err:
            return str(err)
        return None


def read_index(directory: Path) -> dict[str, Any]:
    """Parses ``index.json`` (bounded, typed, every path inside the directory); a missing,
    malformed, hostile or foreign index is a one-line :class:`DataError`."""
    path = Path(directory) / INDEX_NAME
    if not path.exists():
        raise DataError(f"{path}: not found (not a prepared data directory)")
    return read_index_file(path, PRODUCER, FORMAT_VERSION)


# --- the fingerprint -------------------------------------------------------------------------


def prepared_sources(cfg: DataConfig) -> list[tuple[int, SourceConfig]]:
    """The sources a preparation tokenizes (Megatron datasets are read in place), with their
    position in the config."""
    return [(i, s) for i, s in enumerate(cfg.source_list()) if s.resolved_kind() != "megatron"]


def source_label(cfg: DataConfig, position: int) -> str:
    return "data.corpus_glob" if cfg.sources is None else f"data.sources.{position}.path"


def _tokenizer_sha256(path: str) -> str:
    files = TokenizerFiles.find(path)
    digest = hashlib.sha256(sha256_file(files.tokenizer_json).encode())
    if files.config_json is not None:
        digest.update(sha256_file(files.config_json).encode())
    return digest.hexdigest()


def fingerprint_fields(cfg: DataConfig) -> dict[str, Any]:
    """The inputs that change the prepared tokens. Blend weights (unless they pick the
    tokenizer's training text), sequence length, workers and the output directory do not."""
    sources = prepared_sources(cfg)
    fields: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "sources": [
            {
                "name": s.resolved_name(),
                "kind": s.resolved_kind(),
                "path": s.path,
                "text_field": s.text_field,
                "hf_split": s.hf_split,
                "max_bytes": s.max_bytes,
            }
            for _, s in sources
        ],
        "shard_tokens": cfg.shard_tokens,
        "unit_bytes": cfg.unit_bytes,
        "val_fraction": cfg.val_fraction,
        "max_document_bytes": cfg.max_document_bytes,
        "output_format": cfg.output_format,
        "eos_token": cfg.eos_token,
    }
    if any(s.resolved_kind() == "stdlib" for _, s in sources):
        fields["python"] = platform.python_version()  # each release ships different sources
    if cfg.tokenizer:
        fields["tokenizer_sha256"] = _tokenizer_sha256(cfg.tokenizer)
    else:
        fields["trained_tokenizer"] = {
            "vocab_size": cfg.vocab_size,
            "train_bytes": cfg.tokenizer_train_bytes,
            "weights": [s.weight for _, s in sources] if len(sources) > 1 else None,
            "tokenizers": tokenizers.__version__,  # trainer changes may change the merges
        }
    return fields


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def first_difference(a: Any, b: Any) -> str | None:
    """The first key where two fingerprint field sets differ, with both values."""
    found = nested.first_difference(a, b)
    return None if found is None else f"{found[0]} ({found[1]!r} there, {found[2]!r} here)"


# --- the preparation -------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serializes preparations of one directory between processes (e.g. a preparation job and
    a trainer started too early); the lock dies with its process, even under SIGKILL."""
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _existing_fingerprint(target: Path) -> str | None:
    """The fingerprint of the preparation at ``target`` (None: absent, empty, or modmoe's own
    but damaged or outdated); refuses a directory that is not modmoe's."""
    if not check_replaceable(target, "data.prepared_dir"):
        return None
    try:
        return read_index(target).get("fingerprint")
    except DataError:
        return None


def _work_dir(target: Path, wanted: str, log: Log) -> Path:
    """``.<name>.partial``: resumed when it holds this fingerprint's work, else started anew."""
    work = target.parent / f".{target.name}.partial"
    if work.exists():
        if marker_fingerprint(work) == wanted:
            log(f"data: resuming the interrupted preparation in {work}")
            return work
        remove_ours(work, "preparation work directory")
    work.mkdir()
    write_marker(work, wanted)
    return work


def read_limits(cfg: DataConfig) -> ReadLimits:
    return ReadLimits(cfg.max_document_bytes, cfg.max_compression_ratio)


def _read_documents(units: list[Unit], limits: ReadLimits) -> Iterator[Document]:
    """Whole documents of some units (for the tokenizer's training text)."""
    for unit in units:
        for doc, rest in read_unit(unit, limits, Skipped()):
            yield doc if rest is None else Document(doc.text + "".join(rest), doc.where)


def corpus_documents(cfg: DataConfig, source: int = 0) -> Iterator[Document]:
    """The whole documents of the ``source``-th prepared source, in stream order (what the
    preparation reads; for inspection and tests)."""
    position, src = prepared_sources(cfg)[source]
    return _read_documents(_plans(cfg, [(position, src)])[src.resolved_name()], read_limits(cfg))


def _training_text(cfg: DataConfig, plans: dict[str, list[Unit]], weights: list[float]) -> Iterator[str]:
    """The first text of each source, up to its weight's share of ``tokenizer_train_bytes``,
    streamed: a document of hundreds of MB is read only as far as the budget goes."""
    found = 0
    for units, share in zip(plans.values(), normalise(weights)):
        left = int(cfg.tokenizer_train_bytes * share)
        for unit in units:
            for doc, rest in read_unit(unit, read_limits(cfg), Skipped()):
                for part in itertools.chain([doc.text], rest or ()):
                    if left <= 0:
                        break
                    text = part if len(part) * 4 <= left else utf8_prefix(part, left)
                    left -= len(text.encode("utf-8"))
                    found += len(text)
                    yield text
                if left <= 0:
                    break
            if left <= 0:
                break
    if not found:
        names = ", ".join(plans)
        raise DataError(f"corpus is empty: no readable UTF-8 text in source(s) {names} to train the tokenizer on")


def train_corpus_tokenizer(cfg: DataConfig, log: Log = print) -> Tokenizer:
    """The byte-level BPE a preparation of ``cfg`` trains: on at most
    ``data.tokenizer_train_bytes`` of text, which bounds its time and memory on any input."""
    sources = prepared_sources(cfg)
    return _train(cfg, _plans(cfg, sources), [s.weight for _, s in sources], log)


def _plans(cfg: DataConfig, sources: list[tuple[int, SourceConfig]]) -> dict[str, list[Unit]]:
    return {s.resolved_name(): plan_units(s, s.resolved_name(), source_label(cfg, i), cfg.unit_bytes) for i, s in sources}


def _train(cfg: DataConfig, plans: dict[str, list[Unit]], weights: list[float], log: Log) -> Tokenizer:
    t0 = time.perf_counter()
    tok = train_tokenizer(_training_text(cfg, plans, weights), cfg.vocab_size)
    log(f"tokenizer: trained byte-level BPE, {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f}s")
    return tok


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _tokenizer(
    cfg: DataConfig, work: Path, given: Tokenizer | None, plans: dict[str, list[Unit]], weights: list[float], log: Log
) -> Tokenizer:
    """The preparation's tokenizer in ``work``: ``data.tokenizer`` copied (``given``, already
    loaded), kept from an interrupted run, or trained."""
    path = work / TOKENIZER_NAME
    if given is not None:
        assert cfg.tokenizer is not None
        files = TokenizerFiles.find(cfg.tokenizer)
        if files.config_json is not None:
            shutil.copyfile(files.config_json, work / CONFIG_NAME)
        tmp = work / f".{TOKENIZER_NAME}.tmp"
        shutil.copyfile(files.tokenizer_json, tmp)
        os.replace(tmp, path)
        return given
    if path.is_file():
        return load_tokenizer(path)
    tok = _train(cfg, plans, weights, log)
    _write_atomic(path, tok.to_str())
    return tok


def _clean_units(work: Path, name: str, keep: list[dict[str, Any]]) -> None:
    """Deletes the files of unfinished units (all inside the work directory)."""
    directory = unit_dir(work, name)
    if not directory.is_dir():
        return
    kept = {f"{r['unit']:06d}.json" for r in keep}
    for r in keep:
        for entry in r["splits"].values():
            kept.update(s["file"] for s in entry.get("shards", []))
            if "prefix" in entry:
                kept.update({f"{entry['prefix']}.bin", f"{entry['prefix']}.idx"})
    for path in directory.iterdir():
        if path.name not in kept:
            path.unlink()


# Worker processes: the context is installed once per process by the pool's initializer.
_CTX: UnitContext | None = None
_QUEUE: Any = None


def _init_worker(ctx: UnitContext, queue: Any) -> None:
    global _CTX, _QUEUE
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: --workers N means N cores
    _CTX, _QUEUE = ctx, queue


def _worker_task(unit: Unit) -> dict[str, Any]:
    assert _CTX is not None
    return process_unit(_CTX, unit, lambda nbytes, tokens: _QUEUE.put((nbytes, tokens)))


def _run_units(
    ctx: UnitContext, tok: Tokenizer, todo: list[Unit], workers: int, progress: PrepareProgress
) -> list[dict[str, Any]]:
    """Tokenizes ``todo`` (in process for one worker, on a pool of spawned processes otherwise)."""
    if workers == 1 or len(todo) <= 1:
        use_tokenizer(ctx.tokenizer_path, tok)
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, like one worker process
        try:
            return [process_unit(ctx, unit, progress.update) for unit in todo]
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    mp = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    queue = mp.Queue()
    records: list[dict[str, Any]] = []

    def drain() -> None:
        while True:
            try:
                progress.update(*queue.get_nowait())
            except Empty:
                return

    with ProcessPoolExecutor(workers, mp_context=mp, initializer=_init_worker, initargs=(ctx, queue)) as pool:
        pending: set[Future] = {pool.submit(_worker_task, unit) for unit in todo}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    records.append(future.result())  # re-raises a worker's DataError
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    drain()
    return records


def _source_summary(name: str, where: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = {k: sum(r["skipped"][k] for r in records) for k in ("unreadable", "empty")}
    documents = sum(r["documents"] for r in records)
    if documents == 0:
        raise DataError(
            f"source {name}: corpus is empty: no readable UTF-8 text among {where} "
            f"({skipped['unreadable']} unreadable, {skipped['empty']} empty skipped)"
        )
    return {"documents": documents, "bytes": sum(r["bytes"] for r in records), "skipped": skipped}


def _merge_modmoe(records: list[dict[str, Any]], split: str) -> dict[str, Any]:
    return {
        "num_tokens": sum(r["splits"][split]["num_tokens"] for r in records),
        "num_documents": sum(r["splits"][split]["num_documents"] for r in records),
        "shards": [s for r in records for s in r["splits"][split]["shards"]],
    }


def _merge_megatron(work: Path, name: str, records: list[dict[str, Any]], split: str, dtype: type) -> dict[str, Any]:
    """Concatenates the units' pairs into one ``<split>_text_document`` pair (megatron-core's
    own ``add_index``)."""
    base = work / "sources" / name
    final = f"{split}_text_document"
    tmp = str(base / f".{final}.tmp")
    writer = MegatronWriter(tmp, dtype)
    for r in records:
        entry = r["splits"][split]
        writer.add_index(str(unit_dir(work, name) / entry["prefix"]), entry["num_tokens"], entry["num_documents"])
    writer.close()
    out: dict[str, Any] = {
        "prefix": f"sources/{name}/{final}",
        "num_tokens": writer.num_tokens,
        "num_documents": writer.num_documents,
    }
    for suffix in ("bin", "idx"):
        os.replace(f"{tmp}.{suffix}", base / f"{final}.{suffix}")
        out[f"{suffix}_sha256"] = sha256_file(base / f"{final}.{suffix}")
    return out


def _check_splits(name: str, splits: dict[str, Any], val_fraction: float) -> None:
    for split, entry in splits.items():
        if entry["num_documents"] == 0:
            total = sum(e["num_documents"] for e in splits.values())
            raise DataError(
                f"source {name}: no document fell into the {split} split ({total} documents, data.val_fraction = "
                f"{val_fraction}); add documents or change data.val_fraction"
            )


def prepare_data(
    cfg: DataConfig, log: Log = print, workers: int | None = None, bar: bool | None = None
) -> PreparedData | None:
    """Prepares (or reuses) the sources of ``cfg`` in ``cfg.prepared_dir`` with ``workers``
    processes (default ``cfg.prepare_workers``). Returns None when every source is a Megatron
    dataset (read in place, nothing to prepare)."""
    sources = prepared_sources(cfg)
    if not sources:
        log("data: every source is a Megatron indexed dataset, read in place: nothing to prepare")
        return None
    workers = workers or cfg.prepare_workers
    target = Path(cfg.prepared_dir).expanduser().resolve()
    with os_errors_in_one_line(f"data prepare into {target} failed"):  # read-only, full: one line
        return _prepare(cfg, target, workers, bar, log)


def _prepare(cfg: DataConfig, target: Path, workers: int, bar: bool | None, log: Log) -> PreparedData:
    sources = prepared_sources(cfg)
    given = None
    if cfg.tokenizer:  # a bad tokenizer or a missing separator is refused before any work
        given = load_tokenizer(cfg.tokenizer)
        document_separator(given, cfg.tokenizer, cfg.eos_token)
    fields = fingerprint_fields(cfg)
    wanted = fingerprint(fields)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        clear_leftovers(target)
        found = _existing_fingerprint(target)
        if found == wanted:
            damage = PreparedData.load(target).damage()
            if damage is None:
                log(f"data: reusing {target} (fingerprint {wanted})")
                return PreparedData.load(target)
            log(f"data: the preparation in {target} is damaged ({damage}): preparing it again")
        log(f"data: preparing {target} (fingerprint {wanted}" + (f", replacing {found})" if found else ")"))
        work = _work_dir(target, wanted, log)
        if not _finished_index(work, wanted):
            _build(cfg, work, given, sources, fields, wanted, workers, bar, log)
        elif cfg.output_format == "megatron":  # killed after the index, while removing merged units
            for _, src in sources:
                shutil.rmtree(unit_dir(work, src.resolved_name()), ignore_errors=True)
        install(work, target)
    return PreparedData.load(target)


def _finished_index(work: Path, wanted: str) -> bool:
    try:
        return read_index(work).get("fingerprint") == wanted
    except DataError:
        return False


def _build(
    cfg: DataConfig,
    work: Path,
    given: Tokenizer | None,
    sources: list[tuple[int, SourceConfig]],
    fields: dict[str, Any],
    wanted: str,
    workers: int,
    bar: bool | None,
    log: Log,
) -> None:
    """Tokenizes every unfinished unit into ``work`` and writes the index (last)."""
    t0 = time.perf_counter()
    plans = {
        s.resolved_name(): plan_units(s, s.resolved_name(), source_label(cfg, i), cfg.unit_bytes) for i, s in sources
    }
    tok = _tokenizer(cfg, work, given, plans, [s.weight for _, s in sources], log)
    if cfg.tokenizer or cfg.eos_token is not None:
        eos_token, eos_id = document_separator(tok, cfg.tokenizer or work / TOKENIZER_NAME, cfg.eos_token)
    else:
        eos_token, eos_id = EOT, int(tok.token_to_id(EOT))
    vocab = vocab_bound(tok)
    megatron = cfg.output_format == "megatron"
    dtype = writer_dtype(vocab) if megatron else token_dtype(vocab)
    ctx = UnitContext(
        root=str(work),
        tokenizer_path=str(work / TOKENIZER_NAME),
        eos_id=eos_id,
        dtype=dtype.__name__ if megatron else dtype.str,
        output_format=cfg.output_format,
        shard_tokens=cfg.shard_tokens,
        val_fraction=cfg.val_fraction,
        max_document_bytes=cfg.max_document_bytes,
        max_compression_ratio=cfg.max_compression_ratio,
    )
    units = [u for plan in plans.values() for u in plan]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # verifying kept units reads their files
        found = list(pool.map(lambda u: finished_record(work, u, cfg.output_format), units))
    kept = {(u.source, u.index): r for u, r in zip(units, found) if r is not None}
    for name in plans:
        _clean_units(work, name, [r for (src, _), r in kept.items() if src == name])
    todo = [u for u in units if (u.source, u.index) not in kept]
    total = sum(u.nbytes for u in todo)
    log(
        f"data: {len(plans)} source(s), {len(units)} work unit(s)"
        + (f" ({len(kept)} kept from the interrupted run)" if kept else "")
        + f", {total / 1e6:,.1f} MB to tokenize on {min(workers, max(1, len(todo)))} worker(s)"
    )
    progress = PrepareProgress(total, log, bar=bar)
    try:
        for record in _run_units(ctx, tok, todo, workers, progress):
            kept[(record["source"], record["unit"])] = record
    finally:
        progress.close()
    mb_s, tok_s = progress.rates()
    index: dict[str, Any] = {
        "producer": PRODUCER,
        "format_version": FORMAT_VERSION,
        "fingerprint": wanted,
        "fingerprint_fields": fields,
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": vocab,
        "eos_token": eos_token,
        "eot_id": eos_id,
        "pad_id": tok.token_to_id(PAD),
        "output_format": cfg.output_format,
        "dtype": dtype.__name__ if megatron else dtype_name(dtype),
        "sources": {},
    }
    for i, src in sources:
        name = src.resolved_name()
        records = [kept[(name, u.index)] for u in plans[name]]
        entry = _source_summary(name, _where(cfg, i, src), records)
        log(
            f"corpus {name}: {entry['documents']} documents, {entry['bytes']:,} bytes from {_where(cfg, i, src)} "
            f"({entry['skipped']['unreadable']} unreadable/binary skipped)"
        )
        entry["max_token_id"] = max(r["max_token_id"] for r in records)
        if megatron:
            entry["splits"] = {split: _merge_megatron(work, name, records, split, dtype) for split in SPLITS}
        else:
            entry["splits"] = {split: _merge_modmoe(records, split) for split in SPLITS}
        _check_splits(name, entry["splits"], cfg.val_fraction)
        index["sources"][name] = entry
    _write_atomic(work / INDEX_NAME, json.dumps(index, indent=1))
    if megatron:  # the units' pairs are now inside the merged pairs
        for name in plans:
            shutil.rmtree(unit_dir(work, name))
    for name, entry in index["sources"].items():
        s = entry["splits"]
        log(
            f"data: {name}: {s['train']['num_tokens']:,} train tokens, {s['val']['num_tokens']:,} val tokens "
            f"({s['val']['num_documents']} documents), {index['dtype']}"
        )
    log(f"data: tokenized at {mb_s:.2f} MB/s, {tok_s:,.0f} tokens/s; total {time.perf_counter() - t0:.1f}s")


def _where(cfg: DataConfig, position: int, src: SourceConfig) -> str:
    if src.resolved_kind() == "stdlib":
        return f"the standard library at {stdlib_root()}"
    return f"{source_label(cfg, position)} = {src.path!r}"
