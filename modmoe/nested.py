"""Where two nested mappings (configs, fingerprints) differ, leaf by leaf. A leaf module: the
data preparation, the sweep and the Trainer's resume check all compare recorded configs this way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def differences(a: Any, b: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value in ``a``, value in ``b``) for every leaf where they differ, in key order;
    a key one side lacks reads as None there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
    elif a != b:
        yield prefix, a, b


def first_difference(a: Any, b: Any) -> tuple[str, Any, Any] | None:
    """The first of :func:`differences`, or None when the two are equal."""
    return next(differences(a, b), None)
