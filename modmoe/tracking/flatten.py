"""Nested config dict -> flat ``{"model.dim": "256"}`` mapping, the shape MLflow params take."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def _scalar_text(value: Any) -> str:
    # JSON spelling for non-strings, so a param reads the way the YAML config wrote it
    # (true / null / 0.001) rather than Python's True / None.
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def flatten_config(nested: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Flattens nested mappings into dotted keys with string values.

    Lists of scalars stay one value (``"[1, 2]"``); lists holding mappings are expanded by
    index (``"stages.0.lr"``), so no setting disappears. An empty mapping is kept as ``"{}"``.
    """
    if not isinstance(nested, Mapping):
        raise TypeError(f"flatten_config expects a mapping, got {type(nested).__name__}")
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if not value and prefix:
                flat[prefix] = "{}"
            for key, child in value.items():
                walk(f"{prefix}{sep}{key}" if prefix else str(key), child)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, child in enumerate(value):
                walk(f"{prefix}{sep}{i}", child)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = _scalar_text(list(value))
        else:
            flat[prefix] = _scalar_text(value)

    walk("", nested)
    return flat
