"""The allowlisted DCP index reader, its shape checks, and that no other code reads pickles."""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from runs import REPO
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from modmoe.checkpoint.safe_read import (
    RestrictedUnpickler,
    UnsafeCheckpointError,
    metadata_problems,
    torch_save_problem,
    weights_only_loads,
)


def _tensor(shape, chunks) -> TensorStorageMetadata:
    return TensorStorageMetadata(
        TensorProperties(dtype=torch.float32),
        torch.Size(shape),
        [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks],
    )


def _index(entries: dict, storage: dict) -> Metadata:
    return Metadata(state_dict_metadata=entries, storage_data=storage)


def good() -> Metadata:
    return _index(
        {"w": _tensor([4, 2], [([0, 0], [2, 2]), ([2, 0], [2, 2])])},
        {
            MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("a.distcp", 0, 100),
            MetadataIndex("w", torch.Size([2, 0])): _StorageInfo("a.distcp", 100, 100),
        },
    )


FILES = {"a.distcp": 200, ".metadata": 1}


def test_a_real_index_round_trips_and_passes():
    md = RestrictedUnpickler(io.BytesIO(pickle.dumps(good()))).load()
    assert md.state_dict_metadata["w"].size == torch.Size([4, 2])
    assert metadata_problems(md, FILES, allow_bytes=False) == []


@pytest.mark.parametrize(
    "payload",
    [
        b"cos\nsystem\n(S'echo no'\ntR.",  # protocol 0 GLOBAL
        pickle.dumps(eval),  # a builtin function by reference
        pickle.dumps(Path("x").read_text),  # a bound method needs getattr
        pickle.dumps(io.BytesIO(b"")),
    ],
)
def test_anything_else_is_refused_before_lookup(payload):
    with pytest.raises(UnsafeCheckpointError, match="names the global"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


def _mutate(fn) -> list[str]:
    md = good()
    fn(md)
    return metadata_problems(md, FILES, allow_bytes=False)


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            lambda md: md.storage_data.update(
                {MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("/etc/passwd", 0, 1)}
            ),
            "does not list",
        ),
        (
            lambda md: md.storage_data.update(
                {MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("a.distcp", 150, 100)}
            ),
            "which has 200",
        ),
        (
            lambda md: md.storage_data.update(
                {MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("a.distcp", 50, 100)}
            ),
            "overlap",
        ),
        (
            lambda md: md.storage_data.update(
                {MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("a.distcp", 0, 100, ["zstd"])}
            ),
            "transforms",
        ),
        (
            lambda md: md.state_dict_metadata.update(w=_tensor([10**12, 2], [([0, 0], [2, 2]), ([2, 0], [2, 2])])),
            "elements",
        ),
        (lambda md: md.state_dict_metadata.update(w=_tensor([4, 2], [([0, 0], [9, 2])])), "outside its size"),
        (lambda md: md.state_dict_metadata.update(w=BytesStorageMetadata()), "pickled Python object"),
        (lambda md: md.state_dict_metadata.update({1: BytesStorageMetadata()}), "key of type int"),
        (lambda md: setattr(md, "storage_data", None), "lacks"),
    ],
)
def test_a_hostile_index_is_named(mutation, expected):
    problems = _mutate(mutation)
    assert problems and any(expected in p for p in problems), problems


# A class no library registers as weights-only safe (megatron.core registers BytesIO and others
# process-wide when it is imported: docs/security.md).
ODD = Fraction(1, 3)


def test_torch_save_globals_are_listed_without_loading(tmp_path):
    buf = io.BytesIO()
    torch.save({"t": torch.zeros(2), "odd": ODD}, buf)
    assert "fractions.Fraction" in torch_save_problem("item", buf.getvalue())
    assert torch_save_problem("item", buf.getvalue(), allowed=["fractions.Fraction"]) is None
    assert "not a readable torch.save file" in torch_save_problem("item", b"garbage")


def test_weights_only_is_forced_and_restored(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    buf = io.BytesIO()
    torch.save({"odd": ODD}, buf)
    with weights_only_loads(), weights_only_loads():  # nests
        buf.seek(0)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(buf, weights_only=False)
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ---------------------------------------------------------------------------- the source tree
SAFE_READER = Path("modmoe/checkpoint/safe_read.py")
FORBIDDEN = {
    "pickle.load": "unpickles without the allowlist",
    "pickle.loads": "unpickles without the allowlist",
    "pickle.Unpickler": "unpickles without the allowlist",
    "FileSystemReader": "DCP's reader unpickles the index as it is",
    "dcp.load": "must go through modmoe.checkpoint.reader.safe_dcp_load",
    "yaml.load": "use yaml.safe_load or modmoe.config_yaml",
}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_reader_outside_the_safe_one_unpickles():
    """Every pickle read in the product goes through modmoe/checkpoint/safe_read.py; every
    ``torch.load`` says ``weights_only=True``."""
    offenders = []
    for root in ("modmoe", "checkpoints_tools"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel == SAFE_READER:
                continue
            for node, name in _calls(ast.parse(path.read_text())):
                why = FORBIDDEN.get(name) or (
                    FORBIDDEN["FileSystemReader"] if re.search(r"(^|\.)FileSystemReader$", name) else None
                )
                if name == "torch.load":
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    why = None if kw.get("weights_only") == "True" else "torch.load without weights_only=True"
                if why and not (name == "dcp.load" and rel == Path("modmoe/checkpoint/reader.py")):
                    offenders.append(f"{rel}:{node.lineno}: {name}: {why}")
    assert offenders == []
