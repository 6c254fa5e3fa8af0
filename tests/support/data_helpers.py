"""Corpora and tokenizers the data tests build locally (nothing is downloaded): a Llama-3-style
128,256-token tokenizer, the same texts as text files, JSONL (plain, gzip, zstd), Parquet and a
saved Hugging Face dataset, and Megatron pairs written by megatron-core's own builder."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modmoe.data.inputs import stdlib_root

LLAMA_VOCAB = 128_256
END_OF_TEXT = "<|end_of_text|>"
HIGH_ID_WORDS = ("zebracorn", "quasarflux")
"""Added tokens with ids above 65,535: text containing them needs uint32 shards."""


def sample_texts(count: int = 40, max_chars: int = 6000) -> list[str]:
    """Real text: the first ``count`` standard-library modules (sorted), cut to ``max_chars``,
    with a word whose token id is above 65,535 in every third one."""
    files = sorted(stdlib_root().glob("*.py"))[:count]
    texts = []
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8")[:max_chars]
        texts.append(text + (f"\n# {HIGH_ID_WORDS[i % 2]} {END_OF_TEXT}\n" if i % 3 == 0 else ""))
    return texts


def llama_like_tokenizer(directory: Path, texts: Sequence[str]) -> Path:
    """A byte-level BPE trained on ``texts``, widened to Llama-3's 128,256 ids: unused fillers,
    ``<|begin_of_text|>``/``<|end_of_text|>`` at 128000/128001, two ordinary added words and
    reserved special tokens above; ``tokenizer_config.json`` names ``<|end_of_text|>`` as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), 128_000):
        vocab[f"<unused_{i}>"] = i

    def added(i: int, content: str, special: bool) -> dict:
        flags = {"single_word": False, "lstrip": False, "rstrip": False}
        return {"id": i, "content": content, **flags, "normalized": not special, "special": special}

    spec["added_tokens"] = (
        [added(128_000, "<|begin_of_text|>", True), added(128_001, END_OF_TEXT, True)]
        + [added(128_002 + k, w, False) for k, w in enumerate(HIGH_ID_WORDS)]
        + [added(128_002 + k, f"<|reserved_special_token_{k}|>", True) for k in range(2, LLAMA_VOCAB - 128_002)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(spec)).save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": END_OF_TEXT, "model_max_length": 131072}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def write_text_files(directory: Path, texts: Sequence[str]) -> str:
    """One file per text, named so that sorted order is the texts' order; returns a glob."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (directory / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    return str(directory / "*.txt")


def jsonl_bytes(texts: Sequence[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()


def write_jsonl(path: Path, texts: Sequence[str], field: str = "text") -> Path:
    """``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` by the path's suffix."""
    data = jsonl_bytes(texts, field)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, texts: Sequence[str], row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(texts))), "text": list(texts)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf_dataset(path: Path, texts: Sequence[str], num_shards: int = 2) -> Path:
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": list(texts)}).save_to_disk(
        str(path), num_shards=num_shards
    )
    return path


def write_megatron_pair(prefix: Path, documents: Sequence[np.ndarray], dtype: type = np.int32) -> str:
    """A ``.bin``/``.idx`` pair written by megatron-core's ``IndexedDatasetBuilder`` (one sequence
    per document, as ``preprocess_data.py`` writes); returns the prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)
