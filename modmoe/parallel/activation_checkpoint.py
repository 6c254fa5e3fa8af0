"""Per-block activation checkpointing: a block's activations are recomputed in backward."""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from modmoe.model.transformer import MoDETransformer


def apply_activation_checkpointing(model: MoDETransformer, mode: str) -> int:
    """``mode``: ``all`` blocks or only ``unrouted`` ones. Wraps the block's ``forward`` on the
    instance (parameter names do not change, so checkpoints stay layout independent); returns
    how many blocks were wrapped. Non-reentrant checkpointing: collectives inside a block (EP
    all-to-all, TP all-reduce) simply run again, in the same order on every rank."""
    wrapped = 0
    for block in model.layers:
        if mode == "all" or (mode == "unrouted" and block.router is None):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            wrapped += 1
    return wrapped
