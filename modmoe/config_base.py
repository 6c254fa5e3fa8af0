"""Base class for typed component configs, and the one-line error every bad value gets.

Each component (model, data, optimizer, ...) owns a ``ConfigModel`` subclass whose fields carry
a docstring; pydantic turns those docstrings into field descriptions
(``use_attribute_docstrings``), so ``modmoe config-help`` and the error messages come from the
same place as the code.
"""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, field_validator

from modmoe.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, always reported as one line naming the field. (A ValueError too:
    pydantic turns a ValueError raised inside a validator into a validation error.)"""


INT64_MAX = 2**63 - 1


class ConfigModel(BaseModel):
    """Strict config: unknown keys are errors, assignments are validated, floats are finite
    (``.inf``/``.nan`` make no sense for any field: a learning rate, a coefficient, a timeout),
    and integers fit in 64 bits (what torch, NumPy and the C libraries below take)."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="after")
    @classmethod
    def _fits_in_64_bits(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError("must fit in 64 bits (between -2**63 and 2**63 - 1)")
        return value


def _describe_allowed(model_cls: type[BaseModel] | None, loc: tuple) -> str:
    """Names the keys a nested config accepts, for 'unknown key' errors."""
    cls = model_cls
    for part in loc[:-1]:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return ""
        annotation = cls.model_fields[part].annotation
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if cls is None:
        return ""
    return "allowed keys: " + ", ".join(sorted(cls.model_fields))


def format_validation_error(
    err: pydantic.ValidationError, prefix: str = "", model_cls: type[BaseModel] | None = None
) -> str:
    """One line: ``config error: <field> = <value>: <what is allowed>`` (first problem only,
    with a count of the others, so the user fixes one thing at a time)."""
    problems = err.errors(include_url=False)
    first = problems[0]
    loc = tuple(str(p) for p in first["loc"])
    field = ".".join(([prefix] if prefix else []) + list(loc)) or "<root>"
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, ConfigError):  # raised by a cross-field check: already one line
        msg = str(inner)
    elif first["type"] == "extra_forbidden":
        allowed = _describe_allowed(model_cls, tuple(first["loc"]))
        msg = f"config error: unknown key {field}" + (f" ({allowed})" if allowed else "")
    else:
        value = first.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{…}"
        msg = f"config error: {field} = {shown}: {first['msg']}"
    if len(problems) > 1:
        msg += f" (and {len(problems) - 1} more problem(s))"
    return msg


def validate_config(model_cls: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    """Builds ``model_cls`` from ``data``; raises :class:`ConfigError` with one line on failure."""
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix, model_cls)) from None


def field_error(field: str, value: Any, allowed: str) -> ConfigError:
    """The same one-line shape, for checks that span several fields."""
    return ConfigError(f"config error: {field} = {value!r}: {allowed}")
