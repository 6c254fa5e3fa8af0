"""The data pipeline: sources -> tokenizer -> token shards (modmoe or Megatron format) ->
blended, resumable batches. The trainer's entry point is :func:`open_training_data`.

Names are imported on first use, so a preparation worker (which needs neither torch nor the
sampler) starts quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "modmoe.data.config",
    "SourceConfig": "modmoe.data.config",
    "DataError": "modmoe.data.errors",
    "prepare_data": "modmoe.data.prepare",
    "PreparedData": "modmoe.data.prepare",
    "TokenShards": "modmoe.data.shards",
    "BlendSampler": "modmoe.data.sampler",
    "SequenceSampler": "modmoe.data.sampler",
    "validation_batches": "modmoe.data.sampler",
    "load_tokenizer": "modmoe.data.tokenizer",
    "TrainingData": "modmoe.data.training",
    "open_training_data": "modmoe.data.training",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modmoe.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
