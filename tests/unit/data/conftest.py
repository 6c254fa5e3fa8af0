"""Fixtures of the data tests: real texts and a locally built Llama-3-style tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import llama_like_tokenizer, sample_texts


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return sample_texts(30)


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory, texts) -> Path:
    """A 128,256-token tokenizer directory whose end token is <|end_of_text|> (id 128001)."""
    return llama_like_tokenizer(tmp_path_factory.mktemp("llama-tok"), texts)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, texts) -> Path:
    """A 300-token byte-level BPE (modmoe's own trainer) for tests where the tokenizer does not matter."""
    from modmoe.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("small-tok") / "tokenizer.json"
    train_tokenizer(texts, 300).save(str(path))
    return path
