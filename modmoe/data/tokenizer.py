"""Tokenizers: any Hugging Face ``tokenizer.json`` (or a directory with one), its document
separator, the token storage type its vocabulary needs, and the byte-level BPE trained when the
config names none."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modmoe.config_json import JSONInputError, parse_json, read_json
from modmoe.data.errors import DataError
from modmoe.file_paths import not_regular_problem

EOT = "<|endoftext|>"
"""The separator of the BPE modmoe trains."""
PAD = "<|pad|>"
"""Padding for batched generation and export; never appears in the prepared shards."""
SPECIAL_TOKENS = (EOT, PAD)
MAX_VOCAB = (1 << 32) - 1  # token ids are stored as uint32 at most
UINT16_VOCAB = 1 << 16
KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""End-of-text tokens recognised when ``tokenizer_config.json`` names none (GPT-2/Qwen, Llama-3,
Llama-2/Mistral/T5, Gemma, others)."""
CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_NAME = "tokenizer.json"
_TRAIN_PIECE_CHARS = 1 << 16
MAX_TOKENIZER_BYTES = 256 << 20  # the largest published tokenizer.json files are ~30 MB
_MAX_CONFIG_BYTES = 16 << 20
_TOKENIZER_DEPTH = 32  # a tokenizer.json nests ~6 deep (normalizer sequences a few more)  # the BPE trainer sees documents in pieces of at most this size


@dataclass(frozen=True)
class TokenizerFiles:
    """Where a tokenizer lives: its ``tokenizer.json`` and, when present, ``tokenizer_config.json``."""

    tokenizer_json: Path
    config_json: Path | None

    @classmethod
    def find(cls, path: str | Path) -> TokenizerFiles:
        """``path`` is a ``tokenizer.json`` or a directory holding one."""
        path = Path(path).expanduser()
        if path.is_dir():
            tok = path / TOKENIZER_NAME
            if not tok.is_file():
                raise DataError(f"tokenizer directory {path}: has no {TOKENIZER_NAME}")
        elif (why := not_regular_problem(path)) is None:
            tok = path
        else:
            raise DataError(f"tokenizer file {path}: {'not found' if why.startswith('no such') else why}")
        config = tok.parent / CONFIG_NAME
        return cls(tok, config if config.is_file() else None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def vocab_bound(tok: Tokenizer) -> int:
    """One more than the largest token id (ids of added tokens may lie above the base vocabulary)."""
    bound = max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_added_tokens_decoder(), default=-1) + 1)
    if tok.id_to_token(bound) is not None:  # sparse ids: look at all of them (slower)
        bound = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    return bound


def token_dtype(vocab: int) -> np.dtype:
    """Little-endian uint16 when every id fits, uint32 otherwise (fixed byte order, so shards
    move between machines)."""
    if vocab > MAX_VOCAB:
        raise DataError(f"vocabulary of {vocab} tokens does not fit uint32 ids (max {MAX_VOCAB})")
    return np.dtype("<u2") if vocab <= UINT16_VOCAB else np.dtype("<u4")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a ``tokenizer.json`` (or the one in a directory); any vocabulary up to 2^32 - 1."""
    files = TokenizerFiles.find(path)
    source = f"tokenizer file {files.tokenizer_json}"
    try:  # bounded and checked here first: the library is handed only JSON that passed
        text = read_json_text(files.tokenizer_json, source)
        tok = Tokenizer.from_str(text)
    except DataError:
        raise
    except Exception as err:  # the library raises a bare Exception for bad JSON / schema
        raise DataError(
            f"tokenizer file {files.tokenizer_json}: not a readable tokenizer.json ({_first_line(err)})"
        ) from None
    size = vocab_bound(tok)
    if size > MAX_VOCAB:
        raise DataError(f"tokenizer file {files.tokenizer_json}: vocabulary of {size} tokens does not fit uint32 ids")
    return tok


def read_json_text(path: Path, source: str) -> str:
    """The text of a tokenizer file, once it parsed within :data:`MAX_TOKENIZER_BYTES` and
    :data:`_TOKENIZER_DEPTH` (modmoe.config_json)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TOKENIZER_BYTES + 1)
        if len(data) > MAX_TOKENIZER_BYTES:
            raise DataError(f"{source}: more than {MAX_TOKENIZER_BYTES} bytes")
        parse_json(data, source, _TOKENIZER_DEPTH)
    except JSONInputError as err:
        raise DataError(f"{err}") from None
    except OSError as err:
        raise DataError(f"{source}: cannot be read ({err.strerror})") from None
    return data.decode("utf-8")


def _config_eos(config_json: Path | None) -> str | None:
    if config_json is None:
        return None
    try:
        config = read_json(config_json, _MAX_CONFIG_BYTES)
    except JSONInputError as err:
        raise DataError(str(err)) from None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def special_tokens(tok: Tokenizer) -> list[str]:
    return [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]


def document_separator(tok: Tokenizer, path: str | Path, override: str | None = None) -> tuple[str, int]:
    """The end-of-sequence token appended to every document, and its id: ``override``
    (``data.eos_token``), else the ``eos_token`` of ``tokenizer_config.json``, else the first of
    :data:`KNOWN_EOS` the tokenizer has."""
    files = TokenizerFiles.find(path)
    specials = special_tokens(tok)
    shown = ", ".join(specials[:12]) + (f", … ({len(specials)} in all)" if len(specials) > 12 else "")
    defines = f"its special tokens are: {shown}" if specials else "it defines no special tokens"
    if override is not None:
        if tok.token_to_id(override) is None:
            raise DataError(f"data.eos_token = {override!r}: not a token of {files.tokenizer_json} ({defines})")
        return override, int(tok.token_to_id(override))
    named = _config_eos(files.config_json)
    if named is not None:
        if tok.token_to_id(named) is None:
            raise DataError(f"{files.config_json}: eos_token {named!r} is not a token of {files.tokenizer_json}")
        return named, int(tok.token_to_id(named))
    for candidate in KNOWN_EOS:
        if tok.token_to_id(candidate) is not None:
            return candidate, int(tok.token_to_id(candidate))
    raise DataError(
        f"tokenizer {files.tokenizer_json}: no end-of-sequence token (no eos_token in {CONFIG_NAME}, none of "
        f"{', '.join(KNOWN_EOS)}); {defines}; set data.eos_token"
    )


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    """Documents cut into bounded pieces: a document of hundreds of MB with no whitespace
    costs the trainer no more than many small ones."""
    for text in texts:
        for start in range(0, len(text), _TRAIN_PIECE_CHARS):
            yield text[start : start + _TRAIN_PIECE_CHARS]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (every byte is in the base alphabet, so any text encodes) with the
    special tokens at ids 0 and 1. The caller bounds the amount of text
    (``data.tokenizer_train_bytes``), which bounds time and memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=64,  # no token for a 10,000-character run of one letter
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(texts), trainer)
    return tok
