"""Inference runtime: what is specific to generation and evaluation, around the one model
(``modmoe.model``, which also computes causal routing over its ragged KV cache).

``loading`` opens an export directory, ``generate`` runs the batched, streamed decode loop,
``sampling`` picks tokens, ``evaluate`` compares top-k and causal routing on validation data,
``flops`` counts what generation executed.
"""

from modmoe.inference.evaluate import EvalResult, evaluate, load_validation
from modmoe.inference.generate import Completion, GenerationEvent, GenerationStats, Generator
from modmoe.inference.loading import InferenceError, LoadedModel, load_exported
from modmoe.inference.sampling import SamplingConfig

__all__ = [
    "Completion",
    "EvalResult",
    "GenerationEvent",
    "GenerationStats",
    "Generator",
    "InferenceError",
    "LoadedModel",
    "SamplingConfig",
    "evaluate",
    "load_exported",
    "load_validation",
]
