"""Inference runtime: causal MoDE generation with a ragged KV cache (no transformers needed).

``core`` holds the model for inference (torch only; it is also shipped inside every export),
``loading`` opens an export directory, ``generate`` runs batched, streamed generation,
``evaluate`` compares top-k and causal routing on validation data.
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
