"""Validation loss of an export under top-k vs causal routing, and per-layer causal agreement.

The numbers are the trainer's evaluation (``Trainer.evaluate``) recomputed from the exported
weights: the same validation batches (the first samples of the val split), loss under each
routing, and in the top-k forward the agreement of every routed block's causal decision with
its top-k choice. Validation data come from the prepared data directory the export recorded,
or another one given explicitly; either way its tokenizer must be the export's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from modmoe.checkpoint.fsutil import sha256_file
from modmoe.data import DataError, PreparedData, validation_batches
from modmoe.inference import export_format as layout
from modmoe.inference.flops import trace_of_sequences
from modmoe.inference.loading import InferenceError, LoadedModel

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    loss_topk: float
    loss_causal: float
    agreement: dict[int, float] = field(default_factory=dict)  # routed layer -> causal == top-k, over tokens
    causal_entry: dict[int, float] = field(
        default_factory=dict
    )  # routed layer -> causal entry fraction (top-k forward)
    precision: dict[int, float] = field(default_factory=dict)  # routed layer -> of the causal entries, top-k members
    recall: dict[int, float] = field(default_factory=dict)  # routed layer -> of the top-k members, causal entries
    tokens: int = 0

    @property
    def loss_gap(self) -> float:
        """Relative gap of causal over top-k loss (the trainer's ``eval/loss_gap_causal_vs_topk``)."""
        return self.loss_causal / self.loss_topk - 1

    @property
    def mean_agreement(self) -> float:
        return sum(self.agreement.values()) / len(self.agreement) if self.agreement else float("nan")


def load_validation(
    loaded: LoadedModel,
    data_dir: str | Path | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> list[Batch]:
    """Validation batches for ``loaded``: ``data_dir`` or the prepared directory recorded at export."""
    record_data = loaded.record.get("data") or {}
    evals = loaded.record.get("eval") or {}
    directory = data_dir or record_data.get("prepared_dir")
    if not directory:
        raise InferenceError(f"{loaded.dir}/config.json: records no validation data; pass --data-dir")
    directory = Path(directory)
    if not (directory / "index.json").is_file():
        hint = "" if data_dir else " (recorded at export; pass --data-dir)"
        raise InferenceError(f"data directory {directory}: no prepared data there (index.json missing){hint}")
    try:
        data = PreparedData.load(directory)
    except DataError as err:
        raise InferenceError(str(err)) from None
    ours = loaded.dir / layout.TOKENIZER_NAME
    if ours.is_file() and sha256_file(data.tokenizer_path) != sha256_file(ours):
        raise InferenceError(
            f"data directory {directory}: its tokenizer.json differs from {ours} (tokenized for another model)"
        )
    seq_len = seq_len or record_data.get("seq_len") or loaded.config.max_seq_len
    if seq_len > loaded.config.max_seq_len:
        raise InferenceError(
            f"--seq-len {seq_len}: longer than the context (model.max_seq_len = {loaded.config.max_seq_len})"
        )
    try:
        return validation_batches(
            data.open("val"), seq_len, batch_size or evals.get("batch_size", 8), batches or evals.get("batches", 4)
        )
    except DataError as err:
        raise InferenceError(str(err)) from None


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100))


@torch.no_grad()
def evaluate(loaded: LoadedModel, batches: list[Batch], causal_router: str | None = None) -> EvalResult:
    model, device = loaded.model, loaded.device
    rule = model.causal_rule(causal_router)
    topk_losses, causal_losses = [], []
    agree: dict[int, int] = {}
    entered: dict[int, int] = {}
    members: dict[int, int] = {}
    both: dict[int, int] = {}
    tokens = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        output = model(inputs, routing="topk")
        topk_losses.append(_loss(output.logits, targets))
        for lt in trace_of_sequences(model, output, inputs.shape[1], rule).layers:
            if lt.topk is not None:
                agree[lt.layer] = agree.get(lt.layer, 0) + int((lt.enter == lt.topk).sum())
                entered[lt.layer] = entered.get(lt.layer, 0) + int(lt.enter.sum())
                members[lt.layer] = members.get(lt.layer, 0) + int(lt.topk.sum())
                both[lt.layer] = both.get(lt.layer, 0) + int((lt.enter & lt.topk).sum())
        tokens += inputs.numel()
        cache = model.new_cache(inputs.shape[0])
        causal_losses.append(_loss(model.run_tokens(inputs, cache, causal_router=causal_router), targets))
    return EvalResult(
        loss_topk=sum(topk_losses) / len(topk_losses),
        loss_causal=sum(causal_losses) / len(causal_losses),
        agreement={i: n / tokens for i, n in sorted(agree.items())},
        causal_entry={i: n / tokens for i, n in sorted(entered.items())},
        precision={i: both[i] / max(n, 1) for i, n in sorted(entered.items())},
        recall={i: both[i] / max(n, 1) for i, n in sorted(members.items())},
        tokens=tokens,
    )
