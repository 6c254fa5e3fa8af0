"""open_training_data, the trainer's one call: only rank 0 of a single-node job prepares, every
other case opens a finished preparation or refuses in one line; a failure on rank 0 still
reaches the barrier; vocabulary checks happen before any batch."""

from __future__ import annotations

import pytest

import modmoe.data.training as training
from modmoe.config_base import ConfigError
from modmoe.data import DataConfig, DataError, open_training_data, prepare_data

SMALL = dict(max_corpus_bytes=60_000, vocab_size=300, val_fraction=0.3, seq_len=16)


def cfg(tmp_path, **extra) -> DataConfig:
    return DataConfig(prepared_dir=str(tmp_path / "prep"), **{**SMALL, **extra})


def no_prepare(*args, **kwargs):
    raise AssertionError("prepared on a rank or job that must not prepare")


def test_only_rank_0_of_one_node_prepares(tmp_path, monkeypatch):
    calls: list[str] = []
    data = open_training_data(cfg(tmp_path), model_vocab_size=300, is_main=True, barrier=lambda: calls.append("b"))
    assert calls == ["b"] and data.source_names == ["stdlib"] and data.vocab_size == 300
    monkeypatch.setattr(training, "prepare_data", no_prepare)
    other = open_training_data(cfg(tmp_path), model_vocab_size=300, is_main=False)
    assert other.train[0].stream.num_tokens == data.train[0].stream.num_tokens
    x, y = other.train_sampler(global_micro_batch=4, seed=0).next_batch()
    assert x.shape == (4, 16)
    assert len(other.validation_batches(batch_size=4, num_batches=2)) == 2


@pytest.mark.parametrize("how", ["never", "multi-node", "other rank"])
def test_no_preparation_is_a_one_line_refusal(tmp_path, monkeypatch, how):
    monkeypatch.setattr(training, "prepare_data", no_prepare)
    config = cfg(tmp_path, prepare="never" if how == "never" else "auto")
    if how == "multi-node":
        monkeypatch.setenv("WORLD_SIZE", "16")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(DataError) as err:
        open_training_data(config, model_vocab_size=300, is_main=how != "other rank", log=lambda _: None)
    text = str(err.value)
    assert "\n" not in text and "no finished preparation" in text and "modmoe data prepare" in text


def test_stale_preparation_names_the_setting_that_differs(tmp_path):
    prepare_data(cfg(tmp_path), log=lambda _: None)
    with pytest.raises(DataError) as err:
        open_training_data(cfg(tmp_path, val_fraction=0.2, prepare="never"), model_vocab_size=300, is_main=True)
    assert "val_fraction (0.3 there, 0.2 here)" in str(err.value)
    # Settings that do not change tokens (seq_len, workers) reuse it.
    open_training_data(cfg(tmp_path, seq_len=8, prepare="never", num_workers=2), model_vocab_size=300, is_main=True)


def test_failure_on_rank_0_still_reaches_the_barrier(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise DataError("disk on fire")

    monkeypatch.setattr(training, "prepare_data", fail)
    calls: list[str] = []
    with pytest.raises(DataError, match="disk on fire"):
        open_training_data(cfg(tmp_path), model_vocab_size=300, is_main=True, barrier=lambda: calls.append("b"))
    assert calls == ["b"]  # the other ranks are released, then fail on their own line


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    prepare_data(cfg(tmp_path), log=lambda _: None)
    with pytest.raises(ConfigError) as err:
        open_training_data(cfg(tmp_path), model_vocab_size=256, is_main=True, log=lambda _: None)
    assert "model.vocab_size = 256" in str(err.value) and "(300, " in str(err.value)
