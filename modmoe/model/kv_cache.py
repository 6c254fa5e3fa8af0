"""The ragged KV cache of generation: one key/value store per block, with a length per sequence.

A routed block keeps keys and values only for the tokens that entered it, so every routed layer
has its own length per sequence; plain blocks hold every token. Sequences of a batch also differ
in prompt length, so one mechanism (a length per row) covers both. A routed block whose causal
rule ranks a token against its sequence so far (``prefix_rank``) also keeps the router logits of
every token the row has seen (``scores``, as long as the row's position).
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's keys and values, ``(B, allocated, H_kv, hd)``, with a length per sequence."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.scores: torch.Tensor | None = None  # (B, allocated) router logits of every token seen

    def append_scores(self, logits: torch.Tensor, seen: torch.Tensor) -> None:
        """Writes the router ``logits`` (B, S) of new tokens after each row's ``seen`` (B,) earlier
        ones; positions past a row's real tokens are overwritten by its next call."""
        B, S = logits.shape
        needed = int(seen.max()) + S if B else S
        allocated = 0 if self.scores is None else self.scores.shape[1]
        if needed > allocated:
            grown = logits.new_zeros(B, max(needed, 2 * allocated, 16), dtype=torch.float32)
            if self.scores is not None:
                grown[:, :allocated] = self.scores
            self.scores = grown
        rows = torch.arange(B, device=logits.device)[:, None].expand(B, S)
        self.scores[rows, seen[:, None] + torch.arange(S, device=logits.device)] = logits.float()

    def _ensure(self, needed: int, like: torch.Tensor) -> None:
        allocated = 0 if self.k is None else self.k.shape[1]
        if needed <= allocated:
            return
        new_allocated = max(needed, 2 * allocated, 16)  # doubling: amortized O(1) copies per token
        shape = (self.lengths.shape[0], new_allocated, like.shape[2], like.shape[3])
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        if self.k is not None:
            k[:, :allocated], v[:, :allocated] = self.k, self.v
        self.k, self.v = k, v

    def append(
        self, rows: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        """Writes ``keys, values`` (n, S, H_kv, hd) of ``rows`` (None = all) after each row's
        cached tokens; only the first ``n_valid`` (n,) of each row count. Returns the lengths before."""
        n, S = keys.shape[:2]
        before = self.lengths if rows is None else self.lengths[rows]  # (n,)
        self._ensure(int(before.max()) + S, keys)
        row_idx = (torch.arange(n, device=keys.device) if rows is None else rows)[:, None].expand(n, S)
        slot_idx = before[:, None] + torch.arange(S, device=keys.device)  # (n, S)
        # Padding positions are written too (after the valid ones) and stay beyond the length,
        # so nothing ever reads them; the next append overwrites them.
        self.k[row_idx, slot_idx] = keys
        self.v[row_idx, slot_idx] = values
        if rows is None:
            self.lengths = self.lengths + n_valid
        else:
            self.lengths = self.lengths.index_add(0, rows, n_valid)
        return before

    def read(self, rows: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``rows`` up to ``length`` positions: (n, length, H_kv, hd) each."""
        if rows is None:
            return self.k[:, :length], self.v[:, :length]
        return self.k[rows, :length], self.v[rows, :length]

    def select(self, rows: torch.Tensor) -> None:
        self.lengths = self.lengths[rows]
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]
        if self.scores is not None:
            self.scores = self.scores[rows]


class RaggedKVCache:
    """KV cache of a batch: one :class:`LayerKV` per block, and each sequence's position."""

    def __init__(self, num_layers: int, batch: int, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.layers = [LayerKV(batch, device) for _ in range(num_layers)]
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) tokens seen

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keeps (and reorders to) the sequences ``rows``: drops finished ones, or follows a
        beam reordering."""
        self.positions = self.positions[rows]
        for layer in self.layers:
            layer.select(rows)
