"""Issue 24's data findings, each reproduced as the issue describes it: a prepared index whose
paths lead out of its directory (5), a zstd bomb (6), ``**`` globs through symlink loops (7), a
gzip of blank lines (8), JSONL lines no encoder takes (9), blend weights near the float maximum
(10), a damaged Megatron index (11), a deeply nested prepared index (13) and corpus paths that
are not regular files (16). Every test here failed on the code before the issue's changes."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from data_helpers import sample_texts, write_jsonl

from modmoe.data import DataConfig, DataError, PreparedData, prepare_data
from modmoe.data.blend import normalise
from modmoe.data.config import SourceConfig
from modmoe.data.inputs import source_files
from modmoe.data.prepare import corpus_documents

QUIET = {"log": lambda _: None}


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def _jsonl_config(tmp_path: Path, path: Path, **extra) -> DataConfig:
    return DataConfig(
        sources=[{"path": str(path), "name": "src"}],
        prepared_dir=str(tmp_path / "prepared"),
        vocab_size=300,
        tokenizer_train_bytes=10_000,
        val_fraction=0.2,
        **extra,
    )


# ---------------------------------------------------------------------------- finding 5
def _copy_prepared(small_data_dir: str, tmp_path: Path) -> Path:
    copy = tmp_path / "prepared"
    shutil.copytree(small_data_dir, copy)
    return copy


@pytest.mark.parametrize("where", ["absolute", "climbing"])
def test_issue24_5_an_index_whose_shard_leads_out_of_its_directory_is_refused(small_data_dir, tmp_path, where):
    copy = _copy_prepared(small_data_dir, tmp_path)
    index = json.loads((copy / "index.json").read_text())
    shard = index["sources"]["stdlib"]["splits"]["val"]["shards"][0]
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * shard["bytes"])  # the size the index promises: only the path is wrong
    shard["file"] = str(outside) if where == "absolute" else "../../../secret.bin"
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError) as err:
        PreparedData.load(copy).open("val")
    _one_line(err, "index.json", "shards.0.file")


def test_issue24_5_data_prepare_does_not_call_a_tampered_preparation_ready(small_data_dir, tmp_path):
    copy = _copy_prepared(small_data_dir, tmp_path)
    original = (copy / "index.json").read_text()
    index = json.loads(original)
    index["sources"]["stdlib"]["splits"]["train"]["shards"][0]["file"] = "../../elsewhere.bin"
    (copy / "index.json").write_text(json.dumps(index))
    lines: list[str] = []
    cfg = DataConfig(max_corpus_bytes=600_000, vocab_size=512, val_fraction=0.15, prepared_dir=str(copy), seq_len=64)
    prepared = prepare_data(cfg, log=lines.append)
    assert not any("reusing" in line for line in lines), lines
    assert json.loads((copy / "index.json").read_text())["fingerprint"] == json.loads(original)["fingerprint"]
    assert prepared.damage() is None and "../" not in (copy / "index.json").read_text()


# ---------------------------------------------------------------------------- finding 6
def test_issue24_6_a_zstd_bomb_is_refused_in_bounded_memory(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    bomb = tmp_path / "bomb.jsonl.zst"
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    with bomb.open("wb") as f:  # one 512 MiB line in a few tens of kB
        f.write(compressor.compress(b'{"text": "'))
        for _ in range(32):
            f.write(compressor.compress(b"a" * (16 << 20)))
        f.write(compressor.compress(b'"}\n') + compressor.flush())
    assert bomb.stat().st_size < 1 << 20
    cfg = _jsonl_config(tmp_path, bomb, max_document_bytes=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            list(corpus_documents(cfg))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _one_line(err, str(bomb), "max_document_bytes")
    assert peak < 96 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_issue24_6_a_compressed_file_may_expand_only_so_far(tmp_path):
    path = tmp_path / "big.jsonl.gz"
    line = json.dumps({"text": "word " * 200}).encode() + b"\n"
    with gzip.open(path, "wb") as f:
        for _ in range(40_000):  # ~40 MB of identical lines: a ratio of several hundred
            f.write(line)
    with pytest.raises(DataError) as err:
        list(corpus_documents(_jsonl_config(tmp_path, path)))
    _one_line(err, str(path), "data.max_compression_ratio")
    assert len(list(corpus_documents(_jsonl_config(tmp_path, path, max_compression_ratio=5000.0)))) == 40_000


# ---------------------------------------------------------------------------- finding 7
def _files_within(pattern: str, seconds: float) -> list[Path]:
    found: list = []
    worker = threading.Thread(
        target=lambda: found.append(source_files(SourceConfig(path=pattern, kind="text"), "text", "path")),
        daemon=True,
    )
    worker.start()
    worker.join(seconds)
    assert found, f"{pattern}: no answer within {seconds} s (a symlink loop followed?)"
    return found[0]


def test_issue24_7_a_recursive_glob_does_not_follow_directory_symlinks(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha")
    (corpus / "sub" / "b.txt").write_text("beta")
    os.symlink(".", corpus / "loop")
    assert _files_within(str(corpus / "**" / "*.txt"), 20) == [corpus / "a.txt", corpus / "sub" / "b.txt"]
    os.symlink(".", corpus / "sub" / "again")  # two self-links: exponential for a glob that follows them
    assert _files_within(str(corpus / "**" / "*.txt"), 20) == [corpus / "a.txt", corpus / "sub" / "b.txt"]
    assert _files_within(str(corpus), 20) == [corpus / "a.txt", corpus / "sub" / "b.txt"]


# ---------------------------------------------------------------------------- finding 8
def test_issue24_8_blank_lines_are_skipped_in_bulk(tmp_path):
    path = tmp_path / "blank.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        for _ in range(100):
            f.write(b"\n" * (1 << 20))  # 100 MiB of empty lines: 100 million readline calls before
        f.write(json.dumps({"text": "the only document"}).encode() + b"\n")
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:  # by default: refused as a bomb, at once
        list(corpus_documents(_jsonl_config(tmp_path, path)))
    _one_line(err, "data.max_compression_ratio")
    docs = list(corpus_documents(_jsonl_config(tmp_path, path, max_compression_ratio=1e6)))
    assert [d.text for d in docs] == ["the only document"] and docs[0].where.endswith(":104857601")
    assert time.perf_counter() - t0 < 20


# ---------------------------------------------------------------------------- finding 9
@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b'{"text": "ok \\ud800 here"}', "surrogate"),
        (b'{"text": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
        (b'{"text": "x", "n": ' + b"9" * 100_000 + b"}", "64 bits"),
        (b'{"text": "x", "n": 1e999}', "overflows"),
    ],
)
def test_issue24_9_jsonl_lines_no_encoder_takes_are_one_line(tmp_path, line, fragment):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join([json.dumps({"text": t}).encode() for t in sample_texts(4)] + [line]) + b"\n")
    with pytest.raises(DataError) as err:
        prepare_data(_jsonl_config(tmp_path, path), **QUIET)
    _one_line(err, f"{path}:5", fragment)


# ---------------------------------------------------------------------------- finding 10
def test_issue24_10_weights_near_the_float_maximum(tmp_path):
    assert normalise([1e308, 1e308]) == [0.5, 0.5]
    a, b = write_jsonl(tmp_path / "a.jsonl", sample_texts(6)), write_jsonl(tmp_path / "b.jsonl", sample_texts(8)[2:])
    cfg = DataConfig(
        sources=[{"path": str(a), "weight": 1e308}, {"path": str(b), "weight": 1e308}],
        prepared_dir=str(tmp_path / "prepared"),
        vocab_size=300,
        tokenizer_train_bytes=10_000,
        val_fraction=0.2,
    )
    assert prepare_data(cfg, **QUIET).source_names == ["a", "b"]
    from modmoe.config_base import ConfigError, validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(DataConfig, {"sources": [{"path": str(a), "weight": 1e308}, {"path": str(b), "weight": 1.0}]})
    _one_line(err, "weight", "times the smallest")


# ---------------------------------------------------------------------------- finding 11
def _megatron_pair(tmp_path: Path) -> str:
    pytest.importorskip("megatron.core")
    from data_helpers import write_megatron_pair

    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 300, 20), 0) for _ in range(10)]
    return write_megatron_pair(tmp_path / "ds_text_document", docs)


@pytest.mark.parametrize("use_core", [True, False])
def test_issue24_11_document_indices_past_the_sequences_are_refused(tmp_path, use_core):
    from modmoe.data.megatron_format import _HEADER, MegatronStream

    prefix = _megatron_pair(tmp_path)
    raw = bytearray(Path(f"{prefix}.idx").read_bytes())
    count = _HEADER.unpack_from(raw)[3]
    docs_at = _HEADER.size + count * 12
    raw[docs_at + 8 * 3 : docs_at + 8 * 4] = (10**6).to_bytes(8, "little")  # document 3 starts far past the end
    Path(f"{prefix}.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        stream = MegatronStream(prefix, use_core=use_core)
        stream.tail_split(0.3)
    _one_line(err, ".idx", "document indices")


def test_issue24_11_an_empty_bin_is_one_line_and_nothing_on_stderr(tmp_path, monkeypatch):
    from modmoe.data.megatron_format import MegatronStream

    prefix = _megatron_pair(tmp_path)
    Path(f"{prefix}.bin").write_bytes(b"")
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(DataError) as err:
        MegatronStream(prefix)
    import gc

    gc.collect()
    _one_line(err, ".bin", "empty")
    assert unraisable == []  # megatron-core's half-built reader printed "Exception ignored" twice


# ---------------------------------------------------------------------------- finding 13
def test_issue24_13_a_deeply_nested_prepared_index_is_one_line(small_data_dir, tmp_path):
    copy = _copy_prepared(small_data_dir, tmp_path)
    (copy / "index.json").write_text('{"producer": "modmoe.data", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError) as err:
        PreparedData.load(copy)
    _one_line(err, "index.json", "nested deeper")


# ---------------------------------------------------------------------------- finding 16
def test_issue24_16_paths_that_are_not_regular_files_say_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.txt"
    os.symlink(loop, loop)
    for path, fragment in ((fifo, "FIFO"), (Path("/dev/zero"), "device"), (loop, "symlink loop")):
        with pytest.raises(DataError) as err:
            source_files(SourceConfig(path=str(path), kind="text"), "text", "data.sources.0.path")
        _one_line(err, str(path), fragment)
    (tmp_path / "real.txt").write_text("text")
    assert source_files(SourceConfig(path=str(tmp_path / "*.txt"), kind="text"), "text", "x") == [tmp_path / "real.txt"]
