"""Every corpus format prepares to the same tokens as the same text given as files, with any
Hugging Face tokenizer (here a 128k-vocabulary one: uint32 shards); bad records are one line
naming the file and line or row, and leave no prepared directory behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import END_OF_TEXT, write_hf_dataset, write_jsonl, write_parquet, write_text_files

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.data import DataConfig, DataError, PreparedData, prepare_data

pytest.importorskip("datasets")
pytest.importorskip("zstandard")


def prepare(tmp_path: Path, tokenizer: Path, path: str, name: str = "src", **data) -> PreparedData:
    cfg = DataConfig(
        sources=[{"path": path, "name": name, **data.pop("source", {})}],
        tokenizer=str(tokenizer),
        prepared_dir=str(tmp_path / f"prep-{name}"),
        val_fraction=0.25,
        **data,
    )
    prepared = prepare_data(cfg, log=lambda _: None)
    assert prepared is not None
    return prepared


def streams(prepared: PreparedData) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "val"):
        s = prepared.open(split)
        out[split] = s.read(0, s.num_tokens)
    return out


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def test_llama_style_tokenizer_gives_uint32_shards_and_its_own_separator(tmp_path, llama_tokenizer, texts):
    prepared = prepare(tmp_path, llama_tokenizer, write_text_files(tmp_path / "txt", texts))
    assert prepared.index["dtype"] == "uint32" and prepared.vocab_size == 128_256
    assert prepared.eos_token == END_OF_TEXT and prepared.eot_id == 128_001
    assert (prepared.dir / "tokenizer_config.json").is_file()  # travels with tokenizer.json
    tokens = streams(prepared)
    both = np.concatenate(list(tokens.values()))
    assert both.dtype == np.dtype("<u4") and both.max() >= 128_002  # ids above 65,535 are stored
    # One separator per document: the literal "<|end_of_text|>" inside documents is text.
    assert int((both == 128_001).sum()) == len(texts)
    tok = prepared.load_tokenizer()
    docs = np.split(tokens["train"], np.flatnonzero(tokens["train"] == 128_001) + 1)[:-1]
    assert all(tok.decode(d[:-1].tolist(), skip_special_tokens=False) in texts for d in docs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_tokenizer, texts) -> dict[str, np.ndarray]:
    """The texts as one text file each."""
    tmp = tmp_path_factory.mktemp("reference")
    return streams(prepare(tmp, llama_tokenizer, write_text_files(tmp / "txt", texts), "txt"))


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf"])
def test_each_format_gives_the_tokens_of_the_same_text_files(tmp_path, llama_tokenizer, texts, reference, fmt):
    if fmt == "parquet":
        path = write_parquet(tmp_path / "p" / "part-0.parquet", texts[:17], row_group_size=5)
        write_parquet(tmp_path / "p" / "part-1.parquet", texts[17:], row_group_size=5)
        path = path.parent
    elif fmt == "hf":
        path = write_hf_dataset(tmp_path / "hf", texts)
    else:
        path = write_jsonl(tmp_path / f"corpus.{fmt}", texts)
    # Small work units: byte ranges of the plain JSONL, single row groups, row ranges.
    got = streams(prepare(tmp_path, llama_tokenizer, str(path), fmt.replace(".", "-"), unit_bytes=20_000))
    for split in ("train", "val"):
        np.testing.assert_array_equal(got[split], reference[split])


def test_text_field_and_dataset_dict_split(tmp_path, llama_tokenizer, texts, reference):
    import datasets

    jsonl = write_jsonl(tmp_path / "c.jsonl", texts, field="content")
    got = streams(prepare(tmp_path, llama_tokenizer, str(jsonl), "content", source={"text_field": "content"}))
    np.testing.assert_array_equal(got["train"], reference["train"])
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": texts}), "test": datasets.Dataset.from_dict({"text": ["x"]})}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    got = streams(prepare(tmp_path, llama_tokenizer, str(tmp_path / "dd"), "dd"))
    np.testing.assert_array_equal(got["val"], reference["val"])


# --- bad data: one line naming the file and the line or row; nothing half-written ------------


def bad_jsonl(tmp_path: Path, lines: list[str], name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "lines, fragments",
    [
        (['{"text": "ok"}', '{"body": "no text here", "id": 3}'], [":2:", "'text' is missing", "keys: body, id"]),
        (['{"text": "ok"}', '{"text": "ok"}', '{"text": 17}'], [":3:", "'text' is int, expected a string"]),
        (['{"text": "ok"', "x"], [":1:", "not valid JSON"]),
        (['["a", "list"]'], [":1:", "a JSON list, expected an object"]),
    ],
)
def test_bad_jsonl_records(tmp_path, small_tokenizer, lines, fragments):
    path = bad_jsonl(tmp_path, lines)
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(path))
    assert_one_line(err, str(path), *fragments)
    assert not (tmp_path / "prep-src").exists()


def test_bad_record_in_a_later_byte_range_names_its_line(tmp_path, small_tokenizer, texts):
    lines = [json.dumps({"text": t}) for t in texts] + ['{"text": null}']
    path = bad_jsonl(tmp_path, lines)
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(path), unit_bytes=8192)  # the bad line is in a later range
    assert_one_line(err, f"{path}:{len(texts) + 1}:", "null")


def test_too_long_line_is_refused(tmp_path, small_tokenizer):
    path = bad_jsonl(tmp_path, ['{"text": "short"}', json.dumps({"text": "a" * 5000})])
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(path), max_document_bytes=2048)
    assert_one_line(err, f"{path}:2:", "max_document_bytes")


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_undecodable_compression(tmp_path, small_tokenizer, texts, suffix):
    good = write_jsonl(tmp_path / f"good.jsonl.{suffix}", texts)
    path = tmp_path / f"bad.jsonl.{suffix}"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a truncated download
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(path))
    assert_one_line(err, str(path), f"undecodable {'gzip' if suffix == 'gz' else 'zstd'} data")
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(b'{"text": "not compressed"}\n')
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(not_gzip), "plain")
    assert_one_line(err, str(not_gzip), "undecodable gzip data")


def test_bad_parquet_and_dataset_columns(tmp_path, small_tokenizer, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(tmp_path / "a.parquet"), "a")
    assert_one_line(err, "a.parquet", "no column 'text'", "columns: body")
    pq.write_table(pa.table({"text": list(range(5))}), tmp_path / "b.parquet")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(tmp_path / "b.parquet"), "b")
    assert_one_line(err, "b.parquet", "column 'text' has type int64")
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "c.parquet", row_group_size=2)
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(tmp_path / "c.parquet"), "c")
    assert_one_line(err, "c.parquet: row 2", "null")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(tmp_path / "d.parquet"), "d")
    assert_one_line(err, "d.parquet", "not a readable Parquet file")
    hf = write_hf_dataset(tmp_path / "hf", texts, num_shards=1)
    with pytest.raises(DataError) as err:
        prepare(tmp_path, small_tokenizer, str(hf), "hf", source={"text_field": "body"})
    assert_one_line(err, str(hf), "no column 'body'")
    assert not any(p.name.startswith("prep-") for p in tmp_path.iterdir())


def test_blend_weight_must_be_positive(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data:\n  sources:\n    - {path: a.jsonl, weight: 0.3}\n    - {path: b.jsonl, weight: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert_one_line(err, "data.sources.1.weight = 0", "greater than 0")
    config.write_text("data:\n  sources:\n    - {path: a.jsonl, weight: -0.5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert_one_line(err, "data.sources.0.weight = -0.5")
    config.write_text("data:\n  sources:\n    - {path: a/x.jsonl}\n    - {path: b/x.jsonl}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert_one_line(err, "data.sources.1.name = 'x'", "unique")


def test_tokenizer_without_an_end_token_is_named(tmp_path, texts):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    tok.save(str(tmp_path / "bert-ish.json"))
    src = write_text_files(tmp_path / "txt", texts)
    with pytest.raises(DataError) as err:
        prepare(tmp_path, tmp_path / "bert-ish.json", src)
    assert_one_line(err, "bert-ish.json", "no end-of-sequence token", "[CLS], [SEP]", "data.eos_token")
    prepared = prepare(tmp_path, tmp_path / "bert-ish.json", src, eos_token="[SEP]")
    assert prepared.eos_token == "[SEP]" and prepared.eot_id == tok.token_to_id("[SEP]")
    assert prepared.index["dtype"] == "uint16"
    with pytest.raises(DataError) as err:
        prepare(tmp_path, tmp_path / "bert-ish.json", src, "other", eos_token="</s>")
    assert_one_line(err, "data.eos_token = '</s>'", "[CLS], [SEP]")
