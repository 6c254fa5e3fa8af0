"""Training and validation batches drawn from a blend of token streams.

Each source's stream is cut into non-overlapping samples of ``seq_len + 1`` tokens. The global
stream takes its samples from the sources by the blend schedule (``blend.py``); a source's
``c``-th sample is sample ``perm_e(c mod N)`` of its epoch ``e = c div N``, where ``perm_e`` is
a computed permutation keyed by ``(seed, source, e)`` (``permutation.py``: no per-epoch array,
so memory does not grow with the dataset). The global stream is cut into global micro-batches
of ``global_micro_batch`` samples, of which rank ``r`` of ``world`` takes rows
``[r*b, (r+1)*b)``. Nothing depends on the rank layout, so a checkpoint taken at one world size
resumes bit-identically at another; the state is the position and the per-source counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from modmoe.config_base import field_error
from modmoe.data.blend import BlendSchedule, counts_at, normalise
from modmoe.data.errors import DataError
from modmoe.data.permutation import Permutation
from modmoe.data.prefetch import Prefetcher
from modmoe.data.sampler_state import SamplerState, SingleSourceState, parse_sampler_state

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenStream(Protocol):
    """What a source offers the sampler: modmoe shards or a Megatron dataset."""

    num_tokens: int
    label: str

    def read(self, offset: int, length: int) -> np.ndarray: ...

    def where(self, offset: int) -> str: ...


@dataclass(frozen=True)
class BlendSource:
    name: str
    weight: float
    stream: TokenStream


def _rows_per_rank(global_batch: int, rank: int, world: int, name: str) -> int:
    if world < 1 or not 0 <= rank < world:
        raise field_error("rank", rank, f"must be in [0, world) with world = {world} >= 1")
    if global_batch < 1 or global_batch % world:
        raise field_error(name, global_batch, f"must be a positive multiple of the data-parallel world size {world}")
    return global_batch // world


def num_samples(stream: TokenStream, seq_len: int) -> int:
    if seq_len < 1:
        raise field_error("data.seq_len", seq_len, "must be >= 1")
    count = stream.num_tokens // (seq_len + 1)
    if count == 0:
        raise DataError(
            f"{stream.label}: {stream.num_tokens} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}"
        )
    return count


def load_samples(rows: Sequence[tuple[TokenStream, int]], seq_len: int, vocab_size: int | None = None) -> Batch:
    """Reads whole samples (stream, sample id) and splits them into inputs and next-token
    targets; a token id outside ``[0, vocab_size)`` is a one-line error naming its file."""
    span = seq_len + 1
    arrays = [stream.read(i * span, span).astype(np.int64) for stream, i in rows]
    tokens = torch.from_numpy(np.stack(arrays))  # (b, seq_len + 1)
    if vocab_size is not None:
        for (stream, i), row in zip(rows, arrays):
            bad = np.flatnonzero((row < 0) | (row >= vocab_size))
            if bad.size:
                offset = i * span + int(bad[0])
                raise DataError(
                    f"{stream.where(offset)}: token id {int(row[bad[0]])} is outside the model vocabulary "
                    f"(model.vocab_size = {vocab_size}; data tokenized with another tokenizer?)"
                )
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (b, seq_len) each


def _state_error(key: str, saved: Any, ours: Any) -> DataError:
    return DataError(
        f"sampler state: {key} = {saved} was saved, this sampler has {ours} "
        "(the data or its settings changed since the checkpoint)"
    )


class BlendSampler:
    """Endless, resumable, layout-independent training batches for one rank."""

    def __init__(
        self,
        sources: Sequence[BlendSource],
        seq_len: int,
        global_micro_batch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if not sources:
            raise DataError("a sampler needs at least one source")
        self.sources = list(sources)
        self.names = [s.name for s in self.sources]
        self.weights = normalise([s.weight for s in self.sources])
        self.seq_len, self.seed, self.vocab_size = seq_len, seed, vocab_size
        self.global_micro_batch, self.rank, self.world = global_micro_batch, rank, world
        self.local_batch = _rows_per_rank(global_micro_batch, rank, world, "global_micro_batch")
        self.per_epoch = [num_samples(s.stream, seq_len) for s in self.sources]
        self.position, self.counts = 0, [0] * len(self.sources)  # after the last batch handed out
        self._planned: tuple[int, list[int]] = (0, list(self.counts))  # after the last batch queued
        self._perms: dict[tuple[int, int], Permutation] = {}
        self._prefetch: Prefetcher[Batch] | None = Prefetcher(num_workers) if num_workers > 0 else None

    def _permutation(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            name = self.names[source]
            self._perms[key] = Permutation(self.per_epoch[source], f"{self.seed}:{name}:{epoch}")
        return self._perms[key]

    def _plan(self, position: int, counts: list[int]) -> tuple[list[tuple[TokenStream, int]], tuple[int, list[int]]]:
        """This rank's (stream, sample id) rows of the global micro-batch that starts at
        ``position`` with per-source ``counts``, and the state after it."""
        schedule = BlendSchedule(self.weights, counts)
        picks = schedule.take(self.global_micro_batch)
        mine = picks[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        groups: dict[tuple[int, int], list[int]] = {}  # (source, epoch) -> rows, permuted in one call
        for row, (source, drawn) in enumerate(mine):
            groups.setdefault((source, drawn // self.per_epoch[source]), []).append(row)
        samples = [0] * len(mine)
        for (source, epoch), members in groups.items():
            at = [mine[r][1] - epoch * self.per_epoch[source] for r in members]
            for r, sample in zip(members, self._permutation(source, epoch)(at).tolist()):
                samples[r] = sample
        rows = [(self.sources[source].stream, samples[r]) for r, (source, _) in enumerate(mine)]
        return rows, (position + self.global_micro_batch, schedule.counts)

    def next_batch(self) -> Batch:
        """``(inputs, targets)``, LongTensors of shape ``(local_batch, seq_len)``."""
        if self._prefetch is None:
            rows, (self.position, self.counts) = self._plan(self.position, self.counts)
            return load_samples(rows, self.seq_len, self.vocab_size)
        self._fill()
        (self.position, self.counts), batch = self._prefetch.pop()
        self._fill()  # keep the workers busy while the caller trains on this batch
        return batch

    def _fill(self) -> None:
        assert self._prefetch is not None
        while not self._prefetch.full():
            rows, self._planned = self._plan(*self._planned)
            self._prefetch.push(self._planned, load_samples, rows, self.seq_len, self.vocab_size)

    def __iter__(self) -> BlendSampler:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    # ------------------------------------------------------------------ metrics and state
    def source_token_counts(self) -> dict[str, int]:
        """Training tokens (inputs) drawn from each source so far, over all ranks."""
        return {name: count * self.seq_len for name, count in zip(self.names, self.counts)}

    def metrics(self) -> dict[str, float]:
        """``data/tokens_<source>`` (tokens seen) and ``data/epochs_<source>`` (passes over it)."""
        out: dict[str, float] = {}
        for name, count, per_epoch in zip(self.names, self.counts, self.per_epoch):
            out[f"data/tokens_{name}"] = count * self.seq_len
            out[f"data/epochs_{name}"] = count / per_epoch
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats and strings; ``position`` counts global samples, so any world
        size can resume it."""
        return {
            "position": self.position,
            "counts": dict(zip(self.names, self.counts)),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "samples_per_epoch": dict(zip(self.names, self.per_epoch)),
            "weights": dict(zip(self.names, self.weights)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved state (checked field by field; one line names what differs)."""
        parsed = parse_sampler_state(state)
        saved = self._from_single_source_state(parsed) if isinstance(parsed, SingleSourceState) else parsed
        for key in ("seed", "seq_len"):
            if getattr(saved, key) != getattr(self, key):
                raise _state_error(key, getattr(saved, key), getattr(self, key))
        ours = dict(zip(self.names, self.per_epoch))
        if saved.samples_per_epoch != ours:
            raise _state_error("samples_per_epoch", saved.samples_per_epoch, ours)
        if set(saved.weights) != set(self.names) or any(
            not math.isclose(saved.weights[n], w, rel_tol=1e-9) for n, w in zip(self.names, self.weights)
        ):
            raise _state_error("weights", saved.weights, dict(zip(self.names, self.weights)))
        counts = [saved.counts[n] for n in self.names]
        if counts != counts_at(self.weights, saved.position):
            raise DataError(
                f"sampler state: position = {saved.position}, counts = {saved.counts} are inconsistent"
            )
        self._restore(saved.position, counts)

    def _from_single_source_state(self, state: SingleSourceState) -> SamplerState:
        """Reads the state of the single-source sampler of earlier versions (epoch, consumed)."""
        if len(self.sources) != 1:
            raise DataError("sampler state: saved by a single-source sampler, this run blends several sources")
        name = self.names[0]
        position = state.epoch * state.samples_per_epoch + state.consumed
        return SamplerState(
            position=position,
            counts={name: position},
            seed=state.seed,
            seq_len=state.seq_len,
            samples_per_epoch={name: state.samples_per_epoch},
            weights={name: 1.0},
        )

    def seek(self, samples: int) -> None:
        """Continues the stream after its first ``samples`` global samples (for a checkpoint
        that recorded no sampler state)."""
        self._restore(samples, counts_at(self.weights, samples))

    def _restore(self, position: int, counts: list[int]) -> None:
        self.position, self.counts = position, counts
        self._planned = (position, list(counts))
        if self._prefetch is not None:
            self._prefetch.clear()

    def close(self) -> None:
        """Stops the prefetch threads (the sampler still works afterwards, without them)."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def __enter__(self) -> BlendSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequenceSampler(BlendSampler):
    """A sampler over one stream (a blend of one source named ``main``); the other arguments
    are :class:`BlendSampler`'s."""

    def __init__(self, stream: TokenStream, *args: Any, **kwargs: Any) -> None:
        super().__init__([BlendSource("main", 1.0, stream)], *args, **kwargs)

    @property
    def samples_per_epoch(self) -> int:
        return self.per_epoch[0]


def blend_validation_batches(
    sources: Sequence[BlendSource],
    seq_len: int,
    batch_size: int,
    num_batches: int,
    rank: int = 0,
    world: int = 1,
    vocab_size: int | None = None,
) -> list[Batch]:
    """The same ``num_batches`` global batches every time: the blend schedule from its start;
    a source that gives ``c`` of them out of the ``N`` samples of its split gives samples
    ``n * N // c`` (evenly spread over the whole split, in order, so every part of it is
    measured, not only its first documents); rank ``r`` takes rows ``[r*b, (r+1)*b)`` of each batch."""
    local = _rows_per_rank(batch_size, rank, world, "batch_size")
    if num_batches < 1:
        raise DataError(f"num_batches = {num_batches}: must be >= 1")
    schedule = BlendSchedule([s.weight for s in sources])
    picks = schedule.take(num_batches * batch_size)
    stride = []
    for source, needed in zip(sources, schedule.counts):
        available = num_samples(source.stream, seq_len)
        if needed > available:
            raise DataError(
                f"{source.stream.label}: {num_batches} batches of {batch_size} samples need {needed} samples of "
                f"{seq_len + 1} tokens from it, only {available} fit"
            )
        stride.append((available, max(needed, 1)))
    batches = []
    for k in range(num_batches):
        first = k * batch_size + rank * local
        rows = [(sources[i].stream, n * stride[i][0] // stride[i][1]) for i, n in picks[first : first + local]]
        batches.append(load_samples(rows, seq_len, vocab_size))
    return batches


def validation_batches(
    stream: TokenStream, seq_len: int, batch_size: int, num_batches: int, rank: int = 0, world: int = 1
) -> list[Batch]:
    """:func:`blend_validation_batches` of one stream: samples spread evenly over it, in order."""
    return blend_validation_batches([BlendSource("main", 1.0, stream)], seq_len, batch_size, num_batches, rank, world)
