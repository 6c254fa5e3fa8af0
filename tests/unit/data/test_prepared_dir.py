"""Only modmoe's own preparations are ever replaced or deleted (issue 14, finding 2): a directory
that merely looks prepared is refused in one line naming it, and stays byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modmoe.data import DataConfig, DataError, PreparedData, prepare_data
from modmoe.data.ownership import MARKER

SMALL = dict(max_corpus_bytes=60_000, vocab_size=300, val_fraction=0.3)


def cfg(directory: Path, **extra) -> DataConfig:
    return DataConfig(prepared_dir=str(directory), **{**SMALL, **extra})


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(config: DataConfig, path: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare_data(config, log=lambda _: None)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "refusing" in text, text


def test_unrelated_index_json_with_other_files_is_refused_not_deleted(tmp_path):
    target = tmp_path / "results"
    (target / "runs").mkdir(parents=True)
    (target / "index.json").write_text(json.dumps({"format_version": 1, "fingerprint": "x", "pages": [1, 2]}))
    (target / "notes.txt").write_text("my thesis")
    (target / "runs" / "a.csv").write_text("1,2,3")
    before = snapshot(target)
    refused(cfg(target), target)
    assert snapshot(target) == before


def test_damaged_own_preparation_is_replaced_but_a_copy_with_foreign_files_is_not(tmp_path):
    target = tmp_path / "prep"
    first = prepare_data(cfg(target), log=lambda _: None)
    (target / "index.json").write_text("{damaged")  # ours (marker), damaged: prepared again
    again = prepare_data(cfg(target), log=lambda _: None)
    assert again.fingerprint == first.fingerprint and PreparedData.load(target).open("train").num_tokens > 0
    (target / MARKER).unlink()  # not marked any more, and holds more than the old format's files
    refused(cfg(target, val_fraction=0.2), target)
    assert (target / "index.json").is_file()


def format_1_preparation(target: Path, extra: str | None = None) -> None:
    """The layout of a preparation made before the marker existed (index, tokenizer, shards)."""
    target.mkdir()
    shard = {"file": "train_00000.bin", "tokens": 2, "bytes": 4, "sha256": "0" * 64}
    index = {"format_version": 1, "fingerprint": "abc", "fingerprint_fields": {}, "splits": {"train": {"shards": [shard]}}}
    (target / "index.json").write_text(json.dumps(index))
    (target / "tokenizer.json").write_text("{}")
    (target / "train_00000.bin").write_bytes(b"\0\0\0\0")
    if extra:
        (target / extra).write_text("keep")


def test_format_1_preparation_is_recognised_and_replaced(tmp_path):
    format_1_preparation(tmp_path / "old")
    prepared = prepare_data(cfg(tmp_path / "old"), log=lambda _: None)
    assert prepared.index["format_version"] == 2 and (tmp_path / "old" / MARKER).is_file()
    # The same layout plus a file the old index does not name is not recognised.
    format_1_preparation(tmp_path / "old2", extra="mine.txt")
    before = snapshot(tmp_path / "old2")
    refused(cfg(tmp_path / "old2"), tmp_path / "old2")
    assert snapshot(tmp_path / "old2") == before


def test_file_foreign_work_directory_and_leftovers_are_left_alone(tmp_path):
    target = tmp_path / "data"
    target.write_text("a file")
    with pytest.raises(DataError) as err:
        prepare_data(cfg(target), log=lambda _: None)
    assert "not a directory" in str(err.value) and str(target) in str(err.value)

    target = tmp_path / "p"
    partial = tmp_path / ".p.partial"
    partial.mkdir()
    (partial / "x").write_text("someone else's")
    old = tmp_path / ".p.old-1-abcd"
    old.mkdir()
    (old / "y").write_text("also not ours")
    refused(cfg(target), partial)
    assert (partial / "x").read_text() == "someone else's" and (old / "y").is_file()
    (partial / "x").unlink()
    prepare_data(cfg(target), log=lambda _: None)  # an empty work directory is usable
    assert (old / "y").is_file() and not partial.exists()
