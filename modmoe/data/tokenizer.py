"""The byte-level BPE tokenizer: trained on the corpus, or loaded from a ``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modmoe.data.errors import DataError

EOT = "<|endoftext|>"
"""Separates documents in the token stream."""
PAD = "<|pad|>"
"""Padding for batched generation and export; never appears in the prepared shards."""
SPECIAL_TOKENS = (EOT, PAD)
MAX_VOCAB = 1 << 16  # token ids are stored as uint16


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (every byte is in the base alphabet, so any text encodes) with the
    special tokens at ids 0 and 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a ``tokenizer.json``; it must know ``<|endoftext|>`` and fit uint16 ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path}: not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception for bad JSON / schema
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"tokenizer file {path}: not a readable tokenizer.json ({first_line})") from None
    if tok.token_to_id(EOT) is None:
        raise DataError(f"tokenizer file {path}: has no {EOT} token (needed as the document separator)")
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > MAX_VOCAB:
        raise DataError(f"tokenizer file {path}: vocabulary of {size} tokens does not fit uint16 ids (max {MAX_VOCAB})")
    return tok
