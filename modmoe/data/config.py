"""Configuration of the corpus, tokenizer, token shards and sampler."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from modmoe.config_base import ConfigModel


class DataConfig(ConfigModel):
    corpus: Literal["stdlib", "files"] = "stdlib"
    """Where raw text comes from: ``stdlib`` = the running Python's standard-library ``.py``
    files (present on every machine, no download); ``files`` = the files matched by
    ``corpus_glob``."""

    corpus_glob: str | None = None
    """Glob (recursive ``**`` allowed) of text files, used when ``corpus = files``."""

    max_corpus_bytes: int = Field(default=12_000_000, ge=10_000)
    """Stop reading the corpus after this many bytes (files are taken in sorted path order,
    so the subset is deterministic)."""

    tokenizer: str | None = None
    """Path of an existing ``tokenizer.json`` to load; ``None`` trains a byte-level BPE on the
    corpus with ``vocab_size`` tokens."""

    vocab_size: int = Field(default=4096, ge=260, le=65535)
    """Vocabulary size of the BPE trained on the corpus (token ids are stored as uint16)."""

    prepared_dir: str = "data/prepared"
    """Directory holding the tokenizer, the token shards and ``index.json``. A preparation
    whose fingerprint (the fields above) matches is reused instead of redone."""

    shard_tokens: int = Field(default=4_000_000, ge=1024)
    """Maximum number of tokens per shard file."""

    val_fraction: float = Field(default=0.02, gt=0.0, lt=0.5)
    """Fraction of documents held out for validation (chosen by a hash of the path, so the
    split is stable when the corpus grows)."""

    seq_len: int = Field(default=256, ge=8)
    """Tokens per training sequence (each sample holds ``seq_len + 1`` tokens: inputs and
    shifted targets)."""

    num_workers: int = Field(default=0, ge=0)
    """Background threads that prefetch batches (0 = in the training loop)."""
