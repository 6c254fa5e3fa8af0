"""Configuration of the corpus sources, tokenizer, preparation and sampler."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from modmoe.config_base import ConfigModel, field_error

SourceKind = Literal["auto", "stdlib", "text", "jsonl", "parquet", "hf", "megatron"]
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")  # a directory name in the preparation, never ".."
_GLOB_MAGIC = set("*?[")
MAX_WEIGHT_RATIO = 1e12  # beyond it the smallest source would never be drawn, and its sample times overflow


class SourceConfig(ConfigModel):
    """One corpus in ``data.sources``: where its text (or tokens) are, and its share of the blend."""

    path: str | None = None
    """A file, a directory, or a glob (``**`` allowed) of the source's files: text files, JSONL
    (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``), Parquet files, a directory written by Hugging
    Face ``save_to_disk``, or a Megatron indexed dataset (the prefix of a ``.bin``/``.idx`` pair,
    with or without the suffix). Not used by ``kind: stdlib``."""

    kind: SourceKind = "auto"
    """The format; ``auto`` decides from the path: ``.jsonl[.gz|.zst]`` -> jsonl, ``.parquet`` ->
    parquet, a directory holding ``dataset_info.json``/``dataset_dict.json`` -> hf, a ``.bin`` or
    ``.idx`` (or a prefix that has both) -> megatron, a directory by the first Parquet or JSONL
    file in it, anything else -> text."""

    name: str | None = None
    """Names the source in the prepared directory and in metrics (``data/tokens_<name>``).
    Default: the last path component without suffixes (``stdlib`` for the standard library)."""

    weight: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    """Share of the training samples (Megatron-style: weights are normalised over the sources).
    Changing weights does not re-prepare anything."""

    text_field: str = "text"
    """The JSONL key / Parquet or dataset column that holds each document's text."""

    hf_split: str | None = None
    """For a saved ``DatasetDict``: which split to read (default ``train``, or its only split)."""

    max_bytes: int | None = Field(default=None, ge=1)
    """Read at most this many input bytes of the source (files in sorted order; a text file or a
    plain JSONL file that crosses the limit is cut there, at a line for JSONL; compressed JSONL,
    Parquet and dataset sources stop after the file, row group or row range that crosses it).
    ``None`` = all of it."""

    val_path: str | None = None
    """Megatron sources only: the prefix of a separate validation ``.bin``/``.idx`` pair. Without
    it the last ``data.val_fraction`` of the tokens (cut at a document boundary) is held out."""

    def resolved_kind(self) -> str:
        """The format, with ``auto`` decided from the path."""
        if self.kind != "auto":
            return self.kind
        if self.path is None:
            return "stdlib"
        path = self.path.rstrip("/")
        lower = path.lower()
        if lower.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")):
            return "jsonl"
        if lower.endswith(".parquet"):
            return "parquet"
        if lower.endswith((".bin", ".idx")):
            return "megatron"
        p = Path(path).expanduser()
        if not _GLOB_MAGIC & set(path):
            if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
                return "hf"
            if Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file():
                return "megatron"
            if p.is_dir():  # a directory of one format: decided by the first data file found
                for found in p.rglob("*"):
                    name = found.name.lower()
                    if name.endswith(".parquet"):
                        return "parquet"
                    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
                        return "jsonl"
        return "text"

    def resolved_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.path is None:
            return "stdlib"
        last = Path(self.path.rstrip("/")).name
        stem = re.sub(r"[^A-Za-z0-9_.-]", "", last.split(".")[0]) or "source"
        return stem[:64]


class DataConfig(ConfigModel):
    corpus: Literal["stdlib", "files"] = "stdlib"
    """Single-corpus shorthand when ``sources`` is not set: ``stdlib`` = the running Python's
    standard-library ``.py`` files (present on every machine, no download); ``files`` = the text
    files matched by ``corpus_glob``."""

    corpus_glob: str | None = None
    """Glob (recursive ``**`` allowed) of text files, used when ``corpus = files``."""

    max_corpus_bytes: int = Field(default=12_000_000, ge=10_000)
    """Single-corpus shorthand: stop reading the corpus after this many bytes (files are taken
    in sorted path order, so the subset is deterministic). ``sources`` use ``max_bytes``."""

    sources: list[SourceConfig] | None = None
    """The corpora to blend, e.g. ``[{path: code/*.jsonl.zst, weight: 0.3}, {path: web/, weight:
    0.7}]``; ``None`` = the single corpus of ``corpus``. See docs/data.md."""

    tokenizer: str | None = None
    """A Hugging Face ``tokenizer.json``, or a directory holding one (with its
    ``tokenizer_config.json``); ``None`` trains a byte-level BPE of ``vocab_size`` tokens on the
    first ``tokenizer_train_bytes`` of the corpus. Required with Megatron sources."""

    eos_token: str | None = None
    """The document separator appended to every document; default: the tokenizer's own
    end-of-sequence token (``eos_token`` of ``tokenizer_config.json``, else a known end-of-text
    token such as ``<|endoftext|>``, ``<|end_of_text|>`` or ``</s>``)."""

    vocab_size: int = Field(default=4096, ge=260, le=(1 << 32) - 1)
    """Vocabulary size of the BPE trained on the corpus."""

    tokenizer_train_bytes: int = Field(default=16_000_000, ge=10_000)
    """At most this much text trains the BPE (taken from the sources in proportion to their
    weights), which bounds its time and memory on any corpus."""

    prepared_dir: str = "data/prepared"
    """Directory holding the tokenizer, the token shards and ``index.json``. A preparation whose
    fingerprint (the settings that change tokens) matches is reused instead of redone; only a
    directory modmoe prepared is ever replaced."""

    prepare: Literal["auto", "never"] = "auto"
    """Who prepares: ``auto`` = rank 0 of a single-node training job prepares (or reuses) the
    data before training; ``never`` = training only opens a finished preparation made by
    ``modmoe data prepare CONFIG`` (a multi-node job always behaves so)."""

    prepare_workers: int = Field(default=1, ge=1, le=1024)
    """Processes that tokenize when training prepares (``modmoe data prepare --workers N``
    overrides it)."""

    output_format: Literal["modmoe", "megatron"] = "modmoe"
    """Shard format written by preparation: modmoe token shards, or one Megatron indexed dataset
    (``<split>_text_document.bin/.idx``) per source and split that Megatron-LM reads as is
    (needs megatron-core). Training reads either."""

    shard_tokens: int = Field(default=4_000_000, ge=1024)
    """Maximum number of tokens per modmoe shard file."""

    unit_bytes: int = Field(default=16_000_000, ge=4096)
    """Input bytes per work unit of the preparation: units are tokenized in parallel, and a
    preparation killed midway keeps its finished units."""

    max_compression_ratio: float = Field(default=100.0, ge=1.0)
    """A compressed JSONL file (``.gz``, ``.zst``) may expand to at most this many times its
    size (plus 4 MiB): more is refused in one line as a likely decompression bomb. Real text
    compresses 3-10x."""

    max_document_bytes: int = Field(default=64 << 20, ge=1024)
    """Largest JSONL line or Parquet/dataset text value accepted; a longer one is refused in one
    line naming the file and row (text files are streamed and have no limit)."""

    val_fraction: float = Field(default=0.02, gt=0.0, lt=0.5)
    """Fraction of documents held out for validation (chosen by a hash of the document's text,
    so the split does not depend on file names or layout and is stable when the corpus grows)."""

    seq_len: int = Field(default=256, ge=8)
    """Tokens per training sequence (each sample holds ``seq_len + 1`` tokens: inputs and
    shifted targets)."""

    num_workers: int = Field(default=0, ge=0)
    """Background threads that prefetch batches (0 = in the training loop)."""

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        if self.sources is None:
            return self
        if not self.sources:
            raise field_error("data.sources", [], "list at least one source, or leave it unset")
        if self.corpus != "stdlib" or self.corpus_glob is not None:
            raise field_error(
                "data.corpus", self.corpus, "set either data.sources or data.corpus/corpus_glob, not both"
            )
        names: list[str] = []
        for i, src in enumerate(self.sources):
            where, kind = f"data.sources.{i}", src.resolved_kind()
            if src.name is not None and not _NAME.match(src.name):
                raise field_error(f"{where}.name", src.name, "use 1-64 letters, digits, '_', '.', '-', not starting with '.'")
            if kind != "stdlib" and not src.path:
                raise field_error(f"{where}.path", src.path, f"required for kind {kind!r}")
            if src.val_path is not None and kind != "megatron":
                raise field_error(f"{where}.val_path", src.val_path, "only Megatron sources take a validation prefix")
            if src.resolved_name() in names:
                raise field_error(f"{where}.name", src.resolved_name(), "source names must be unique (set name:)")
            names.append(src.resolved_name())
        weights = [s.weight for s in self.sources]
        if max(weights) / min(weights) > MAX_WEIGHT_RATIO:
            raise field_error(
                "data.sources.*.weight", weights, f"the largest may be at most {MAX_WEIGHT_RATIO:g} times the smallest"
            )
        kinds = [s.resolved_kind() for s in self.sources]
        if "megatron" in kinds and self.tokenizer is None:
            raise field_error(
                "data.tokenizer", None, "required with a Megatron source (the tokenizer that wrote its .bin)"
            )
        return self

    def source_list(self) -> list[SourceConfig]:
        """``sources``, or the single corpus of the shorthand fields as one source."""
        if self.sources is not None:
            return list(self.sources)
        if self.corpus == "stdlib":
            return [SourceConfig(kind="stdlib", max_bytes=self.max_corpus_bytes)]
        if not self.corpus_glob:
            raise field_error(
                "data.corpus_glob", self.corpus_glob, "set a glob of text files when data.corpus = 'files'"
            )
        return [SourceConfig(kind="text", path=self.corpus_glob, name="files", max_bytes=self.max_corpus_bytes)]
