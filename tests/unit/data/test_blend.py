"""Blends and the sampler at scale: the computed permutation is a bijection whose memory does
not grow with the data; the blend schedule hits its weights at every prefix and can be
entered at any position; a 0.3/0.7 blend keeps its proportions and resumes bit-identically
at another world size."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest
import torch

from modmoe.data.blend import BlendSchedule, counts_at
from modmoe.data.errors import DataError
from modmoe.data.permutation import Permutation
from modmoe.data.sampler import BlendSampler, BlendSource, blend_validation_batches


class SyntheticStream:
    """A token stream of any length whose token at offset i is i mod 65,521 (nothing stored)."""

    def __init__(self, num_tokens: int, label: str = "synthetic") -> None:
        self.num_tokens, self.label = num_tokens, label

    def read(self, offset: int, length: int) -> np.ndarray:
        return (np.arange(offset, offset + length, dtype=np.int64) % 65_521).astype(np.uint32)

    def where(self, offset: int) -> str:
        return f"{self.label} (token {offset})"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097, 65_536])
def test_permutation_is_a_bijection_and_depends_on_its_key(n):
    perm = Permutation(n, "7:web:0")
    out = perm(range(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 1000:
        assert not np.array_equal(out, Permutation(n, "7:web:1")(range(n)))  # each epoch reshuffles
        assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.1  # and really shuffles
        np.testing.assert_array_equal(out[123:456], perm(range(123, 456)))  # any slice, same answer


def test_permutation_memory_does_not_grow_with_the_dataset():
    tracemalloc.start()
    for n in (10_000, 10**10 // 257, 10**14):
        Permutation(n, "0:x:0")(range(n - 64, n))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200_000  # bytes, for a dataset of 10^14 samples too


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1.0], [5, 1, 1, 3], [0.01, 0.99], [1 / 3, 1 / 3, 1 / 3]])
def test_counts_at_any_position_equal_the_replayed_schedule(weights):
    schedule = BlendSchedule(weights)
    for position in range(1, 2000):
        schedule.take(1)
        assert counts_at(weights, position) == schedule.counts, position


def test_schedule_is_within_one_sample_of_the_weights_at_every_prefix():
    schedule = BlendSchedule([0.3, 0.7])
    picks = [source for source, _ in schedule.take(10_000)]
    drawn = np.cumsum(np.array(picks) == 0)
    n = np.arange(1, 10_001)
    assert np.abs(drawn - 0.3 * n).max() <= 1.0
    rng = random.Random(0)
    weights = [rng.uniform(0.1, 1) for _ in range(6)]
    schedule = BlendSchedule(weights)
    picks = np.array([s for s, _ in schedule.take(20_000)])
    share = np.array(weights) / sum(weights)
    for i in range(6):
        assert np.abs(np.cumsum(picks == i) - share[i] * np.arange(1, 20_001)).max() <= 2.0


def take(sampler: BlendSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(n)]


def merge(per_rank):
    return [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])) for step in zip(*per_rank)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def blend(rank: int = 0, world: int = 1, num_workers: int = 0, seq_len: int = 15) -> BlendSampler:
    # Distinct token ranges tell the sources apart: code's tokens are < 1000, web's >= 1000.
    code = SyntheticStream(40 * (seq_len + 1), "code")  # small: repeats over many epochs
    web = SyntheticStream(999 * (seq_len + 1), "web")
    code.read = lambda o, n: (np.arange(o, o + n) % 997).astype(np.uint16)  # type: ignore[method-assign]
    web.read = lambda o, n: (1000 + np.arange(o, o + n) % 60_000).astype(np.uint32)  # type: ignore[method-assign]
    sources = [BlendSource("code", 0.3, code), BlendSource("web", 0.7, web)]
    return BlendSampler(sources, seq_len, 8, seed=11, rank=rank, world=world, num_workers=num_workers)


def test_blend_hits_its_weights_and_logs_tokens_per_source():
    sampler = blend()
    rows = torch.cat([x for x, _ in take(sampler, 250)])  # 2,000 samples
    from_code = int((rows[:, 0] < 1000).sum())
    # Stated tolerance: within one sample of 30 % at every prefix, so 600 +- 1 of 2,000.
    assert abs(from_code - 600) <= 1
    assert sampler.source_token_counts() == {"code": from_code * 15, "web": (2000 - from_code) * 15}
    metrics = sampler.metrics()
    assert metrics["data/tokens_code"] == from_code * 15 and metrics["data/epochs_code"] == from_code / 40


@pytest.mark.parametrize("num_workers", [0, 2])
def test_blend_resumes_bit_identically_at_another_world_size(num_workers):
    run = blend(num_workers=num_workers)
    take(run, 37)
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    expected = take(run, 20)
    run.close()
    for world in (2, 4):
        ranks = []
        for r in range(world):
            with blend(r, world, num_workers) as s:
                s.load_state_dict(state)
                ranks.append(take(s, 20))
        assert_same(merge(ranks), expected)
    with blend(1, 2, num_workers) as s:  # saved at world 2, restored at world 1
        take(s, 37)
        state2 = s.state_dict()
    single = blend(num_workers=num_workers)
    single.load_state_dict(state2)
    assert_same(take(single, 20), expected)
    single.seek(37 * 8)  # entering the stream at a position without a state gives the same batches
    assert_same(take(single, 20), expected)
    single.close()


def test_state_of_another_blend_is_refused():
    state = blend().state_dict()
    other = blend()
    with pytest.raises(DataError) as err:
        other.load_state_dict({**state, "weights": {"code": 0.5, "web": 0.5}})
    assert "weights" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError):
        other.load_state_dict({**state, "position": 16, "counts": {"code": 0, "web": 16}})


def test_sampler_at_ten_billion_tokens_costs_what_a_small_one_costs():
    def peak(num_tokens: int) -> int:
        tracemalloc.start()
        sampler = BlendSampler([BlendSource("big", 1.0, SyntheticStream(num_tokens))], 256, 16, seed=0)
        take(sampler, 3)
        sampler.load_state_dict({**sampler.state_dict()})
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return high

    small, huge = peak(10**6), peak(10**10)
    assert huge < small + 100_000, (small, huge)


def test_blended_validation_batches_are_fixed_and_split_over_ranks():
    sources = [BlendSource("a", 0.25, SyntheticStream(400)), BlendSource("b", 0.75, SyntheticStream(4000))]
    batches = blend_validation_batches(sources, 15, 4, 3)
    assert_same(batches, blend_validation_batches(sources, 15, 4, 3))
    ranks = [blend_validation_batches(sources, 15, 4, 3, rank=r, world=2) for r in range(2)]
    assert_same(merge(ranks), batches)
    with pytest.raises(DataError) as err:
        blend_validation_batches(sources, 15, 4, 50)
    assert "a" in str(err.value) and "only 25 fit" in str(err.value)
