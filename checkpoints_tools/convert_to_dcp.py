"""DeepSpeed checkpoint -> committed modmoe checkpoint (``DST/step_XXXXXXXX/``).

The reconstructed full tensors are written by the real :class:`CheckpointManager` (single
process, no process group) in the layout-neutral format of ``modmoe/checkpoint/train_state.py``,
so the result is committed, checksummed and resumable like any checkpoint a run wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from checkpoints_tools.convert_ds_read import DeepSpeedState, read_deepspeed
from checkpoints_tools.convert_errors import ConvertError
from checkpoints_tools.convert_paths import require_empty_dst
from modmoe.checkpoint import CheckpointConfig, CheckpointManager
from modmoe.checkpoint.manifest import step_dirname
from modmoe.checkpoint.rng import capture_rng, reseed_rng, restore_rng
from modmoe.checkpoint.train_state import MODEL_KEY, OPTIM_KEY, OPTIM_STATE_KEY, SCHEDULER_KEY
from modmoe.config import JobConfig, load_config
from modmoe.config_base import ConfigError

APP_KEY = "train"  # the trainer's app-state name: keys become train.model.<fqn>, ...


class TensorTree(Stateful):
    """A nested dict of plain tensors offered to DCP as it is (and filled in place on load)."""

    holds_model = True  # weights under MODEL_KEY: the manifest records the model prefix

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree

    def state_dict(self) -> dict[str, Any]:
        return self.tree

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tree = state_dict


def _tree(state: DeepSpeedState) -> dict[str, Any]:
    model: dict[str, torch.Tensor] = {name: p.fp32.detach() for name, p in state.params.items()}
    model.update({alias: model[source] for alias, source in state.aliases.items()})
    model.update(state.buffers)
    optim = {
        name: {"exp_avg": p.exp_avg.detach(), "exp_avg_sq": p.exp_avg_sq.detach(), "step": p.step.detach()}
        for name, p in state.params.items()
    }
    return {
        MODEL_KEY: model,
        OPTIM_KEY: {OPTIM_STATE_KEY: optim},
        SCHEDULER_KEY: {"last_epoch": torch.tensor(state.global_steps, dtype=torch.int64)},
    }


def check_against_model(model_tensors: dict[str, torch.Tensor], cfg: JobConfig, config_path: Path) -> None:
    """The converted weights must be exactly ``MoDETransformer(cfg.model)``'s state dict:
    names the first missing, extra or differently shaped tensor."""
    from modmoe.model import MoDETransformer

    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in MoDETransformer(cfg.model).state_dict().items()}
    for name, shape in expected.items():
        if name not in model_tensors:
            raise ConvertError(
                f"--config {config_path}: tensor {name!r} of MoDETransformer(model) is not in the checkpoint"
            )
        if tuple(model_tensors[name].shape) != shape:
            raise ConvertError(
                f"--config {config_path}: tensor {name!r} has shape {list(model_tensors[name].shape)} in the checkpoint, "
                f"{list(shape)} in MoDETransformer(model)"
            )
    extra = [name for name in model_tensors if name not in expected]
    if extra:
        raise ConvertError(f"--config {config_path}: checkpoint tensor {extra[0]!r} is not in MoDETransformer(model)")


def deepspeed_to_dcp(src: Path, dst: Path, tag: str | None = None, config_path: Path | None = None) -> dict[str, Any]:
    """Converts the DeepSpeed checkpoint ``src`` into ``dst/step_<global_steps>/``; returns a summary."""
    src, dst = Path(src), Path(dst)
    require_empty_dst(dst)
    state = read_deepspeed(src, tag)
    tree = _tree(state)
    # Sampler position and the source ranks' RNG are not in a DeepSpeed checkpoint (see docs).
    meta: dict[str, Any] = {"step": state.global_steps}
    if config_path is not None:
        try:
            cfg = load_config(config_path)
        except ConfigError as err:
            raise ConvertError(f"--config {config_path}: {err}") from None
        check_against_model(tree[MODEL_KEY], cfg, config_path)
        meta["config"] = cfg.model_dump(mode="json")
    saved_rng = capture_rng()
    # rank 0's RNG file gets the state modmoe gives a rank without one, not this process's.
    reseed_rng(state.global_steps, 0)
    try:
        manager = CheckpointManager(dst, CheckpointConfig(keep_last=0))
        try:
            manager.save(state.global_steps, {APP_KEY: TensorTree(tree)}, meta)
        finally:
            manager.close()
    finally:
        restore_rng(saved_rng)
    out = dst / step_dirname(state.global_steps)
    return {
        "source": str(state.tag_dir),
        "out": str(out),
        "zero_stage": state.zero_stage,
        "world_size": state.world_size,
        "step": state.global_steps,
        "parameters": len(state.params),
        "buffers": len(state.buffers),
    }
