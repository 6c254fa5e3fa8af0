"""``modmoe export --standard``: a checkpoint written as a stock transformers model.

The architecture is the one the model was imported as (``model.hf_architecture``) when it still
fits, else Llama / Mixtral / Qwen3-MoE and their kin by the model's features
(:mod:`modmoe.hf.stock`); a MoDE model (depth routing, no-op experts) has none and is refused in
one line (the remote-code export keeps it). The weights stream as in the remote-code export
(about one shard in memory): each native tensor read from the checkpoint becomes its stock
tensors (stacked experts split into per-expert Linear weights, the layout every loader reads),
written shard by shard with an index. ``config.json`` starts from the imported ``config.json`` the
run recorded (token ids, generation settings, sliding window, ...); the tokenizer files are the
ones the user's tokenizer came with (``data.tokenizer``), or the run's own tokenizer with a
``tokenizer_config.json``. No code file is written.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modmoe.checkpoint.reader import pack_by_bytes
from modmoe.data import DataError
from modmoe.data.tokenizer import EOT, PAD, load_tokenizer
from modmoe.export.exporter import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportSummary,
    _check_out,
    _install,
    _match_tensors,
    _write_json,
    _write_record,
)
from modmoe.export.source import CheckpointSource, ExportError, open_checkpoint
from modmoe.hf.names import native_sources, stock_tensors
from modmoe.hf.stock import choose, stock_config
from modmoe.inference import export_format as layout
from modmoe.model import ModelArgs
from modmoe.model_config import ModelConfig

log = logging.getLogger(__name__)

# The files a Hugging Face tokenizer directory may hold, copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _tokenizer_dir(src: CheckpointSource, explicit: str | Path | None) -> Path | None:
    """Where the user's tokenizer files are: ``--tokenizer``, else ``data.tokenizer`` when it
    still exists (None: the run trained its own, or the files moved)."""
    data = src.config.get("data") or {}
    for value in (explicit, data.get("tokenizer")):
        if value:
            path = Path(value)
            path = path.parent if path.is_file() else path
            if (path / "tokenizer.json").is_file():
                return path
            if value == explicit:
                raise ExportError(f"--tokenizer {explicit}: no tokenizer.json there")
    return None


def _write_tokenizer(src: CheckpointSource, out: Path, explicit: str | Path | None, args: ModelArgs) -> dict[str, Any]:
    """Copies the tokenizer files into ``out``; returns the token ids for ``config.json``."""
    directory = _tokenizer_dir(src, explicit)
    if directory is not None:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, out / name)
        return {}
    # The run's own tokenizer (its prepared directory keeps tokenizer.json).
    from modmoe.export.exporter import _find_tokenizer

    path = _find_tokenizer(src, None)
    try:
        tok = load_tokenizer(path)
    except DataError as err:
        raise ExportError(str(err)) from None
    if tok.get_vocab_size(with_added_tokens=True) > args.vocab_size:
        raise ExportError(f"tokenizer file {path}: more tokens than model.vocab_size = {args.vocab_size}")
    shutil.copyfile(path, out / layout.TOKENIZER_NAME)
    if (path.parent / layout.TOKENIZER_CONFIG_NAME).is_file():
        shutil.copyfile(path.parent / layout.TOKENIZER_CONFIG_NAME, out / layout.TOKENIZER_CONFIG_NAME)
        return {}
    eos_id, pad_id = tok.token_to_id(EOT), tok.token_to_id(PAD)
    config = layout.tokenizer_config_json(EOT, PAD if pad_id is not None else None, args.max_seq_len)
    _write_json(out / layout.TOKENIZER_CONFIG_NAME, config)
    _write_json(out / layout.SPECIAL_TOKENS_NAME, {"eos_token": EOT, **({"pad_token": PAD} if pad_id else {})})
    return {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id}


def _architecture(model: ModelConfig, args: ModelArgs, path: Path) -> str:
    if args.depth.enabled:
        raise ExportError(
            f"{path}: a MoDE model (depth routing) has no stock transformers architecture; "
            "export it without --standard (remote-code format)"
        )
    architecture, reason = choose(args, model.hf_architecture)
    if architecture is None:
        raise ExportError(f"{path}: no stock transformers architecture fits ({reason}); export it without --standard")
    if reason:
        log.warning("writing %s (%s)", architecture, reason)
    return architecture


def export_standard(
    source: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> ExportSummary:
    """Writes ``source`` (a run directory or a ``step_*`` checkpoint) to ``out`` as a stock model."""
    if dtype not in layout.DTYPES:
        raise ExportError(f"--dtype {dtype!r}: allowed {', '.join(layout.DTYPES)}")
    out = Path(out)
    _check_out(out, overwrite)
    src = open_checkpoint(source)
    model_cfg = src.model_config()
    try:
        args = model_cfg.to_args()
    except ValueError as err:
        raise ExportError(f"{src.path}: {err}") from None
    architecture = _architecture(model_cfg, args, src.path)
    log(f"export: reading {src.path} (step {src.manifest.step}) as {architecture}")
    specs, _ = _match_tensors(src, args)
    sources = native_sources(args, architecture)
    specs = [s for s in specs if s.name in sources]  # buffers (expert_bias) and tied weights have none
    target = getattr(torch, layout.DTYPES[dtype])
    shards = pack_by_bytes(specs, lambda s: torch.Size(s.shape).numel() * target.itemsize, max_shard_bytes)
    recorded = (src.manifest.meta.get("pretrained") or {}) if isinstance(src.manifest.meta, dict) else {}
    imported_config = recorded.get("config") if isinstance(recorded.get("config"), dict) else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total = count = 0
        for i, shard in enumerate(shards, start=1):
            name = layout.WEIGHTS_NAME if len(shards) == 1 else layout.shard_name(i, len(shards))
            tensors: dict[str, torch.Tensor] = {}
            for group in src.read_groups(shard, max_shard_bytes):
                for native, tensor in group.items():
                    for stock, value in stock_tensors(native, tensor, sources[native]).items():
                        tensors[stock] = value.to(target).contiguous()
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            count += len(tensors)
            weight_map.update({k: name for k in tensors})
            log(f"export: wrote {name} ({len(tensors)} tensors)")
            del tensors
        if len(shards) > 1:
            _write_json(tmp / layout.INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        own_ids = _write_tokenizer(src, tmp, tokenizer, args)  # {}: the user's tokenizer, ids as recorded
        recorded_ids = {k: imported_config[k] for k in TOKEN_ID_KEYS if k in (imported_config or {})}
        base = imported_config if imported_config is not None and architecture == model_cfg.hf_architecture else None
        config = stock_config(architecture, args, base, layout.DTYPES[dtype], recorded_ids | own_ids)
        _write_json(tmp / layout.CONFIG_NAME, config)
        generation = recorded.get("generation_config")
        generation = dict(generation) if isinstance(generation, dict) else {k: config.get(k) for k in TOKEN_ID_KEYS}
        _write_json(tmp / layout.GENERATION_CONFIG_NAME, generation | own_ids)
        _write_record(tmp, kind="standard")
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(out, src.path, src.manifest.step, layout.DTYPES[dtype], count, total, len(shards))
