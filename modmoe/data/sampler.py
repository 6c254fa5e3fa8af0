"""Training and validation batches drawn from a split's token stream.

The split is cut into non-overlapping samples of ``seq_len + 1`` tokens. Training visits them
as one global stream: epoch ``e`` is a permutation seeded by ``(seed, e)``, and the stream is
cut into global micro-batches of ``global_micro_batch`` samples, of which rank ``r`` of
``world`` takes rows ``[r*b, (r+1)*b)``. The stream does not depend on the rank layout, so a
checkpoint taken at one world size resumes bit-identically at another.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from modmoe.config_base import field_error
from modmoe.data.errors import DataError
from modmoe.data.prefetch import Prefetcher
from modmoe.data.shards import TokenShards

Batch = tuple[torch.Tensor, torch.Tensor]


def _rows_per_rank(global_batch: int, rank: int, world: int, name: str) -> int:
    if world < 1 or not 0 <= rank < world:
        raise field_error("rank", rank, f"must be in [0, world) with world = {world} >= 1")
    if global_batch < 1 or global_batch % world:
        raise field_error(name, global_batch, f"must be a positive multiple of the data-parallel world size {world}")
    return global_batch // world


def _num_samples(shards: TokenShards, seq_len: int) -> int:
    if seq_len < 1:
        raise field_error("data.seq_len", seq_len, "must be >= 1")
    count = shards.num_tokens // (seq_len + 1)
    if count == 0:
        raise DataError(
            f"{shards.split} split in {shards.dir}: {shards.num_tokens} tokens, "
            f"fewer than one sample of seq_len + 1 = {seq_len + 1}"
        )
    return count


def _load_samples(shards: TokenShards, sample_ids: list[int], seq_len: int) -> Batch:
    """Reads whole samples and splits them into inputs and next-token targets."""
    span = seq_len + 1
    rows = np.stack([shards.read(i * span, span) for i in sample_ids])  # (b, seq_len + 1) uint16
    tokens = torch.from_numpy(rows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (b, seq_len) each


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: a function of ``(seed, epoch)`` only."""
    digest = hashlib.sha256(f"modmoe-sampler:{seed}:{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)  # 63-bit seed
    return torch.randperm(num_samples, generator=gen)  # (num_samples,)


class SequenceSampler:
    """Endless, resumable, layout-independent training batches for one rank."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        global_micro_batch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.global_micro_batch, self.rank, self.world = global_micro_batch, rank, world
        self.local_batch = _rows_per_rank(global_micro_batch, rank, world, "global_micro_batch")
        self.samples_per_epoch = _num_samples(shards, seq_len)
        self.epoch, self.consumed = 0, 0  # position after the last batch handed out
        self._planned = (0, 0)  # position after the last batch queued for prefetch
        self._perms: dict[int, torch.Tensor] = {}
        self._prefetch: Prefetcher[Batch] | None = Prefetcher(num_workers) if num_workers > 0 else None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep at most two
            self._perms[epoch] = epoch_permutation(self.seed, epoch, self.samples_per_epoch)
        return self._perms[epoch]

    def _plan(self, epoch: int, consumed: int) -> tuple[list[int], tuple[int, int]]:
        """This rank's sample ids for the global batch starting at ``(epoch, consumed)``, and
        the position after it (a batch may run over into the next epoch)."""
        ids: list[int] = []
        while len(ids) < self.global_micro_batch:
            take = min(self.global_micro_batch - len(ids), self.samples_per_epoch - consumed)
            ids.extend(self._permutation(epoch)[consumed : consumed + take].tolist())
            consumed += take
            if consumed == self.samples_per_epoch:
                epoch, consumed = epoch + 1, 0
        mine = ids[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return mine, (epoch, consumed)

    def next_batch(self) -> Batch:
        """``(inputs, targets)``, LongTensors of shape ``(local_batch, seq_len)``."""
        if self._prefetch is None:
            ids, (self.epoch, self.consumed) = self._plan(self.epoch, self.consumed)
            return _load_samples(self.shards, ids, self.seq_len)
        self._fill()
        (self.epoch, self.consumed), batch = self._prefetch.pop()
        self._fill()  # keep the workers busy while the caller trains on this batch
        return batch

    def _fill(self) -> None:
        assert self._prefetch is not None
        while not self._prefetch.full():
            ids, self._planned = self._plan(*self._planned)
            self._prefetch.push(self._planned, _load_samples, self.shards, ids, self.seq_len)

    def __iter__(self) -> SequenceSampler:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints; ``consumed`` counts global samples, so any world size can resume it."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "samples_per_epoch"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"sampler state: {key} = {state[key]} was saved, this sampler has {getattr(self, key)} "
                    "(the data or its settings changed since the checkpoint)"
                )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if epoch < 0 or not 0 <= consumed < self.samples_per_epoch:
            raise DataError(f"sampler state: epoch = {epoch}, consumed = {consumed} out of range")
        self.epoch, self.consumed = epoch, consumed
        self._planned = (epoch, consumed)
        if self._prefetch is not None:
            self._prefetch.clear()

    def close(self) -> None:
        """Stops the prefetch threads (the sampler still works afterwards, without them)."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def __enter__(self) -> SequenceSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def validation_batches(
    shards: TokenShards, seq_len: int, batch_size: int, num_batches: int, rank: int = 0, world: int = 1
) -> list[Batch]:
    """The same ``num_batches`` global batches every time: samples ``0, 1, 2, …`` from the
    start of the split, in order, rank ``r`` taking rows ``[r*b, (r+1)*b)`` of each."""
    local = _rows_per_rank(batch_size, rank, world, "batch_size")
    available = _num_samples(shards, seq_len)
    if num_batches < 1 or num_batches * batch_size > available:
        raise DataError(
            f"{shards.split} split in {shards.dir}: num_batches = {num_batches} of {batch_size} samples needs "
            f"{num_batches * batch_size} samples of {seq_len + 1} tokens, only {available} fit"
        )
    batches = []
    for k in range(num_batches):
        first = k * batch_size + rank * local
        batches.append(_load_samples(shards, list(range(first, first + local)), seq_len))
    return batches
