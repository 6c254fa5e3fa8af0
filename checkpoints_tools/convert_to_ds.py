"""modmoe checkpoint -> DeepSpeed *universal checkpoint*, which DeepSpeed loads into any ZeRO
stage (1-3) and data-parallel world size with ``"checkpoint": {"load_universal": true}``.

What DeepSpeed 0.19's loader reads (``runtime/engine.py`` ``load_checkpoint``,
``checkpoint/universal_checkpoint.py``, ``runtime/base_optimizer.py``, ``runtime/zero/stage3.py``)::

    DST/latest_universal                     the tag
    DST/<tag>/mp_rank_00_model_states.pt     global_steps, lr_scheduler, ... (ZeRO-1/2 glob)
    DST/<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt   the same file (ZeRO-3 glob)
    DST/<tag>/zero/optimizer_state.pt        ds_version, param group hyper-parameters, step
    DST/<tag>/zero/<param>/fp32.pt           {"param": full fp32 tensor}
    DST/<tag>/zero/<param>/exp_avg.pt        {"param": ...}, exp_avg_sq.pt likewise
    DST/<tag>/zero/<param>/step.pt           the Adam step (0-d tensor)

The universal loader restores parameters and Adam state only; buffers (``expert_bias``) are put
in the model-states file's ``module`` entry for the caller to load. Tensors are read from the
DCP checkpoint in groups of bounded size and written one file each, so memory stays about one
group. Everything is written under ``DST/.tmp-<tag>`` and renamed into place, then
``latest_universal`` is written last.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from checkpoints_tools.convert_errors import ConvertError
from checkpoints_tools.convert_paths import require_empty_dst, safe_child
from modmoe.checkpoint.fsutil import fsync_dir, fsync_file
from modmoe.checkpoint.manifest import LAYOUT_MEGATRON, MANIFEST_NAME, CheckpointError, Manifest, validate
from modmoe.checkpoint.reader import TensorSpec, load_tensor_groups, model_tensors, read_dcp_metadata
from modmoe.checkpoint.train_state import MODEL_KEY, OPTIM_KEY, OPTIM_STATE_KEY, SCHEDULER_KEY
from modmoe.config_base import format_validation_error
from modmoe.train.config import OptimizerConfig
from modmoe.train.optim import lr_factor

# The release whose loader this layout was checked against; DeepSpeed's ZeRO-1/2 loader only
# needs a version string (it refuses none and those before 0.3.17).
DS_FORMAT_VERSION = "0.19.8"
STATE_KINDS = ("exp_avg", "exp_avg_sq", "step")
MODEL_STATE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
LATEST = "latest_universal"


def _classify(
    specs: list[TensorSpec], src: Path
) -> tuple[dict[str, TensorSpec], dict[str, dict[str, TensorSpec]], TensorSpec | None]:
    """Splits the app state's tensors into model weights, per-parameter optimizer state and the
    scheduler position; anything else is refused."""
    model: dict[str, TensorSpec] = {}
    optim: dict[str, dict[str, TensorSpec]] = {}
    last_epoch = None
    model_prefix, optim_prefix = f"{MODEL_KEY}.", f"{OPTIM_KEY}.{OPTIM_STATE_KEY}."
    for spec in specs:
        if spec.name.startswith(model_prefix):
            model[spec.name.removeprefix(model_prefix)] = spec
        elif spec.name.startswith(optim_prefix):
            param, _, kind = spec.name.removeprefix(optim_prefix).rpartition(".")
            if kind not in STATE_KINDS:
                raise ConvertError(
                    f"{src}: tensor {spec.fqn!r}: unknown optimizer state {kind!r} (allowed: {', '.join(STATE_KINDS)}: Adam/AdamW)"
                )
            optim.setdefault(param, {})[kind] = spec
        elif spec.name == f"{SCHEDULER_KEY}.last_epoch":
            last_epoch = spec
        else:
            raise ConvertError(
                f"{src}: tensor {spec.fqn!r}: not part of the train-state format (model., optim.state., lr_scheduler.last_epoch)"
            )
    if not optim:
        raise ConvertError(f"{src}: no optimizer state (optim.state.*): a universal checkpoint needs the Adam moments")
    for param, kinds in optim.items():
        missing = [k for k in STATE_KINDS if k not in kinds]
        if param not in model or missing:
            what = "its weight" if param not in model else f"optimizer state {missing[0]!r}"
            raise ConvertError(f"{src}: parameter {param!r} lacks {what} in the checkpoint")
    return model, optim, last_epoch


def _lr_at(meta: dict[str, Any], step: int) -> float | None:
    """The learning rate modmoe's schedule gives after ``step`` optimizer steps, when the
    checkpoint records the run's config (the trainer always does)."""
    config = meta.get("config")
    if not isinstance(config, dict) or "optimizer" not in config or "max_steps" not in config.get("trainer", {}):
        return None
    try:
        opt = OptimizerConfig.model_validate(config["optimizer"])
    except ValidationError as err:
        raise ConvertError(format_validation_error(err, "meta.config.optimizer", OptimizerConfig)) from None
    return opt.lr * lr_factor(step, opt, int(config["trainer"]["max_steps"]))


def _save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    fsync_file(path)


def dcp_to_universal(src: Path, dst: Path, group_bytes: int = 256 << 20) -> dict[str, Any]:
    """Converts the modmoe checkpoint ``src`` (a ``step_XXXXXXXX`` directory) into a universal
    checkpoint under ``dst``; returns a summary."""
    src, dst = Path(src), Path(dst)
    if not (src / MANIFEST_NAME).is_file():
        if (src / "latest").is_file() or any(src.glob("*_model_states.pt")) or any(src.glob("*/*_model_states.pt")):
            raise ConvertError(
                f"SRC {src}: is a DeepSpeed checkpoint; --to deepspeed reads modmoe checkpoints (use --to dcp for this one)"
            )
        if any(src.glob(f"step_*/{MANIFEST_NAME}")):
            raise ConvertError(f"SRC {src}: is a directory of checkpoints; pass one step_XXXXXXXX directory")
        raise ConvertError(f"SRC {src}: no {MANIFEST_NAME} (not a committed modmoe checkpoint)")
    require_empty_dst(dst)
    problems = validate(src)  # sizes and checksums of every file before anything is unpickled
    if problems:
        raise ConvertError(f"SRC {src}: refusing to convert an invalid checkpoint: {problems[0]}")
    try:
        manifest, md = read_dcp_metadata(src)
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    if manifest.layout == LAYOUT_MEGATRON:
        raise ConvertError(
            f"SRC {src}: a Megatron engine checkpoint; only native (dcp) checkpoints convert to DeepSpeed"
        )
    if not manifest.model_prefix or not manifest.model_prefix.endswith(f".{MODEL_KEY}."):
        raise ConvertError(
            f"{src / MANIFEST_NAME}: field model_prefix = {manifest.model_prefix!r}: expected '<app>.{MODEL_KEY}.'"
        )
    app_prefix = manifest.model_prefix[: -len(f"{MODEL_KEY}.")]
    model, optim, last_epoch_spec = _classify(model_tensors(md, app_prefix), src)
    buffers = [name for name in model if name not in optim]  # buffers, and tied weights' aliases

    tag = f"global_step{manifest.step}"
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".tmp-{tag}"
    try:
        _write(src, tmp, manifest, model, optim, last_epoch_spec, buffers, group_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # DST stays empty: the command can simply be re-run
        raise
    final = dst / tag
    os.rename(tmp, final)
    latest_tmp = dst / f".tmp-{LATEST}"
    latest_tmp.write_text(tag)
    fsync_file(latest_tmp)
    os.replace(latest_tmp, dst / LATEST)
    fsync_dir(dst)
    return {
        "source": str(src),
        "out": str(final),
        "step": manifest.step,
        "parameters": len(optim),
        "buffers": len(buffers),
    }


def _write(
    src: Path,
    tmp: Path,
    manifest: Manifest,
    model: dict[str, TensorSpec],
    optim: dict[str, dict[str, TensorSpec]],
    last_epoch_spec: TensorSpec | None,
    buffers: list[str],
    group_bytes: int,
) -> None:
    """Writes the whole tag directory into ``tmp``."""
    zero = tmp / "zero"
    param_dirs = {name: safe_child(zero, name, "parameter name") for name in optim}
    for d in param_dirs.values():
        d.mkdir(parents=True)

    # One parameter's tensors next to each other, so a group holds whole parameters when it can.
    order: list[tuple[TensorSpec, str, str]] = []  # (spec, parameter or buffer, kind)
    for name in optim:
        order.append((model[name], name, "fp32"))
        order += [(optim[name][kind], name, kind) for kind in STATE_KINDS]
    order += [(model[name], name, "buffer") for name in buffers]
    if last_epoch_spec is not None:
        order.append((last_epoch_spec, "", "last_epoch"))
    role = {spec.name: (name, kind) for spec, name, kind in order}

    module: dict[str, torch.Tensor] = OrderedDict()
    steps: dict[str, torch.Tensor] = {}
    last_epoch = manifest.step
    for group in load_tensor_groups(src, [spec for spec, _, _ in order], group_bytes):
        for spec_name, tensor in group.items():
            name, kind = role[spec_name]
            if kind == "buffer":
                module[name] = tensor
            elif kind == "last_epoch":
                last_epoch = int(tensor)
            elif kind == "step":
                steps[name] = tensor.reshape(())
                _save(tensor.reshape(()), param_dirs[name] / "step.pt")
            else:
                _save({"param": tensor}, param_dirs[name] / f"{kind}.pt")
        del group
    distinct = sorted({float(s) for s in steps.values()})
    if len(distinct) != 1:
        raise ConvertError(
            f"{src}: parameters have different Adam step counts ({distinct}); DeepSpeed steps all parameters together"
        )
    step = next(iter(steps.values()))

    # Hyper-parameters: only the learning rate at the saved position (the target's own config
    # keeps weight decay, betas, eps). DeepSpeed's ZeRO-1/2 loader restores param group i from
    # entry i and skips groups beyond the list, so there is one entry per parameter: no optimizer
    # has more non-empty groups than that. Its ZeRO-3 loader reads entry 0 and state 0's step.
    lr = _lr_at(manifest.meta, last_epoch)
    group_hparams = {"lr": lr} if lr is not None else {}
    _save(
        {
            "ds_version": DS_FORMAT_VERSION,
            "param_groups": [dict(group_hparams) for _ in optim],
            "optimizer_state_dict": {"state": {0: {"step": step.clone()}}, "param_groups": [dict(group_hparams)]},
        },
        zero / "optimizer_state.pt",
    )
    model_states = {
        "module": module,
        "buffer_names": buffers,
        "param_shapes": [OrderedDict((name, torch.Size(model[name].shape)) for name in optim)],
        "global_steps": manifest.step,
        "skipped_steps": 0,
        "dp_world_size": manifest.world_size,
        "mp_world_size": 1,
        # A torch LRScheduler's position (e.g. LambdaLR): it continues from the next step.
        "lr_scheduler": {"last_epoch": last_epoch, "_step_count": last_epoch + 1, "lr_lambdas": []},
        "ds_version": DS_FORMAT_VERSION,
    }
    for name in MODEL_STATE_FILES:
        _save(model_states, tmp / name)
    for d in [*param_dirs.values(), zero, tmp]:
        fsync_dir(d)
