"""The data pipeline: corpus -> BPE tokenizer -> uint16 token shards -> resumable batches."""

from modmoe.data.config import DataConfig
from modmoe.data.errors import DataError
from modmoe.data.prepare import PreparedData, prepare_data
from modmoe.data.sampler import SequenceSampler, validation_batches
from modmoe.data.shards import TokenShards
from modmoe.data.tokenizer import load_tokenizer

__all__ = [
    "DataConfig",
    "DataError",
    "prepare_data",
    "PreparedData",
    "TokenShards",
    "SequenceSampler",
    "validation_batches",
    "load_tokenizer",
]
