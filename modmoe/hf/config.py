"""``model.from_hf``: the job config completed from a pretrained checkpoint's ``config.json``.

:func:`apply_pretrained` runs when a job config is validated (a ``before`` validator of
``JobConfig``), so every consumer (``modmoe train`` and its recorded ``config.yaml`` and
checkpoint manifests, ``--dry-run``, ``modmoe flops``, the sweep) sees the real model:

- each architecture field the user did not set is the checkpoint's (:mod:`.families`); a field
  set to another value than the checkpoint's is a one-line error naming both;
- depth routing is off unless enabled, and an enabled one keeps each entering token's pretrained
  update (``router_weight: unit``) unless set otherwise;
- experts are the checkpoint's; ``model.moe.enabled: true`` on a dense checkpoint upcycles each
  MLP into copies (``expert_hidden`` = the MLP's width) or, with a smaller ``expert_hidden``, into
  its slices (granular upcycling), under the rules that keep the output at step 0;
- ``data.tokenizer`` is the checkpoint's directory when it holds a ``tokenizer.json``.

The directory is checked here too, before any work: no code files, no remote code, weights in
safetensors (a pickle-only checkpoint is refused). Tensor names and shapes are checked against the
model when the training job is resolved (:mod:`modmoe.hf.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modmoe.config_base import ConfigError, ConfigModel, validate_config
from modmoe.config_json import read_json as read_bounded_json
from modmoe.hf.families import CONFIG_NAME, MAX_CONFIG_BYTES, Pretrained, describe
from modmoe.model_config import ModelConfig

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")
# The fields a pretrained import fills with its own defaults (not facts of the checkpoint): the
# user may set them freely.
IMPORT_DEFAULTS: dict[str, Any] = {"depth": {"enabled": False, "router_weight": "unit"}}


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON object file (at most ``MAX_CONFIG_BYTES``), read by the bounded reader (depth,
    numbers, Unicode); a one-line ``ValueError`` naming it otherwise."""
    data = read_bounded_json(path, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def read_config_json(directory: Path) -> dict[str, Any]:
    """``DIR/config.json`` as a mapping; ``ValueError`` naming the file otherwise."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: not found (a transformers model directory has a config.json)")
    return read_json(path)


def _error(directory: Path, msg: str) -> ConfigError:
    return ConfigError(f"config error: model.from_hf = {str(directory)!r}: {msg}")


def check_directory(directory: Path) -> None:
    """A transformers model directory that runs no code and holds safetensors weights."""
    if not directory.is_dir():
        raise _error(directory, "not a directory (expected a transformers model directory with config.json)")
    names = sorted(p.name for p in directory.iterdir())
    code = [n for n in names if n.endswith(".py")]
    if code:
        raise _error(directory, f"holds code ({code[0]}); modmoe runs no code from a model directory, remove it")
    if not any(n in SAFETENSORS_WEIGHTS for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise _error(
                directory,
                f"pickle-only checkpoint ({pickles[0]}); modmoe loads safetensors only (pickles can run code): "
                "convert it, e.g. with transformers save_pretrained(safe_serialization=True)",
            )
        raise _error(directory, f"no weights ({' or '.join(SAFETENSORS_WEIGHTS)})")


def read_pretrained(directory: Path) -> Pretrained:
    """The checked directory's architecture (one-line ConfigError otherwise)."""
    check_directory(directory)
    try:
        hf = read_config_json(directory)
        if "auto_map" in hf:
            raise ValueError(f"{directory / 'config.json'}: has auto_map (remote code); modmoe runs no code from it")
        return describe(hf, str(directory / "config.json"))
    except (ValueError, OSError) as err:
        raise _error(directory, str(err)) from None


def pretrained_record(directory: str | Path) -> dict[str, Any]:
    """What a run records of its pretrained checkpoint (in every checkpoint manifest), so an export
    back to the stock architecture keeps the keys modmoe does not model (token ids, generation
    settings): its ``config.json`` and, when present, its ``generation_config.json``."""
    directory = Path(directory)
    try:
        record: dict[str, Any] = {"config": read_config_json(directory)}
        generation = directory / "generation_config.json"
        if generation.is_file():
            record["generation_config"] = read_json(generation)
    except (ValueError, OSError) as err:
        raise _error(directory, str(err)) from None
    return record


def _user_set(section: Any) -> Any:
    """What the user wrote for a section: its mapping, or the fields set on a config object."""
    if isinstance(section, ConfigModel):
        return section.model_dump(mode="json", exclude_unset=True)
    return section


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings merged, later layers winning (sections merge key by key)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "rope_scaling":
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves (``rope_scaling`` is one leaf)."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "rope_scaling":
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


def _is_set(tree: dict[str, Any], path: str) -> bool:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _value(cfg: ModelConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def _check_upcycling(model: ModelConfig, directory: Path) -> None:
    """A dense checkpoint whose MLPs become experts: the rules that keep the output at step 0."""
    m = model.moe
    if m.expert_hidden > model.ffn_hidden or model.ffn_hidden % m.expert_hidden:
        raise ConfigError(
            f"config error: model.moe.expert_hidden = {m.expert_hidden}: upcycling splits the checkpoint's MLP "
            f"(width {model.ffn_hidden}) into equal slices; use a divisor of it"
        )
    slices = model.ffn_hidden // m.expert_hidden
    for name, value in (("num_experts", m.num_experts), ("top_k", m.top_k)):
        if value % slices:
            raise ConfigError(
                f"config error: model.moe.{name} = {value}: granular upcycling into {slices} slices of the MLP "
                f"needs a multiple of {slices}"
            )
    if not m.normalize_top_k and m.score == "softmax":
        raise ConfigError(
            "config error: model.moe.normalize_top_k = False: upcycled experts keep the dense output only when "
            "the chosen experts' weights sum to 1"
        )
    if m.num_shared_experts:
        raise ConfigError(
            f"config error: model.moe.num_shared_experts = {m.num_shared_experts}: upcycling {directory} makes "
            "routed experts only (new shared experts would change the output at step 0)"
        )


def complete_model(user: dict[str, Any], pretrained: Pretrained, directory: Path) -> ModelConfig:
    """The model section: the user's fields, the checkpoint's where unset, the import defaults."""
    facts = dict(pretrained.model)
    moe_checkpoint = facts["moe"].get("enabled", False)
    defaults = _merge(IMPORT_DEFAULTS, {"max_seq_len": pretrained.max_position_embeddings})
    if pretrained.sliding_window is not None:
        defaults["max_seq_len"] = min(defaults["max_seq_len"], pretrained.sliding_window)
    if not moe_checkpoint:
        # Dense: experts are off unless asked for (upcycling), then copies of the MLP.
        facts.pop("moe")
        defaults = _merge(defaults, {"moe": {"enabled": False, "expert_hidden": facts["ffn_hidden"]}})
    model = validate_config(ModelConfig, _merge(defaults, facts, user), prefix="model")
    reference = validate_config(ModelConfig, _merge(defaults, facts), prefix="model")
    for path in _leaves(facts):
        if _is_set(user, path) and _value(model, path) != _value(reference, path):
            raise ConfigError(
                f"config error: model.{path} = {_value(model, path)!r} contradicts {directory}/config.json, "
                f"which gives {_value(reference, path)!r}"
            )
    window = pretrained.sliding_window
    if window is not None and model.max_seq_len > window:
        raise ConfigError(
            f"config error: model.max_seq_len = {model.max_seq_len}: {directory}/config.json has a sliding window "
            f"of {window} tokens, which modmoe's attention does not have; set model.max_seq_len <= {window} "
            "(the two then compute the same)"
        )
    if model.depth.enabled and model.depth.variant == "integrated":
        raise ConfigError(
            "config error: model.depth.variant = 'integrated': a pretrained model is MoD-ified with the staged "
            "variant (no-op experts would change its output at step 0)"
        )
    if model.moe.enabled and not moe_checkpoint:
        _check_upcycling(model, directory)
    return model


def _tokenizer_default(data: Any, directory: Path) -> Any:
    """``data`` with ``tokenizer`` set to the checkpoint's directory when unset and it has one."""
    if not isinstance(data, dict) or data.get("tokenizer") is not None:
        return data
    if (directory / "tokenizer.json").is_file():
        return {**data, "tokenizer": str(directory)}
    present = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if present:
        raise ConfigError(
            f"config error: data.tokenizer: {directory} has {present[0]} but no tokenizer.json, which modmoe "
            "reads; save the tokenizer with transformers (AutoTokenizer ... save_pretrained) or set data.tokenizer"
        )
    return data


def apply_pretrained(job: Any) -> Any:
    """A raw job config (the mapping before validation) completed from ``model.from_hf``; any
    other input is returned as is (pydantic reports what is wrong with it)."""
    if not isinstance(job, dict):
        return job
    user = _user_set(job.get("model"))
    if not isinstance(user, dict) or not isinstance(user.get("from_hf"), str):
        return job
    directory = Path(user["from_hf"]).expanduser()
    pretrained = read_pretrained(directory)
    model = complete_model(user, pretrained, directory)
    data = _tokenizer_default(_user_set(job.get("data", {})), directory)
    return {**job, "model": model, "data": data}
