"""The checkpoint an export reads: which one, is it sound, and its model tensors in bounded groups.

A source is a run directory (its newest valid checkpoint is taken) or one ``step_*``
checkpoint directory. Nothing in a checkpoint is unpickled before the manifest vouched for it:
the whole directory is validated (sizes and SHA-256 of every file), then DCP's ``.metadata``
(a pickle) is re-checked right before it is read. Tensors are loaded by DCP into full-size
plain CPU tensors, which reassembles them from whatever layout wrote them (data-, expert- or
tensor-parallel shards), so the export does not depend on the training layout.

A checkpoint of the Megatron engine (manifest layout ``megatron``) is read whole into a
Megatron model on CPU and converted to the native tensor names (it needs the ``megatron``
extra); its groups then come from memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from modmoe.checkpoint import find_latest_valid, validate
from modmoe.checkpoint.config import DIRNAME_PATTERN
from modmoe.checkpoint.manifest import LAYOUT_MEGATRON, MANIFEST_NAME, Manifest, read_manifest
from modmoe.checkpoint.reader import TensorSpec, load_tensor_groups, model_tensors, pack_by_bytes, read_dcp_metadata
from modmoe.config_base import ConfigError, validate_config
from modmoe.config_yaml import parse_yaml
from modmoe.errors import UserError
from modmoe.model_config import ModelConfig

log = logging.getLogger("modmoe.export")


class ExportError(UserError, ValueError):
    """An export cannot proceed; the message is one line naming the file or option."""


@dataclass(frozen=True)
class CheckpointSource:
    path: Path
    manifest: Manifest
    tensors: list[TensorSpec]  # the model's tensors, in checkpoint key order
    read_groups: Callable[[list[TensorSpec], int], Iterator[dict[str, torch.Tensor]]]
    """Yields ``{name: tensor}`` for the given specs in order, in groups of at most the given bytes."""

    @property
    def config(self) -> dict[str, Any]:
        """The resolved job config the trainer recorded in the manifest."""
        return _recorded_config(self.path, self.manifest)

    def model_config(self) -> ModelConfig:
        return _recorded_model_config(self.path, self.manifest)


def _recorded_config(path: Path, manifest: Manifest) -> dict[str, Any]:
    cfg = manifest.meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ExportError(f"{path}/{MANIFEST_NAME}: meta has no config.model (not written by the modmoe trainer?)")
    return cfg


def _recorded_model_config(path: Path, manifest: Manifest) -> ModelConfig:
    try:
        return validate_config(ModelConfig, _recorded_config(path, manifest)["model"], prefix="model")
    except (ConfigError, ValueError) as err:
        raise ExportError(f"{path}/{MANIFEST_NAME}: {err}") from None


def _ckpt_dirname(run_dir: Path) -> str:
    """The checkpoint directory name a run used (``checkpoint.dirname`` in its config.yaml)."""
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            data = parse_yaml(cfg_path.read_text(encoding="utf-8"), str(cfg_path)) or {}
        except (ConfigError, OSError, UnicodeDecodeError):
            return "checkpoints"
        section = data.get("checkpoint") if isinstance(data, dict) else None
        name = section.get("dirname") if isinstance(section, dict) else None
        if isinstance(name, str) and re.match(DIRNAME_PATTERN, name):
            return name  # one path component, as the trainer allows
    return "checkpoints"


def resolve_checkpoint(source: str | Path) -> tuple[Path, bool]:
    """A committed checkpoint directory for ``source`` (a run directory or a checkpoint), and
    whether it was already validated (the newest valid one of a run)."""
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{path}: does not exist (expected a run directory or a checkpoints/step_XXXXXXXX directory)")
    if (path / MANIFEST_NAME).is_file() or path.name.startswith("step_"):
        return path, False
    ckpt_dir = path / _ckpt_dirname(path)
    if not ckpt_dir.is_dir():
        raise ExportError(
            f"{path}: neither a checkpoint (no {MANIFEST_NAME}) nor a run directory (no {ckpt_dir.name}/)"
        )
    latest = find_latest_valid(ckpt_dir)
    if latest is None:
        raise ExportError(f"{ckpt_dir}: no valid checkpoint (every step_* directory is missing or fails validation)")
    return latest, True


def open_checkpoint(source: str | Path) -> CheckpointSource:
    """Validates the checkpoint and lists its model tensors (reads DCP's index only after its
    checksum matched the manifest)."""
    path, validated = resolve_checkpoint(source)
    problems = [] if validated else validate(path)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ExportError(f"refusing to export {path}: {problems[0]}{more}")
    if read_manifest(path).layout == LAYOUT_MEGATRON:
        return _open_megatron(path)
    manifest, metadata = read_dcp_metadata(path)
    prefix = manifest.model_prefix
    if not prefix:
        raise ExportError(
            f"{path}/{MANIFEST_NAME}: records no model_prefix, so the model's weights cannot be told apart"
        )
    tensors = model_tensors(metadata, prefix)
    if not tensors:
        raise ExportError(f"{path}: no tensor key starts with the model prefix {prefix!r}")
    return CheckpointSource(path, manifest, tensors, partial(load_tensor_groups, path))


def _open_megatron(path: Path) -> CheckpointSource:
    """A validated Megatron checkpoint, converted whole to the native state dict on CPU."""
    manifest = read_manifest(path)
    model_cfg = _recorded_model_config(path, manifest)
    try:
        from modmoe.engines.megatron.checkpoint import megatron_checkpoint_to_native
    except ImportError as err:
        raise ExportError(
            f"{path}: a Megatron engine checkpoint; reading it needs megatron-core "
            f"(pip install 'modmoe[megatron]'): {err}"
        ) from None
    state = megatron_checkpoint_to_native(path, model_cfg, check=False)  # validated above
    tensors = [TensorSpec(name, name, t.dtype, tuple(t.shape)) for name, t in state.items()]

    def read_groups(specs: list[TensorSpec], group_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        for group in pack_by_bytes(specs, lambda s: s.nbytes, group_bytes):
            yield {s.name: state[s.name] for s in group}

    return CheckpointSource(path, manifest, tensors, read_groups)
