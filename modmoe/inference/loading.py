"""Opens an exported directory for modmoe's runtime, checking every file it needs first.

Each problem is one line naming the file: a missing or unreadable file, a format this build
does not read, a config the runtime does not support, weights that do not match the config
(missing, extra or misshapen tensors, a shard the index names but that is absent), a tokenizer
larger than the model's vocabulary, or a file whose size differs from the export record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from modmoe.config_base import ConfigError, validate_config
from modmoe.config_json import JSONInputError, read_json
from modmoe.data import DataError
from modmoe.data.tokenizer import EOT, load_tokenizer
from modmoe.errors import UserError
from modmoe.file_paths import escape_problem
from modmoe.inference import export_format as layout
from modmoe.model import ModelArgs, MoDETransformer
from modmoe.model_config import ModelConfig

MAX_JSON_BYTES = 64 << 20  # config, index and record of an export: kB to a few MB


class InferenceError(UserError, ValueError):
    """Bad input to the runtime (files, options, prompts), reported as one line."""


@dataclass
class LoadedModel:
    dir: Path
    model: MoDETransformer
    config: ModelArgs  # the architecture the model was built from
    record: dict[str, Any]  # config.json's ``modmoe`` section (source, data, eval settings)
    tokenizer: Tokenizer | None
    eos_id: int | None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InferenceError(f"{path}: missing (not an export directory? make one with `modmoe export`)")
    try:
        return read_json(path, MAX_JSON_BYTES)
    except JSONInputError as err:
        raise InferenceError(str(err)) from None


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a modmoe export (its record file names the format)."""
    try:
        record = read_json(directory / layout.RECORD_NAME, MAX_JSON_BYTES)
    except JSONInputError:
        return False
    return isinstance(record, dict) and record.get("format") == layout.EXPORT_FORMAT


def _inside(directory: Path, name: object, listed_in: Path) -> Path:
    """``directory / name`` for a file name read from ``listed_in``, which must stay inside."""
    why = escape_problem(directory, name) if isinstance(name, str) else f"path {name!r} is not a file name"
    if why is not None:
        raise InferenceError(f"{listed_in}: {why}")
    return directory / name


def read_config(directory: Path) -> tuple[ModelArgs, dict[str, Any]]:
    """The architecture recorded in ``config.json``, validated."""
    path = directory / layout.CONFIG_NAME
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("model_type") != "modmoe":
        raise InferenceError(
            f"{path}: model_type = {data.get('model_type') if isinstance(data, dict) else None!r}: expected 'modmoe'"
        )
    record = data.get("modmoe")
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise InferenceError(f"{path}: has no modmoe.model section (not written by `modmoe export`)")
    if record.get("format") != layout.EXPORT_FORMAT or record.get("format_version") not in layout.READABLE_VERSIONS:
        raise InferenceError(
            f"{path}: modmoe.format {record.get('format')!r} version {record.get('format_version')!r} is not supported "
            f"(this build reads {layout.EXPORT_FORMAT!r} version {layout.EXPORT_VERSION})"
        )
    try:
        args = validate_config(ModelConfig, record["model"], prefix="modmoe.model").to_args()
    except (ConfigError, ValueError) as err:
        raise InferenceError(f"{path}: {err}") from None
    return args, record


def _check_record(directory: Path) -> None:
    """Sizes against ``modmoe_export.json`` (absent when another tool re-saved the directory)."""
    path = directory / layout.RECORD_NAME
    if not path.is_file():
        return
    record = _read_json(path)
    files = (record.get("files") if isinstance(record, dict) else None) or {}
    if not isinstance(files, dict):
        raise InferenceError(f"{path}: files is not a mapping of file names")
    for name, entry in files.items():
        f = _inside(directory, name, path)
        size = entry.get("size") if isinstance(entry, dict) else None
        if f.is_file() and f.stat().st_size != size:
            raise InferenceError(f"{f}: {f.stat().st_size} bytes, the export recorded {size} (replaced or truncated)")


def _weight_files(directory: Path) -> dict[str, list[str] | None]:
    """File name -> tensor names the index assigns to it (None: a single unindexed file)."""
    index_path = directory / layout.INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InferenceError(f"{index_path}: has no weight_map")
        files: dict[str, list[str] | None] = {}
        for key, fname in weight_map.items():
            _inside(directory, fname, index_path)
            files.setdefault(fname, []).append(key)
        return files
    if not (directory / layout.WEIGHTS_NAME).is_file():
        raise InferenceError(f"{directory}: no {layout.WEIGHTS_NAME} and no {layout.INDEX_NAME} (weights missing)")
    return {layout.WEIGHTS_NAME: None}


def read_weights(
    directory: Path, expected: dict[str, tuple[int, ...]], device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected`` (name -> shape) from the safetensors files, checked."""
    tensors: dict[str, torch.Tensor] = {}
    for fname, listed in _weight_files(directory).items():
        path = directory / fname
        if not path.is_file():
            raise InferenceError(f"{path}: missing (listed in {layout.INDEX_NAME})")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                keys = list(f.keys())
                if listed is not None and sorted(keys) != sorted(listed):
                    extra = sorted(set(keys) ^ set(listed))[0]
                    raise InferenceError(
                        f"{path}: tensor {extra!r} disagrees with {layout.INDEX_NAME} (mismatched shard)"
                    )
                for key in keys:
                    if key not in expected:
                        raise InferenceError(f"{path}: tensor {key!r} is not part of the model config.json describes")
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as err:
            raise InferenceError(f"{path}: not a readable safetensors file ({err})") from None
    for key, shape in expected.items():
        if key not in tensors:
            raise InferenceError(f"{directory}: tensor {key!r} is missing from the weights (config.json implies it)")
        if tuple(tensors[key].shape) != shape:
            raise InferenceError(
                f"{directory}: tensor {key!r} has shape {list(tensors[key].shape)}, config.json implies {list(shape)}"
            )
    return tensors


def load_exported(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    need_tokenizer: bool = True,
) -> LoadedModel:
    """The model of an export directory on ``device``, in its stored dtype unless ``dtype``
    is given (routing tensors stay float32 either way)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InferenceError(f"{directory}: not a directory (expected the output of `modmoe export`)")
    args, record = read_config(directory)
    _check_record(directory)
    with torch.device("meta"):  # no memory and no init for weights about to be replaced
        model = MoDETransformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = read_weights(directory, expected, device)
    if dtype is not None:
        tensors = {
            k: v if layout.keeps_fp32(k) or not v.is_floating_point() else v.to(dtype) for k, v in tensors.items()
        }
    model.load_state_dict(tensors, assign=True)
    model.eval()

    tokenizer, eos_id = None, None
    tok_path = directory / layout.TOKENIZER_NAME
    if need_tokenizer or tok_path.is_file():
        try:
            tokenizer = load_tokenizer(tok_path)
        except DataError as err:
            raise InferenceError(str(err)) from None
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > args.vocab_size:
            raise InferenceError(
                f"{tok_path}: {size} tokens, more than config.json's vocab_size {args.vocab_size} (mismatched tokenizer)"
            )
        eos_id = tokenizer.token_to_id(EOT)
    return LoadedModel(directory, model, args, record, tokenizer, eos_id)
