"""The initial weights of a ``model.from_hf`` job on the Megatron engine, read rank by rank.

:func:`pretrained_reader` answers :func:`~modmoe.engines.megatron.load.load_native_weights`'
questions ("native tensor NAME, or this part of it") from the checkpoint's safetensors memory
maps through the native engine's import (:class:`~modmoe.hf.checkpoint.PretrainedReader`), so a
rank reads only the bytes of what it holds: the tensors of its pipeline stage, of those only its
experts' rows under expert parallelism and its rows or columns under tensor parallelism. Upcycled
experts and their new gates come from the same recipes as on the native engine. What the
checkpoint does not make (the depth routers a MoD-ified import adds, with their predictors and
logit priors) keeps the native model's initialisation for the seed, as on the native engine, so
both engines start from the same model; that initialisation is built only on a rank that holds
such a tensor, and only those tensors are kept of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from modmoe.engines.megatron.load import Index, NativeReader, native_init_reader
from modmoe.hf.checkpoint import reader_for
from modmoe.model_config import ModelConfig


@dataclass
class PretrainedLoad:
    """What one rank's import read."""

    directory: str
    tensors: int = 0  # native tensors (or parts of them) made from the checkpoint
    bytes_read: int = 0  # their size in the checkpoint's dtype
    initialised: list[str] = field(default_factory=list)  # native tensors the checkpoint does not make

    def summary(self) -> str:
        kept = f"; {len(self.initialised)} from the native initialisation" if self.initialised else ""
        return f"{self.tensors} tensors, {self.bytes_read / 2**20:.1f} MiB of {self.directory} read on this rank{kept}"


def pretrained_reader(cfg: ModelConfig, seed: int) -> tuple[NativeReader, PretrainedLoad]:
    """A reader of ``cfg.from_hf`` for the (completed) model section ``cfg``, and the record of
    what it reads; ``seed``: of upcycled gates and of the native initialisation."""
    reader = reader_for(cfg, seed)
    report = PretrainedLoad(str(cfg.from_hf))
    fallback: NativeReader | None = None

    def read(name: str, index: Index | None = None) -> Tensor:
        nonlocal fallback
        value = reader.read(name, index)
        if value is None:
            if fallback is None:
                fallback = native_init_reader(cfg, seed, keep=lambda n: n not in reader.sources)
            report.initialised.append(name)
            return fallback(name, index)
        report.tensors += 1
        report.bytes_read += value.numel() * value.element_size()
        return value

    return read, report


__all__ = ["PretrainedLoad", "pretrained_reader"]
