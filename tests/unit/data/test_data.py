"""Data pipeline: preparation, shards, tokenizer, sampler and validation batches, on a small
slice of the real standard-library corpus."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import modmoe.data.prepare as prepare_mod
from modmoe.config_base import ConfigError
from modmoe.data import (
    DataConfig,
    DataError,
    PreparedData,
    SequenceSampler,
        load_tokenizer,
    prepare_data,
    validation_batches,
)
from modmoe.data.documents import val_score
from modmoe.data.prepare import corpus_documents

Batches = list[tuple[torch.Tensor, torch.Tensor]]
SMALL = dict(max_corpus_bytes=300_000, vocab_size=512, shard_tokens=4096, val_fraction=0.2)


def small_cfg(directory: Path, **overrides) -> DataConfig:
    return DataConfig(prepared_dir=str(directory), **{**SMALL, **overrides})


def splits(prepared: PreparedData) -> dict:
    (entry,) = json.loads((prepared.dir / "index.json").read_text())["sources"].values()
    return entry["splits"]


def shard_hashes(prepared: PreparedData) -> dict[str, list[str]]:
    return {split: [s["sha256"] for s in entry["shards"]] for split, entry in splits(prepared).items()}


def shard_path(prepared: PreparedData, split: str, k: int) -> Path:
    return prepared.dir / "sources" / "stdlib" / "units" / splits(prepared)[split]["shards"][k]["file"]


def read_corpus(cfg: DataConfig) -> list:
    return list(corpus_documents(cfg))


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    return prepare_data(small_cfg(tmp_path_factory.mktemp("prep") / "prepared"), log=lambda _: None)


@pytest.fixture()
def damaged_copy(prepared: PreparedData, tmp_path: Path) -> PreparedData:
    shutil.copytree(prepared.dir, tmp_path / "copy")
    return PreparedData.load(tmp_path / "copy")


# --- preparation --------------------------------------------------------------------------


def test_preparation_is_deterministic_and_reused_by_fingerprint(prepared, tmp_path, monkeypatch):
    again = prepare_data(small_cfg(tmp_path / "other"), log=lambda _: None)
    assert again.fingerprint == prepared.fingerprint
    assert shard_hashes(again) == shard_hashes(prepared)
    assert (again.dir / "tokenizer.json").read_bytes() == prepared.tokenizer_path.read_bytes()
    assert len(shard_hashes(again)["train"]) > 3  # several shards, so windows cross files

    # Same fingerprint: reused without tokenizing (a rebuild would hit the patched _build).
    shard = shard_path(again, "train", 0)
    inode = shard.stat().st_ino
    val_tokens = again.open("val").num_tokens
    monkeypatch.setattr(prepare_mod, "_build", lambda *a, **k: pytest.fail("re-prepared a matching dir"))
    logs: list[str] = []
    reused = prepare_data(small_cfg(tmp_path / "other", seq_len=64, num_workers=3), log=logs.append)
    assert reused == again and shard.stat().st_ino == inode
    assert any("reusing" in line for line in logs)
    monkeypatch.undo()

    # A field that matters changes the fingerprint: prepared again, replaced in place.
    logs.clear()
    changed = prepare_data(small_cfg(tmp_path / "other", val_fraction=0.3), log=logs.append)
    assert changed.fingerprint != again.fingerprint
    assert any("replacing" in line for line in logs)
    assert changed.open("val").num_tokens > val_tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.lock", "other"]  # no tmp/old left


def test_crash_leaves_previous_preparation_intact(prepared, tmp_path, monkeypatch):
    target = tmp_path / "prep"
    first = prepare_data(small_cfg(target), log=lambda _: None)

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "process_unit", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(small_cfg(target, val_fraction=0.3), log=lambda _: None)
    assert PreparedData.load(target).fingerprint == first.fingerprint
    first.open("train", verify=True)
    # The interrupted work stays beside it, marked as modmoe's, for a re-run to resume.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prep.lock", ".prep.partial", "prep"]
    assert (tmp_path / ".prep.partial" / "MODMOE_PREPARED.json").is_file()
    monkeypatch.undo()
    again = prepare_data(small_cfg(target, val_fraction=0.3), log=lambda _: None)
    assert again.fingerprint != first.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prep.lock", "prep"]
    monkeypatch.setattr(prepare_mod, "process_unit", crash)

    # A crash on a fresh directory leaves nothing that looks prepared.
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(small_cfg(tmp_path / "fresh"), log=lambda _: None)
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DataError) as err:
        prepare_data(small_cfg(target), log=lambda _: None)
    assert_one_line(err, str(target), "refusing")
    assert (target / "notes.txt").read_text() == "keep me"


def test_concurrent_preparations_prepare_once(tmp_path):
    logs: list[str] = []
    results: list[PreparedData] = []
    cfg = small_cfg(tmp_path / "shared", max_corpus_bytes=100_000)
    threads = [threading.Thread(target=lambda: results.append(prepare_data(cfg, log=logs.append))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert sum("preparing" in line for line in logs) == 1
    assert sum("reusing" in line for line in logs) == 1


def test_train_and_val_hold_disjoint_whole_documents(prepared):
    docs = [d.text for d in read_corpus(small_cfg(prepared.dir))]
    val_docs = [t for t in docs if val_score(t) < 0.2]
    assert 0 < len(val_docs) < len(docs)
    tok = prepared.load_tokenizer()
    decoded: dict[str, list[str]] = {}
    for split in ("train", "val"):
        shards = prepared.open(split)
        stream = shards.read(0, shards.num_tokens).astype(np.int64)
        assert stream[-1] == prepared.eot_id
        cuts = np.flatnonzero(stream == prepared.eot_id)
        pieces = np.split(stream, cuts + 1)[:-1]
        decoded[split] = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
    # Byte-level BPE round-trips exactly: every document comes back, once, in its split, in order.
    assert decoded["val"] == val_docs
    assert decoded["train"] == [t for t in docs if val_score(t) >= 0.2]


def test_split_is_a_function_of_the_text_only():
    texts = [f"def module_{i}():\n    return {i}\n" for i in range(400)]
    scores = [val_score(t) for t in texts]
    assert 20 <= sum(s < 0.1 for s in scores) <= 60  # ~10% held out
    assert scores == [val_score(t) for t in texts]  # where a text comes from does not matter
    long = "x" * 100_000
    assert val_score(long) == val_score(long + "tail")  # reads a bounded prefix only


def test_window_across_shards_decodes_to_corpus_text(prepared):
    shards = prepared.open("train")
    entry = splits(prepared)["train"]
    files = [shard_path(prepared, "train", k) for k in range(len(entry["shards"]))]
    raw = np.concatenate([np.fromfile(f, dtype="<u2") for f in files])
    assert shards.num_tokens == len(raw) == entry["num_tokens"]
    boundary = entry["shards"][0]["tokens"]
    window = shards.read(boundary - 300, 700)  # spans shard 0 -> shard 1
    np.testing.assert_array_equal(window, raw[boundary - 300 : boundary + 400])
    corpus = "".join(d.text for d in read_corpus(small_cfg(prepared.dir)))
    text = prepared.load_tokenizer().decode(window[50:650].tolist(), skip_special_tokens=True)
    assert len(text) > 500 and text[5:-5] in corpus
    with pytest.raises(IndexError):
        shards.read(shards.num_tokens - 5, 10)


def test_vocab_and_special_tokens(prepared):
    tok = load_tokenizer(prepared.tokenizer_path)
    assert prepared.vocab_size == tok.get_vocab_size() == 512
    assert prepared.eot_id == tok.token_to_id("<|endoftext|>")
    assert prepared.pad_id == tok.token_to_id("<|pad|>")
    stream = prepared.open("train").read(0, 20_000)
    assert stream.max() < prepared.vocab_size and prepared.pad_id not in stream


# --- damaged files -> one-line errors ----------------------------------------------------


def test_missing_shard(damaged_copy):
    path = shard_path(damaged_copy, "train", 2)
    path.unlink()
    with pytest.raises(DataError) as err:
        damaged_copy.open("train")
    assert_one_line(err, path.name, "missing")
    damaged_copy.open("val")  # the other split is fine


def test_empty_shard(damaged_copy):
    path = shard_path(damaged_copy, "train", 1)
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        damaged_copy.open("train")
    assert_one_line(err, path.name, "empty")


def test_truncated_shard(damaged_copy):
    path = shard_path(damaged_copy, "val", 0)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError) as err:
        damaged_copy.open("val")
    assert_one_line(err, path.name, "truncated")


def test_corrupted_shard_caught_by_sha256_only_when_asked(damaged_copy):
    path = shard_path(damaged_copy, "train", 0)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    damaged_copy.open("train")  # sizes still match
    with pytest.raises(DataError) as err:
        damaged_copy.open("train", verify=True)
    assert_one_line(err, path.name, "sha256")


def test_missing_or_bad_index(damaged_copy):
    (damaged_copy.dir / "index.json").write_text("{not json")
    with pytest.raises(DataError) as err:
        PreparedData.load(damaged_copy.dir)
    assert_one_line(err, "index.json")
    (damaged_copy.dir / "index.json").unlink()
    with pytest.raises(DataError) as err:
        PreparedData.load(damaged_copy.dir)
    assert_one_line(err, "index.json", "not found")


def test_missing_and_unreadable_tokenizer(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError) as err:
        prepare_data(small_cfg(tmp_path / "p", tokenizer=str(missing)), log=lambda _: None)
    assert_one_line(err, str(missing), "not found")
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(DataError) as err:
        load_tokenizer(garbage)
    assert_one_line(err, str(garbage), "not a readable tokenizer.json")
    assert not (tmp_path / "p").exists()


# --- corpus sources ------------------------------------------------------------------------


def test_files_corpus_with_glob_and_loaded_tokenizer(prepared, tmp_path):
    src = tmp_path / "src"
    stdlib_docs = read_corpus(small_cfg(prepared.dir, max_corpus_bytes=60_000))
    n = len(stdlib_docs)
    assert n >= 6
    for i, doc in enumerate(stdlib_docs):
        path = src / f"part{i % 3}" / "deep" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc.text)
    (src / "part1" / "deep" / "doc00.txt").write_text('SEP = "<|endoftext|>"  # literal text, not a separator\n')
    (src / "part0" / "deep" / "blob.txt").write_bytes(b"\x00\x01binary\x00")  # skipped
    (src / "part0" / "ignored.md").write_text("not matched by the glob")
    pattern = str(src / "**" / "*.txt")
    cfg = small_cfg(tmp_path / "p", corpus="files", corpus_glob=pattern, tokenizer=str(prepared.tokenizer_path))
    logs: list[str] = []
    files = prepare_data(cfg, log=logs.append)
    index = json.loads((files.dir / "index.json").read_text())
    parts = index["sources"]["files"]["splits"]
    assert parts["train"]["num_documents"] + parts["val"]["num_documents"] == n + 1
    assert index["fingerprint_fields"]["tokenizer_sha256"]
    assert files.tokenizer_path.read_bytes() == prepared.tokenizer_path.read_bytes()
    assert any(f"{n + 1} documents" in line and "1 unreadable" in line for line in logs)
    streams = [files.open(split).read(0, files.open(split).num_tokens) for split in ("train", "val")]
    assert sum(int((st == files.eot_id).sum()) for st in streams) == n + 1  # one separator per document
    tok = files.load_tokenizer()
    train = files.open("train")
    text = tok.decode(train.read(0, train.num_tokens).tolist(), skip_special_tokens=True)
    assert "blob" not in text and "not matched" not in text
    assert any(doc.text[:200] in text for doc in stdlib_docs)


def test_empty_corpus_and_missing_glob_errors(tmp_path):
    cfg = small_cfg(tmp_path / "p", corpus="files", corpus_glob=str(tmp_path / "*.none"))
    with pytest.raises(DataError) as err:
        prepare_data(cfg, log=lambda _: None)
    assert_one_line(err, "corpus is empty", "corpus_glob")
    with pytest.raises(ConfigError) as err:
        prepare_data(small_cfg(tmp_path / "p", corpus="files"), log=lambda _: None)
    assert_one_line(err, "data.corpus_glob")


def test_stdlib_corpus_is_sorted_capped_and_skips_site_packages(prepared):
    docs = read_corpus(small_cfg(prepared.dir))
    keys = [d.where for d in docs]
    assert keys == sorted(keys) and all(k.endswith(".py") for k in keys)
    assert not any("site-packages" in k for k in keys)
    assert sum(len(d.text.encode()) for d in docs) == 300_000


# --- sampler --------------------------------------------------------------------------------


def take(sampler: SequenceSampler, n: int) -> Batches:
    return [sampler.next_batch() for _ in range(n)]


def merge_ranks(per_rank: list[Batches]) -> Batches:
    """Concatenates the ranks' rows of each step into the global batch."""
    return [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])) for step in zip(*per_rank)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_shifted_samples_from_the_split(prepared):
    shards = prepared.open("train")
    sampler = SequenceSampler(shards, seq_len=32, global_micro_batch=4, seed=3)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    count = shards.num_tokens // 33
    samples = torch.from_numpy(shards.read(0, count * 33).astype(np.int64)).view(count, 33)
    rows = torch.cat([x, y[:, -1:]], dim=1)  # (4, 33): each row is one whole aligned sample
    assert all(bool((samples == row).all(dim=1).any()) for row in rows)
    other_seed = SequenceSampler(shards, seq_len=32, global_micro_batch=4, seed=4).next_batch()
    assert not torch.equal(other_seed[0], x)
    assert_same(take(SequenceSampler(shards, 32, 4, seed=3), 3), [(x, y)] + take(sampler, 2))


def test_world_2_rows_are_the_world_1_batch(prepared):
    shards = prepared.open("train")
    single = take(SequenceSampler(shards, 16, 8, seed=1), 4)
    ranks = [take(SequenceSampler(shards, 16, 8, seed=1, rank=r, world=2), 4) for r in range(2)]
    assert ranks[0][0][0].shape == (4, 16)
    assert_same(merge_ranks(ranks), single)
    quarters = [take(SequenceSampler(shards, 16, 8, seed=1, rank=r, world=4), 4) for r in range(4)]
    assert_same(merge_ranks(quarters), single)
    with pytest.raises(ConfigError) as err:
        SequenceSampler(shards, 16, 6, rank=0, world=4)
    assert_one_line(err, "global_micro_batch")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_restore_is_bit_identical_across_world_sizes(prepared, num_workers):
    shards = prepared.open("train")
    run = SequenceSampler(shards, 16, 8, seed=7, num_workers=num_workers)
    take(run, 5)
    state = run.state_dict()
    assert state["position"] == 40 and state["counts"] == {"main": 40}
    assert json.loads(json.dumps(state)) == state  # plain JSON values
    expected = take(run, 3)
    run.close()

    same = SequenceSampler(shards, 16, 8, seed=7, num_workers=num_workers)
    same.load_state_dict(json.loads(json.dumps(state)))  # survives a plain-JSON round trip
    assert_same(take(same, 3), expected)

    halves = []
    for r in range(2):
        with SequenceSampler(shards, 16, 8, seed=7, rank=r, world=2, num_workers=num_workers) as s:
            s.load_state_dict(state)
            halves.append(take(s, 3))
            assert s.state_dict() == {**state, "position": 64, "counts": {"main": 64}}
    assert_same(merge_ranks(halves), expected)

    # Saved at world=2, restored at world=1.
    with SequenceSampler(shards, 16, 8, seed=7, rank=1, world=2, num_workers=num_workers) as s:
        take(s, 5)
        state2 = s.state_dict()
    single = SequenceSampler(shards, 16, 8, seed=7, num_workers=num_workers)
    single.load_state_dict(state2)
    assert_same(take(single, 3), expected)
    single.close()


def test_prefetch_keeps_order_and_restores(prepared):
    shards = prepared.open("train")
    plain = take(SequenceSampler(shards, 16, 4, seed=2), 12)
    with SequenceSampler(shards, 16, 4, seed=2, num_workers=3) as fetched:
        first = take(fetched, 7)
        state = fetched.state_dict()
        assert state["position"] == 28  # counts handed-out batches, not prefetched ones
        fetched.load_state_dict({**state, "position": 8, "counts": {"main": 8}})
        assert_same(take(fetched, 5), plain[2:7])
    assert_same(first, plain[:7])


def test_epoch_rollover(prepared):
    shards = prepared.open("val")
    seq_len = shards.num_tokens // 11 - 1  # exactly 11 samples per epoch
    sampler = SequenceSampler(shards, seq_len, 4, seed=0)
    assert sampler.samples_per_epoch == 11
    rows = torch.cat([x for x, _ in take(sampler, 11)])  # 44 samples = 4 epochs
    assert sampler.state_dict()["position"] == 44 and sampler.metrics()["data/epochs_main"] == 4.0
    all_samples = torch.from_numpy(shards.read(0, 11 * (seq_len + 1)).astype(np.int64)).view(11, seq_len + 1)[:, :-1]
    orders = []
    for epoch in range(4):
        chunk = rows[epoch * 11 : (epoch + 1) * 11]
        order = [int(torch.nonzero((all_samples == r).all(dim=1))[0]) for r in chunk]
        assert sorted(order) == list(range(11))  # each epoch visits every sample once
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # and reshuffles

    # Restoring mid-epoch, with a batch that runs over into the next epoch.
    replay = SequenceSampler(shards, seq_len, 4, seed=0)
    replay.load_state_dict({**sampler.state_dict(), "position": 8, "counts": {"main": 8}})
    x, _ = replay.next_batch()
    assert torch.equal(x, rows[8:12]) and replay.metrics()["data/epochs_main"] == 12 / 11
    with pytest.raises(DataError) as err:
        replay.load_state_dict({**replay.state_dict(), "seq_len": seq_len + 1})
    assert_one_line(err, "seq_len")


def test_validation_batches(prepared):
    shards = prepared.open("val")
    batches = validation_batches(shards, seq_len=16, batch_size=4, num_batches=3)
    assert_same(batches, validation_batches(shards, 16, 4, 3))
    count = shards.num_tokens // 17
    every = torch.from_numpy(shards.read(0, count * 17).astype(np.int64)).view(count, 17)
    spread = every[[n * count // 12 for n in range(12)]]  # 12 samples evenly over the whole split
    assert torch.equal(torch.cat([x for x, _ in batches]), spread[:, :-1])
    assert torch.equal(torch.cat([y for _, y in batches]), spread[:, 1:])
    ranks = [validation_batches(shards, 16, 4, 3, rank=r, world=2) for r in range(2)]
    assert_same(merge_ranks(ranks), batches)
    with pytest.raises(DataError) as err:
        validation_batches(shards, 16, 4, 10_000)
    assert_one_line(err, "val split", "only")
