"""The shape of a prepared directory's ``index.json``, checked before anything in it is used.

A prepared directory sits on a shared filesystem: anyone who can write it can rewrite its
index. Every field the readers use is typed and range-checked here, and every path in it (a
source name, a shard file, a Megatron prefix) must stay inside the directory, so an index can
neither make training read another file nor name a directory to delete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modmoe.config_json import JSONInputError, read_json, validate_record
from modmoe.data.errors import DataError
from modmoe.file_paths import escape_problem

MAX_INDEX_BYTES = 256 << 20  # ~150 bytes per shard: a million shards fit
_Count = Annotated[int, Field(ge=0, lt=2**63)]
_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
SourceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]
"""A source's name, also a directory name inside the preparation: no separators, not ``..``."""
ShardName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
"""A shard file name inside its source's ``units`` directory."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ShardEntry(_Record):
    file: ShardName
    tokens: _Count
    bytes: _Count
    sha256: _Sha256


class ModmoeSplit(_Record):
    num_tokens: _Count
    num_documents: _Count
    shards: list[ShardEntry] = Field(min_length=1)


class MegatronSplit(_Record):
    prefix: str = Field(min_length=1, max_length=512)
    """``.bin``/``.idx`` pair relative to the prepared directory."""
    num_tokens: _Count
    num_documents: _Count
    bin_sha256: _Sha256
    idx_sha256: _Sha256


class SourceEntry(_Record):
    documents: _Count
    bytes: _Count
    skipped: dict[str, _Count]
    max_token_id: int = Field(ge=-1, lt=2**32)
    splits: dict[Literal["train", "val"], ModmoeSplit | MegatronSplit] = Field(min_length=2)


class PreparedIndex(_Record):
    producer: str
    format_version: int
    fingerprint: str = Field(pattern=r"^[0-9a-f]{1,64}$")
    fingerprint_fields: dict[str, Any]
    vocab_size: int = Field(ge=1, le=2**32)
    eos_token: str = Field(max_length=1024)
    eot_id: int = Field(ge=0, lt=2**32)
    pad_id: int | None = Field(default=None, ge=0, lt=2**32)
    output_format: Literal["modmoe", "megatron"]
    dtype: str = Field(max_length=16)
    sources: dict[SourceName, SourceEntry] = Field(min_length=1)


def read_index_file(path: Path, producer: str, version: int) -> dict[str, Any]:
    """The index at ``path`` as plain data, after its producer, version, shape and paths were
    checked; a one-line :class:`DataError` otherwise."""
    try:
        data = read_json(path, MAX_INDEX_BYTES)
        if not isinstance(data, dict) or data.get("producer") != producer:
            raise DataError(f"{path}: not an index written by modmoe (no producer {producer!r})")
        if data.get("format_version") != version:
            found = data.get("format_version")
            raise DataError(f"{path}: format_version {found!r} is not the supported {version} (prepare again)")
        index = validate_record(PreparedIndex, data, str(path))
    except JSONInputError as err:
        raise DataError(str(err)) from None
    root = path.parent
    for name, entry in index.sources.items():
        for split, files in entry.splits.items():
            if isinstance(files, MegatronSplit) != (index.output_format == "megatron"):
                raise DataError(f"{path}: sources.{name}.splits.{split} is not of output_format {index.output_format!r}")
            if isinstance(files, MegatronSplit) and (why := escape_problem(root, f"{files.prefix}.bin")):
                raise DataError(f"{path}: sources.{name}.splits.{split}.prefix: {why}")
    return data
