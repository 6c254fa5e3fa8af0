"""Slurm's time-limit syntax (``--time``), checked before a job is submitted."""

from __future__ import annotations

import re

# minutes | minutes:seconds | hours:minutes:seconds | days-hours | days-hours:minutes |
# days-hours:minutes:seconds (the forms sbatch(1) documents).
_NUM = r"(\d+)"
_FORMS = (
    (re.compile(rf"^{_NUM}$"), ("m",)),
    (re.compile(rf"^{_NUM}:{_NUM}$"), ("m", "s")),
    (re.compile(rf"^{_NUM}:{_NUM}:{_NUM}$"), ("h", "m", "s")),
    (re.compile(rf"^{_NUM}-{_NUM}$"), ("d", "h")),
    (re.compile(rf"^{_NUM}-{_NUM}:{_NUM}$"), ("d", "h", "m")),
    (re.compile(rf"^{_NUM}-{_NUM}:{_NUM}:{_NUM}$"), ("d", "h", "m", "s")),
)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def parse_slurm_time(text: str) -> int:
    """Seconds in a Slurm time limit such as ``90``, ``4:00:00`` or ``2-12:00``; raises
    ``ValueError`` naming the accepted forms otherwise. ``0`` and ``infinite`` are refused:
    a training job should state its limit so the preemption grace can be checked against it."""
    text = text.strip()
    for pattern, units in _FORMS:
        match = pattern.match(text)
        if match:
            parts = [int(g) for g in match.groups()]
            # Within a form, only the leading field may exceed its natural range.
            for unit, value in list(zip(units, parts))[1:]:
                if (unit == "h" and value >= 24) or (unit in "ms" and value >= 60):
                    raise ValueError(f"{unit} field {value} out of range in {text!r} (expected {TIME_FORMATS})")
            seconds = sum(_SECONDS[u] * v for u, v in zip(units, parts))
            if seconds <= 0:
                raise ValueError(f"time limit must be positive (expected {TIME_FORMATS})")
            return seconds
    raise ValueError(f"expected {TIME_FORMATS}")
