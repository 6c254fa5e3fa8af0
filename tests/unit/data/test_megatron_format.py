"""Megatron indexed datasets both ways: a pair written by megatron-core's own builder trains in
place and yields exactly its tokens; ``output_format: megatron`` is read back by megatron-core's
reader unchanged; the reader modmoe uses without megatron-core agrees with megatron-core's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import write_text_files

pytest.importorskip("megatron.core")
from data_helpers import write_megatron_pair  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from modmoe.data import DataConfig, DataError, open_training_data, prepare_data  # noqa: E402
from modmoe.data.megatron_format import MegatronStream  # noqa: E402


def documents(count: int, vocab: int, eos: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, vocab, rng.integers(5, 60)), eos) for _ in range(count)]


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_own_reader_agrees_with_megatron_core(tmp_path, dtype):
    docs = documents(50, 60_000, 0)
    prefix = write_megatron_pair(tmp_path / "ds_text_document", docs, dtype)
    core, own = MegatronStream(prefix), MegatronStream(prefix + ".bin", use_core=False)
    assert (core.reader, own.reader) == ("megatron-core", "modmoe")
    assert core.dtype == own.dtype == np.dtype(dtype) and core.num_documents == own.num_documents == 50
    flat = np.concatenate(docs)
    for stream in (core, own):
        np.testing.assert_array_equal(stream.read(0, stream.num_tokens), flat)
        np.testing.assert_array_equal(stream.read(37, 100), flat[37:137])
    assert [core.document_start(d) for d in range(51)] == [own.document_start(d) for d in range(51)]


def test_megatron_pair_trains_in_place_and_yields_exactly_its_tokens(tmp_path, small_tokenizer):
    eos, seq_len = 0, 15
    docs = documents(120, 300, eos)
    prefix = write_megatron_pair(tmp_path / "mega_text_document", docs)
    flat = np.concatenate(docs)
    cfg = DataConfig(
        sources=[{"path": prefix, "name": "mega"}],
        tokenizer=str(small_tokenizer),
        prepared_dir=str(tmp_path / "unused"),
        seq_len=seq_len,
        val_fraction=0.1,
    )
    data = open_training_data(cfg, model_vocab_size=300, is_main=True, log=lambda _: None)
    assert not (tmp_path / "unused").exists()  # nothing prepared, nothing copied
    train = data.train[0].stream
    assert train.bin_path == prefix + ".bin" and train.reader == "megatron-core"
    cut = train.num_tokens
    assert cut in {train.document_start(d) for d in range(train.num_documents)}  # at a document boundary
    assert 0.85 < cut / len(flat) < 0.95
    # One epoch visits every sample of the train window once: exactly the .bin's tokens.
    per_epoch = cut // (seq_len + 1)
    sampler = data.train_sampler(global_micro_batch=per_epoch, seed=3)
    x, y = sampler.next_batch()
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    expected = flat[: per_epoch * (seq_len + 1)].reshape(per_epoch, seq_len + 1)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected))
    assert sampler.metrics() == {"data/tokens_mega": per_epoch * seq_len, "data/epochs_mega": 1.0}
    (vx, vy), *_ = data.validation_batches(batch_size=2, num_batches=1)
    np.testing.assert_array_equal(vx[0].numpy(), flat[cut : cut + seq_len])

    # Token ids above the model's vocabulary: one line naming the file and the document.
    big = write_megatron_pair(tmp_path / "big_text_document", [np.array([1, 2, 3, 0] * 8), np.array([1, 70_000, 0] * 8)])
    cfg_big = DataConfig(
        sources=[{"path": big, "name": "big", "val_path": big}], tokenizer=str(small_tokenizer), seq_len=seq_len
    )
    sampler = open_training_data(cfg_big, model_vocab_size=300, is_main=True, log=lambda _: None).train_sampler(3, 0)
    with pytest.raises(DataError) as err:
        sampler.next_batch()
    assert_one_line(err, "big_text_document.bin (document 1)", "token id 70000", "model.vocab_size = 300")


def test_mismatched_or_damaged_pairs_are_one_line(tmp_path):
    prefix = write_megatron_pair(tmp_path / "a_text_document", documents(20, 100, 0))
    bin_path = tmp_path / "a_text_document.bin"
    data = bin_path.read_bytes()
    for use_core in (True, False):
        bin_path.write_bytes(data[:-8])  # truncated .bin
        with pytest.raises(DataError) as err:
            MegatronStream(prefix, use_core=use_core)
        assert_one_line(err, str(bin_path), "does not match", ".idx")
        bin_path.write_bytes(data)
    write_megatron_pair(tmp_path / "b_text_document", documents(20, 100, 0, seed=1))
    (tmp_path / "a_text_document.idx").write_bytes((tmp_path / "b_text_document.idx").read_bytes())
    with pytest.raises(DataError) as err:
        MegatronStream(prefix)
    assert_one_line(err, str(bin_path))
    (tmp_path / "a_text_document.idx").write_bytes(b"not an index at all, no")
    for use_core in (True, False):
        with pytest.raises(DataError) as err:
            MegatronStream(prefix, use_core=use_core)
        assert_one_line(err, "a_text_document.idx")
    with pytest.raises(DataError) as err:
        MegatronStream(tmp_path / "missing_text_document")
    assert_one_line(err, "missing_text_document", "not found")


def test_prepare_writes_megatron_format_that_megatron_core_reads(tmp_path, small_tokenizer, texts):
    glob = write_text_files(tmp_path / "txt", texts)
    base = dict(sources=[{"path": glob, "name": "docs"}], tokenizer=str(small_tokenizer), val_fraction=0.25)
    ours = prepare_data(DataConfig(prepared_dir=str(tmp_path / "modmoe"), **base), log=lambda _: None)
    mega = prepare_data(
        DataConfig(prepared_dir=str(tmp_path / "mega"), output_format="megatron", unit_bytes=20_000, **base),
        log=lambda _: None,
    )
    assert mega.index["dtype"] == "uint16"  # Megatron's own choice for a small vocabulary
    for split in ("train", "val"):
        prefix = mega.dir / f"sources/docs/{split}_text_document"
        ds = IndexedDataset(str(prefix))  # Megatron-LM's reader, as its training would open it
        stream = ours.open(split)
        tokens = stream.read(0, stream.num_tokens)
        eos_at = np.flatnonzero(tokens == mega.eot_id)
        expected_docs = np.split(tokens, eos_at + 1)[:-1]
        assert len(ds.document_indices) - 1 == len(expected_docs)
        got = [np.concatenate(ds[int(a) : int(b)]) for a, b in zip(ds.document_indices[:-1], ds.document_indices[1:])]
        for a, b in zip(got, expected_docs):
            np.testing.assert_array_equal(a, b)
        assert mega.open(split).num_tokens == stream.num_tokens
    # Training opens the Megatron-format preparation like any other.
    cfg = DataConfig(prepared_dir=str(tmp_path / "mega"), output_format="megatron", unit_bytes=20_000, seq_len=16, **base)
    data = open_training_data(cfg, model_vocab_size=300, is_main=True, log=lambda _: None)
    x, _ = data.train_sampler(global_micro_batch=4, seed=0).next_batch()
    assert x.shape == (4, 16)
    assert not list((mega.dir / "sources" / "docs").glob("units"))  # merged, no unit pairs left
