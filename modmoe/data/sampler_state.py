"""The sampler's position as a checkpoint records it (``meta.sampler``), typed and checked.

A checkpoint's manifest can be rewritten by anyone who can write the checkpoint, so the state
is validated before the sampler uses it: types, ranges (a position fits comfortably in a
double, so the blend arithmetic stays exact) and the agreement of its parts. Checkpoint
validation (``checkpoints_tools validate``, ``--resume auto``) runs the same check.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modmoe.config_json import JSONInputError, validate_record
from modmoe.data.errors import DataError

MAX_POSITION = 2**48  # samples; the blend's float arithmetic is exact far beyond any run
_Name = Annotated[str, Field(min_length=1, max_length=64)]
_Count = Annotated[int, Field(ge=0, le=MAX_POSITION)]
_MAX_SOURCES = 4096


class SamplerState(BaseModel):
    """What :meth:`BlendSampler.state_dict` returns."""

    model_config = ConfigDict(extra="forbid")
    position: _Count
    """Global samples handed out (over all ranks)."""
    counts: dict[_Name, _Count] = Field(min_length=1, max_length=_MAX_SOURCES)
    """Samples drawn from each source."""
    seed: int = Field(ge=-(2**63), lt=2**63)
    seq_len: int = Field(ge=1, le=2**31)
    samples_per_epoch: dict[_Name, Annotated[int, Field(ge=1, le=MAX_POSITION)]] = Field(max_length=_MAX_SOURCES)
    weights: dict[_Name, Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]] = Field(
        max_length=_MAX_SOURCES
    )
    """Normalised blend weights."""

    @model_validator(mode="after")
    def _parts_agree(self) -> SamplerState:
        if set(self.counts) != set(self.samples_per_epoch) or set(self.counts) != set(self.weights):
            raise ValueError("counts, samples_per_epoch and weights name different sources")
        if sum(self.counts.values()) != self.position:
            raise ValueError(f"the counts add up to {sum(self.counts.values())}, not the position {self.position}")
        return self


class SingleSourceState(BaseModel):
    """The single-source sampler's state of earlier versions."""

    model_config = ConfigDict(extra="ignore")
    epoch: _Count
    consumed: _Count
    seed: int = Field(ge=-(2**63), lt=2**63)
    seq_len: int = Field(ge=1, le=2**31)
    samples_per_epoch: int = Field(ge=1, le=MAX_POSITION)


def parse_sampler_state(data: Any, source: str = "sampler state") -> SamplerState | SingleSourceState:
    """``data`` as a sampler state, or a one-line :class:`DataError` naming the bad field."""
    model = SamplerState if not isinstance(data, dict) or "position" in data or "epoch" not in data else SingleSourceState
    try:
        return validate_record(model, data, source)
    except JSONInputError as err:
        raise DataError(str(err)) from None
