"""Full per-parameter training state from a checkpoint written by DeepSpeed's ``save_checkpoint``.

What a tag directory (``global_step100/``) holds, per ZeRO stage:

- stage 0: ``mp_rank_00_model_states.pt`` has the module's weights (``module``) and the plain
  torch optimizer's state dict (``optimizer``), whose entries are numbered by position.
- stages 1 and 2: ``mp_rank_00_model_states.pt`` lists ``param_shapes`` (one ordered
  name -> shape dict per param group, in the order of the flat buffers) and each data-parallel
  rank's ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds its contiguous slice of every
  group's flat fp32 buffer and of the Adam moments. A group is the parameters laid end to end
  (with ``param_alignment_paddings`` after each), cut into equal slices over the ranks; the
  tail padding of the last slice(s) is dropped from the fp32 slices but kept in the moments.
- stage 3: every rank has its own model-states file (rank 0's ``param_shapes`` covers all) and
  optimizer file; each *parameter* is cut into ``ceil(numel / ranks)`` pieces (the last padded),
  and a rank's flat buffers are its pieces of all parameters in ``param_shapes`` order.

Tensors are read memory-mapped; a parameter that lies inside one slice is returned as a view
of it, one spread over slices is concatenated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkpoints_tools.convert_errors import ConvertError
from checkpoints_tools.convert_paths import safe_child
from checkpoints_tools.convert_torchload import load_pt

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
ALLOWED_STATE_KEYS = ("step", *ADAM_KEYS)
MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


@dataclass
class ParamState:
    """Full fp32 master weight and Adam state of one parameter."""

    fp32: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # 0-d, as the optimizer stored it


@dataclass
class DeepSpeedState:
    tag_dir: Path
    zero_stage: int
    world_size: int
    global_steps: int
    params: dict[str, ParamState] = field(default_factory=dict)
    """Trained parameters in DeepSpeed's order, names without a ``module.`` prefix."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied parameters: name -> the name in ``params`` it shares storage with."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """Persistent buffers (e.g. ``expert_bias``)."""


def _strip(name: str) -> str:
    return name.removeprefix("module.")


# ---------------------------------------------------------------------------- locating files
def find_tag_dir(src: Path, tag: str | None) -> Path:
    """The tag directory for ``src``: ``src`` itself when it holds model-states files, else
    ``src/<tag>`` with the tag from ``--tag`` or ``src/latest``."""
    if not src.is_dir():
        raise ConvertError(f"SRC {src}: not a directory")
    if (src / "manifest.json").is_file() or any(src.glob("step_*/manifest.json")):
        raise ConvertError(
            f"SRC {src}: is a modmoe (DCP) checkpoint; --to dcp reads DeepSpeed checkpoints (use --to deepspeed for this one)"
        )
    if tag is None and any(_MODEL_RE.match(p.name) for p in src.iterdir()):
        return src
    what = "tag"
    if tag is None:
        latest, what = src / "latest", f"tag (in {src / 'latest'})"
        if not latest.is_file():
            raise ConvertError(
                f"SRC {src}: no DeepSpeed checkpoint (expected a 'latest' file naming a tag directory, or a tag "
                f"directory holding {MODEL_FILE} or {ZERO3_MODEL_FILE.format(rank=0)})"
            )
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
    tag_dir = safe_child(src, tag, what)
    if not tag_dir.is_dir():
        raise ConvertError(f"SRC {src}: tag directory {tag!r} is missing")
    return tag_dir


def _optim_files(tag_dir: Path) -> list[Path]:
    """The ZeRO optimizer files, ordered by data-parallel rank (which must be 0..n-1)."""
    by_rank: dict[int, Path] = {}
    for p in tag_dir.iterdir():
        m = _OPTIM_RE.match(p.name)
        if m is None:
            continue
        if m.group(2) != "00":
            raise ConvertError(
                f"{p}: mp_rank {m.group(2)}: tensor/pipeline-parallel checkpoints are not supported (only mp_rank_00)"
            )
        by_rank[int(m.group(1))] = p
    if by_rank and sorted(by_rank) != list(range(len(by_rank))):
        missing = min(set(range(max(by_rank) + 1)) - set(by_rank))
        raise ConvertError(
            f"{tag_dir}: the optimizer file of data-parallel rank {missing} is missing (found ranks {sorted(by_rank)})"
        )
    return [by_rank[r] for r in range(len(by_rank))]


def _check_layout(tag_dir: Path) -> None:
    for p in tag_dir.iterdir():
        if p.name.startswith(("layer_", "expp_rank_")) and p.name.endswith(".pt"):
            raise ConvertError(
                f"{p}: DeepSpeed MoE expert/pipeline files are not supported (only dense ZeRO checkpoints)"
            )
        m = _MODEL_RE.match(p.name)
        if m and m.group(2) != "00":
            raise ConvertError(
                f"{p}: mp_rank {m.group(2)}: tensor/pipeline-parallel checkpoints are not supported (only mp_rank_00)"
            )


# ---------------------------------------------------------------------------- common fields
def _field(sd: dict, key: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(sd, dict) or key not in sd:
        raise ConvertError(f"{path}: field {key!r} is missing")
    if not isinstance(sd[key], kind):
        allowed = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConvertError(f"{path}: field {key!r} is a {type(sd[key]).__name__} (expected a {allowed})")
    return sd[key]


def _adam_state(st: Any, where: str) -> dict[str, Any]:
    if not isinstance(st, dict) or not st:
        raise ConvertError(f"{where}: no optimizer state (saved before the first optimizer step?)")
    unknown = sorted(set(st) - set(ALLOWED_STATE_KEYS))
    if unknown:
        raise ConvertError(
            f"{where}: unknown optimizer state key {unknown[0]!r} (allowed: {', '.join(ALLOWED_STATE_KEYS)}: Adam/AdamW)"
        )
    for key in ADAM_KEYS:
        if not torch.is_tensor(st.get(key)):
            raise ConvertError(f"{where}: optimizer state {key!r} is missing")
    return st


def _step_tensor(value: Any, where: str) -> torch.Tensor:
    if torch.is_tensor(value) and value.numel() == 1:
        return value.reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    raise ConvertError(f"{where}: optimizer state 'step' is missing or not a number")


def _model_common(model_sd: dict, path: Path, state: DeepSpeedState) -> None:
    """Buffers, tied parameters and the frozen-parameter check shared by all stages."""
    module = _field(model_sd, "module", path, dict)
    for name in _field(model_sd, "buffer_names", path, list):
        if name not in module:
            raise ConvertError(f"{path}: buffer {name!r} is listed in buffer_names but missing from module")
        state.buffers[_strip(name)] = module[name]
    frozen = model_sd.get("frozen_param_shapes") or {}
    if frozen:
        raise ConvertError(
            f"{path}: field 'frozen_param_shapes' lists {len(frozen)} frozen parameter(s) (e.g. {next(iter(frozen))!r}): "
            "only checkpoints whose parameters are all trained are supported"
        )


def _resolve_aliases(model_sd: dict, path: Path, state: DeepSpeedState) -> None:
    for alias, source in (model_sd.get("shared_params") or {}).items():
        if _strip(source) not in state.params:
            raise ConvertError(f"{path}: shared_params: {alias!r} shares {source!r}, which has no saved state")
        state.aliases[_strip(alias)] = _strip(source)


def _check_all_trained(module: dict, path: Path, state: DeepSpeedState) -> None:
    """Every module entry must be a buffer or a parameter with optimizer state (else it was
    frozen at ZeRO-1, where DeepSpeed does not record it)."""
    known = set(state.params) | set(state.aliases) | set(state.buffers)
    for name in module:
        if _strip(name) not in known:
            raise ConvertError(
                f"{path}: module entry {name!r} has no optimizer state (frozen parameters are not supported)"
            )


# ---------------------------------------------------------------------------- ranges
class _Slices:
    """One flat tensor of a param group that is stored as consecutive per-rank slices."""

    def __init__(self, pieces: list[torch.Tensor]) -> None:
        self.pieces = pieces
        self.starts = [0]
        for p in pieces:
            self.starts.append(self.starts[-1] + p.numel())

    def take(self, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)``: a view when one slice holds them all."""
        out, pos, end = [], start, start + numel
        for piece, lo, hi in zip(self.pieces, self.starts, self.starts[1:]):
            if hi <= pos or lo >= end:
                continue
            a, b = max(pos, lo), min(end, hi)
            out.append(piece.narrow(0, a - lo, b - a))
        return out[0] if len(out) == 1 else torch.cat(out)  # (numel,)


# ---------------------------------------------------------------------------- stage 0
def _read_stage0(path: Path, model_sd: dict, state: DeepSpeedState) -> None:
    _model_common(model_sd, path, state)
    module = model_sd["module"]
    optim = model_sd.get("optimizer")
    if not isinstance(optim, dict) or set(optim) != {"state", "param_groups"}:
        keys = sorted(optim) if isinstance(optim, dict) else type(optim).__name__
        raise ConvertError(
            f"{path}: field 'optimizer' = {keys}: only a plain torch optimizer's state dict (keys param_groups, state) "
            "is supported without ZeRO (fp16/bf16 optimizer wrappers are not)"
        )
    # Tied weights appear under every name in the module but once in the optimizer.
    first_by_storage: dict[tuple, str] = {}
    param_names: list[str] = []
    for name, t in module.items():
        if _strip(name) in state.buffers:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() > 0 and key in first_by_storage:
            state.aliases[_strip(name)] = _strip(first_by_storage[key])
        else:
            first_by_storage[key] = name
            param_names.append(name)
    groups = optim["param_groups"]
    if all("param_names" in g for g in groups):
        ids = [(i, n) for g in groups for i, n in zip(g["params"], g["param_names"], strict=True)]
    elif len(groups) == 1:
        # Entries are numbered by position; one group built from module.parameters() is the
        # only layout whose order is known. Shapes are checked below.
        if len(groups[0]["params"]) != len(param_names):
            raise ConvertError(
                f"{path}: optimizer has {len(groups[0]['params'])} parameters, module has {len(param_names)}: "
                "without param_names the optimizer must hold every module parameter in module order"
            )
        ids = list(zip(groups[0]["params"], param_names))
    else:
        raise ConvertError(
            f"{path}: optimizer has {len(groups)} param groups without 'param_names': which entry is which parameter "
            "is unknown (build the optimizer from named_parameters(), or use ZeRO stage 1+)"
        )
    for idx, name in ids:
        if name not in module:
            raise ConvertError(f"{path}: optimizer param_names has {name!r}, which the module does not have")
        weight = module[name]
        if weight.dtype != torch.float32:
            raise ConvertError(
                f"{path}: module.{name} is {weight.dtype}: without ZeRO only fp32 training keeps the master weights here"
            )
        st = _adam_state(optim["state"].get(idx), f"{path}: optimizer state {idx} ({name})")
        for key in ADAM_KEYS:
            if st[key].shape != weight.shape:
                raise ConvertError(
                    f"{path}: optimizer state {idx} {key} has shape {list(st[key].shape)}, parameter {name!r} has "
                    f"{list(weight.shape)} (optimizer order differs from module order)"
                )
        state.params[_strip(name)] = ParamState(
            weight, st["exp_avg"], st["exp_avg_sq"], _step_tensor(st.get("step"), f"{path}: state {idx}")
        )
    _check_all_trained(module, path, state)


# ---------------------------------------------------------------------------- stages 1 and 2
def _rank_group_state(osd: dict, g: int, path: Path) -> dict[str, Any]:
    base = _field(osd, "base_optimizer_state", path, (dict, list))
    if isinstance(base, list):  # elastic layout: one lean state per group
        st = dict(base[g]) if g < len(base) else None
        if st is not None and "step" not in st and "base_optimizer_state_step" in osd:
            st["step"] = osd["base_optimizer_state_step"]
    else:  # the torch optimizer's own state dict: one flat parameter per group
        groups = _field(base, "param_groups", path, list)
        idx = groups[g]["params"][0] if g < len(groups) and groups[g].get("params") else None
        st = base.get("state", {}).get(idx)
    return _adam_state(st, f"{path}: param group {g}")


def _read_stage12(path: Path, model_sd: dict, files: list[Path], state: DeepSpeedState) -> None:
    tag_dir = state.tag_dir
    _model_common(model_sd, path, state)
    shapes = _field(model_sd, "param_shapes", path, list)
    osds = [_field(load_pt(f, mmap=True), "optimizer_state_dict", f, dict) for f in files]
    world = len(files)
    for f, osd in zip(files, osds):
        counts = osd.get("partition_count")
        counts = counts if isinstance(counts, list) else [counts]
        if any(c != world for c in counts):
            raise ConvertError(
                f"{f}: field 'partition_count' = {osd.get('partition_count')}: expected {world} (one optimizer file per data-parallel rank)"
            )
        n_groups = len(_field(osd, "single_partition_of_fp32_groups", f, list))
        if n_groups != len(shapes):
            raise ConvertError(f"{f}: {n_groups} flat fp32 groups, but {path} param_shapes has {len(shapes)} groups")
    paddings = osds[0].get("param_alignment_paddings") or [[0] * len(s) for s in shapes]
    for g, group_shapes in enumerate(shapes):
        names = list(group_shapes)
        numels = [math.prod(group_shapes[n]) for n in names]
        pads = list(paddings[g]) if g < len(paddings) else []
        if len(pads) != len(names):
            raise ConvertError(
                f"{files[0]}: param_alignment_paddings of group {g} has {len(pads)} entries for {len(names)} parameters"
            )
        total = sum(numels) + sum(pads)
        flats = [osd["single_partition_of_fp32_groups"][g].reshape(-1) for osd in osds]
        tails = [int(_field(osd, "group_paddings", f, list)[g]) for osd, f in zip(osds, files)]
        # fp32 slices come without their tail padding (ZeRO-1/2) or with it (bf16 optimizer).
        if sum(t.numel() for t in flats) == total:
            real = [t.numel() for t in flats]
        elif sum(t.numel() - pad for t, pad in zip(flats, tails)) == total:
            real = [t.numel() - pad for t, pad in zip(flats, tails)]
        else:
            raise ConvertError(
                f"{tag_dir}: param group {g}: the ranks' fp32 slices hold {sum(t.numel() for t in flats)} elements, "
                f"param_shapes need {total} (mismatched partitions: files of different saves or world sizes?)"
            )
        group_states = [_rank_group_state(osd, g, f) for osd, f in zip(osds, files)]
        moments: dict[str, _Slices] = {}
        for key in ADAM_KEYS:
            pieces = []
            for r, st in enumerate(group_states):
                t = st[key].reshape(-1)
                if t.numel() not in (real[r], real[r] + tails[r]):
                    raise ConvertError(
                        f"{files[r]}: param group {g} {key} has {t.numel()} elements, its fp32 slice {real[r]} (mismatched partitions)"
                    )
                pieces.append(t.narrow(0, 0, real[r]))
            moments[key] = _Slices(pieces)
        steps = [_step_tensor(st.get("step"), f"{f}: param group {g}") for st, f in zip(group_states, files)]
        if any(not torch.equal(s, steps[0]) for s in steps):
            raise ConvertError(
                f"{tag_dir}: param group {g}: ranks disagree on the Adam step ({[float(s) for s in steps]})"
            )
        fp32 = _Slices([t.narrow(0, 0, n) for t, n in zip(flats, real)])
        offset = 0
        for name, numel, pad in zip(names, numels, pads):
            shape = tuple(group_shapes[name])
            state.params[_strip(name)] = ParamState(
                fp32.take(offset, numel).view(shape),
                moments["exp_avg"].take(offset, numel).view(shape),
                moments["exp_avg_sq"].take(offset, numel).view(shape),
                steps[0].clone(),
            )
            offset += numel + pad
    _resolve_aliases(model_sd, path, state)
    _check_all_trained(model_sd["module"], path, state)


# ---------------------------------------------------------------------------- stage 3
def _unpartition(per_rank: list[torch.Tensor], pos: int, part: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank r's piece is ``per_rank[r][pos : pos + part]``; the pieces in rank order, without
    the padding at the end, are the parameter."""
    flat = torch.cat([t.narrow(0, pos, part) for t in per_rank])  # (ranks * part,)
    return flat.narrow(0, 0, math.prod(shape)).view(shape)


def _read_stage3(path: Path, model_sd: dict, files: list[Path], state: DeepSpeedState) -> None:
    tag_dir, world = state.tag_dir, len(files)
    for p in (tag_dir / ZERO3_MODEL_FILE.format(rank=r) for r in range(world)):
        if not p.is_file():
            raise ConvertError(
                f"{p}: missing (ZeRO-3 writes one model-states file per rank; {world} optimizer files found)"
            )
    _model_common(model_sd, path, state)
    shapes = {n: tuple(s) for group in _field(model_sd, "param_shapes", path, list) for n, s in group.items()}
    flats: list[list[torch.Tensor]] = []  # [rank][sub-group] (partition numel,)
    sub_states: list[list[dict]] = []
    step = None
    for f in files:
        osd = _field(load_pt(f, mmap=True), "optimizer_state_dict", f, dict)
        if osd.get("partition_count") != world:
            raise ConvertError(
                f"{f}: field 'partition_count' = {osd.get('partition_count')}: expected {world} (one optimizer file per data-parallel rank)"
            )
        groups = [t.reshape(-1) for t in _field(osd, "fp32_flat_groups", f, list)]
        inner = _field(osd, "optimizer_state_dict", f, dict)
        sts = [_adam_state(inner.get("state", {}).get(i), f"{f}: sub-group {i}") for i in range(len(groups))]
        for i, (t, st) in enumerate(zip(groups, sts)):
            if any(st[k].numel() != t.numel() for k in ADAM_KEYS):
                raise ConvertError(f"{f}: sub-group {i}: Adam state and fp32 partition differ in size")
            s = _step_tensor(st.get("step"), f"{f}: sub-group {i}")
            if step is None:
                step = s
            elif not torch.equal(s, step):
                raise ConvertError(f"{tag_dir}: sub-groups disagree on the Adam step ({float(step)} vs {float(s)})")
        if flats and [t.numel() for t in groups] != [t.numel() for t in flats[0]]:
            raise ConvertError(
                f"{f}: partition sizes {[t.numel() for t in groups]} differ from rank 0's {[t.numel() for t in flats[0]]} (mismatched partitions)"
            )
        flats.append(groups)
        sub_states.append(sts)
    sizes = [t.numel() for t in flats[0]]
    sub, pos = 0, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)  # each rank's piece; the last ranks' pieces end in padding
        while sub < len(sizes) and pos == sizes[sub] and part > 0:
            sub, pos = sub + 1, 0
        if sub >= len(sizes) or pos + part > sizes[sub]:
            raise ConvertError(
                f"{tag_dir}: parameter {name!r} does not fit the saved partitions (mismatched partitions)"
            )
        state.params[_strip(name)] = ParamState(
            _unpartition([flats[r][sub] for r in range(world)], pos, part, shape),
            _unpartition([sub_states[r][sub]["exp_avg"].reshape(-1) for r in range(world)], pos, part, shape),
            _unpartition([sub_states[r][sub]["exp_avg_sq"].reshape(-1) for r in range(world)], pos, part, shape),
            step.clone(),
        )
        pos += part
    while sub < len(sizes) and pos == sizes[sub]:
        sub, pos = sub + 1, 0
    if sub < len(sizes):
        raise ConvertError(
            f"{tag_dir}: the saved partitions hold more than param_shapes describes (mismatched partitions)"
        )
    _resolve_aliases(model_sd, path, state)
    _check_all_trained(model_sd["module"], path, state)


# ---------------------------------------------------------------------------- entry
def read_deepspeed(src: Path, tag: str | None = None) -> DeepSpeedState:
    """Reads the DeepSpeed checkpoint at ``src`` (the directory holding ``latest``, or a tag
    directory); raises :class:`ConvertError` with one line naming the problem."""
    tag_dir = find_tag_dir(Path(src), tag)
    _check_layout(tag_dir)
    files = _optim_files(tag_dir)
    osd0 = _field(load_pt(files[0], mmap=True), "optimizer_state_dict", files[0], dict) if files else {}
    zero3 = "fp32_flat_groups" in osd0
    model_path = tag_dir / (ZERO3_MODEL_FILE.format(rank=0) if zero3 else MODEL_FILE)
    if not model_path.is_file():
        raise ConvertError(
            f"{model_path}: missing (the model-states file of this {'ZeRO-3' if zero3 else 'ZeRO'} checkpoint)"
        )
    model_sd = load_pt(model_path, mmap=True)
    steps = _field(model_sd, "global_steps", model_path, int)
    if not files:
        state = DeepSpeedState(tag_dir, 0, 1, steps)
        _read_stage0(model_path, model_sd, state)
    elif zero3:
        state = DeepSpeedState(tag_dir, 3, len(files), steps)
        _read_stage3(model_path, model_sd, files, state)
    elif "single_partition_of_fp32_groups" in osd0:
        state = DeepSpeedState(tag_dir, int(osd0.get("zero_stage", 1)), len(files), steps)
        _read_stage12(model_path, model_sd, files, state)
    else:
        raise ConvertError(
            f"{files[0]}: optimizer_state_dict has neither 'fp32_flat_groups' (ZeRO-3) nor "
            "'single_partition_of_fp32_groups' (ZeRO-1/2): not a ZeRO optimizer file"
        )
    return state
