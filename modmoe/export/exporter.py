"""``export_checkpoint``: a committed DCP checkpoint -> a Hugging Face style directory.

The weights stream shard by shard: each output shard's tensors are loaded by DCP, cast and
written with ``safetensors`` before the next shard is read, so peak memory is about one shard.
What is kept is exactly what inference needs (the keys of the inference model, checked
against the checkpoint by name and shape); optimizer, scheduler and RNG state live outside
the model's keys and are never read. ``expert_bias`` is kept: it steers the experts' top-k
choice. The directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modmoe.checkpoint.fsutil import sha256_file
from modmoe.checkpoint.reader import pack_by_bytes
from modmoe.config_base import ConfigError
from modmoe.data import DataError
from modmoe.data.tokenizer import EOT, PAD, load_tokenizer
from modmoe.export.source import CheckpointSource, ExportError, TensorSpec, open_checkpoint
from modmoe.inference import export_format as layout
from modmoe.inference.loading import is_export
from modmoe.model import ModelArgs, MoDETransformer
from modmoe.model_config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 2 << 30
TEMPLATE_DIR = Path(__file__).parent / "hf_template"  # the transformers wrapper shipped in each export
MODEL_DIR = Path(__file__).parents[1] / "model"  # the model package, copied file by file


@dataclass
class ExportSummary:
    out: Path
    checkpoint: Path
    step: int
    dtype: str
    tensors: int
    weight_bytes: int
    shards: int
    dropped: list[str] = field(default_factory=list)  # checkpoint model keys inference does not use


def _out_dtype(spec: TensorSpec, target: torch.dtype) -> torch.dtype:
    if not spec.dtype.is_floating_point:
        return spec.dtype
    return torch.float32 if layout.keeps_fp32(spec.name) else target


def _model_config(source: CheckpointSource) -> tuple[ModelConfig, ModelArgs]:
    model = source.model_config()
    try:
        return model, model.to_args()
    except (ConfigError, ValueError) as err:
        raise ExportError(f"{source.path}/manifest.json: {err}") from None


def _match_tensors(source: CheckpointSource, args: ModelArgs) -> tuple[list[TensorSpec], list[str]]:
    """The checkpoint tensors the model needs, in the model's order, and the unused keys."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoDETransformer(args).state_dict().items()}
    available = {s.name: s for s in source.tensors}
    specs = []
    for name, shape in expected.items():
        spec = available.get(name)
        if spec is None:
            raise ExportError(
                f"{source.path}: has no tensor {name!r}, which config.model implies (config and weights do not match)"
            )
        if spec.shape != shape:
            raise ExportError(
                f"{source.path}: tensor {name!r} has shape {list(spec.shape)}, config.model implies {list(shape)}"
            )
        specs.append(spec)
    return specs, sorted(set(available) - set(expected))


def _find_tokenizer(source: CheckpointSource, explicit: str | Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    data = source.config.get("data") or {}
    run_dir = source.path.parent.parent  # RUN_DIR/checkpoints/step_X
    candidates: list[Path] = []
    for key, leaf in (("prepared_dir", layout.TOKENIZER_NAME), ("tokenizer", None)):
        value = data.get(key)
        if not value:
            continue
        rel = Path(value) / leaf if leaf else Path(value)
        # A relative path was relative to the training job's working directory: try ours, then
        # the run directory and the directories above it.
        bases = [Path.cwd(), run_dir, *run_dir.resolve().parents] if not rel.is_absolute() else [Path("/")]
        candidates += [base / rel for base in bases]
    for path in candidates:
        if path.is_file():
            return path
    raise ExportError(
        f"{source.path}: the run's tokenizer.json was not found (data.prepared_dir = {data.get('prepared_dir')!r} "
        "from the checkpoint's config); pass --tokenizer PATH"
    )


def _eval_record(trainer: dict[str, Any]) -> dict[str, int]:
    """The run's validation set, for ``modmoe eval``: ``eval_batches`` global batches, in
    micro-batches (the Trainer evaluates the same sequences under every layout)."""
    micro = trainer.get("micro_batch_size", 8)
    per_global = max(trainer.get("global_batch_size", micro) // micro, 1)
    return {"batches": trainer.get("eval_batches", 4) * per_global, "batch_size": micro}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _write_record(tmp: Path, kind: str = "remote_code") -> None:
    """``modmoe_export.json``: size and sha256 of every file written; it also marks the directory
    as an export, which ``--overwrite`` may replace (``kind``: ``remote_code`` or ``standard``)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_json(
        tmp / layout.RECORD_NAME,
        {"format": layout.EXPORT_FORMAT, "format_version": layout.EXPORT_VERSION, "kind": kind, "files": files},
    )


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be new, or, with ``--overwrite``, an earlier export (its
    ``modmoe_export.json`` says so) or an empty directory: nothing else is ever replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ExportError(f"--out {out}: exists; choose a new directory or pass --overwrite")
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory; refusing to replace it, even with --overwrite")
    if any(out.iterdir()) and not is_export(out):
        raise ExportError(
            f"--out {out}: not a modmoe export (no {layout.RECORD_NAME} of format {layout.EXPORT_FORMAT!r}); "
            "refusing to replace it, even with --overwrite: choose another directory or empty it yourself"
        )


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_out(out, overwrite)  # again: it may have changed while the weights were written
    if out.exists():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> ExportSummary:
    """Writes the export of ``source`` (a run directory or a ``step_*`` checkpoint) to ``out``."""
    if dtype not in layout.DTYPES:
        raise ExportError(f"--dtype {dtype!r}: allowed {', '.join(layout.DTYPES)}")
    if max_shard_bytes < 1:
        raise ExportError(f"--max-shard-size {max_shard_bytes}: must be at least 1 byte")
    out = Path(out)
    _check_out(out, overwrite)
    src = open_checkpoint(source)
    log(f"export: reading {src.path} (step {src.manifest.step}, written by {src.manifest.world_size} rank(s))")
    model_cfg, args = _model_config(src)
    specs, dropped = _match_tensors(src, args)
    tok_path = _find_tokenizer(src, tokenizer)
    try:
        tok = load_tokenizer(tok_path)
    except DataError as err:
        raise ExportError(str(err)) from None
    if tok.get_vocab_size(with_added_tokens=True) > model_cfg.vocab_size:
        raise ExportError(
            f"tokenizer file {tok_path}: {tok.get_vocab_size(with_added_tokens=True)} tokens, more than "
            f"model.vocab_size = {model_cfg.vocab_size} (not this run's tokenizer?)"
        )
    eos_id, pad_id = tok.token_to_id(EOT), tok.token_to_id(PAD)

    target = getattr(torch, layout.DTYPES[dtype])
    dtypes = {s.name: _out_dtype(s, target) for s in specs}
    # Shards are planned in the output dtype; each is read in groups of the same budget.
    shards = pack_by_bytes(specs, lambda s: torch.Size(s.shape).numel() * dtypes[s.name].itemsize, max_shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            name = layout.WEIGHTS_NAME if len(shards) == 1 else layout.shard_name(i, len(shards))
            tensors: dict[str, torch.Tensor] = {}
            for group in src.read_groups(shard, max_shard_bytes):
                tensors.update({k: v.to(dtypes[k]).contiguous() for k, v in group.items()})
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: name for k in tensors})
            log(f"export: wrote {name} ({len(tensors)} tensors)")
            del tensors
        if len(shards) > 1:
            _write_json(tmp / layout.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

        shutil.copyfile(tok_path, tmp / layout.TOKENIZER_NAME)
        job = src.config
        data, trainer = job.get("data") or {}, job.get("trainer") or {}
        # The directory the tokenizer came from, when it is a prepared data directory.
        prepared = tok_path.parent.resolve() if (tok_path.parent / "index.json").is_file() else None
        record = {
            "dtype": layout.DTYPES[dtype],
            "source": {
                "checkpoint": str(src.path.resolve()),
                "step": src.manifest.step,
                "world_size": src.manifest.world_size,
                "created_unix": src.manifest.created_unix,
            },
            "data": {
                "prepared_dir": str(prepared) if prepared is not None else data.get("prepared_dir"),
                "seq_len": data.get("seq_len"),
                "tokenizer_sha256": sha256_file(tmp / layout.TOKENIZER_NAME),
            },
            "eval": _eval_record(trainer),
            "dropped_keys": dropped,
        }
        model_dict = model_cfg.model_dump(mode="json")
        _write_json(
            tmp / layout.CONFIG_NAME, layout.config_json(model_dict, record, layout.DTYPES[dtype], eos_id, pad_id)
        )
        _write_json(tmp / layout.GENERATION_CONFIG_NAME, layout.generation_config_json(eos_id, pad_id))
        _write_json(
            tmp / layout.TOKENIZER_CONFIG_NAME,
            layout.tokenizer_config_json(EOT, PAD if pad_id is not None else None, model_cfg.max_seq_len),
        )
        _write_json(
            tmp / layout.SPECIAL_TOKENS_NAME, {"eos_token": EOT, **({"pad_token": PAD} if pad_id is not None else {})}
        )
        for name in layout.TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        for name in layout.MODEL_FILES:
            shutil.copyfile(MODEL_DIR / name, tmp / name)
        _write_record(tmp)
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(
        out, src.path, src.manifest.step, layout.DTYPES[dtype], len(specs), total, len(shards), dropped
    )
