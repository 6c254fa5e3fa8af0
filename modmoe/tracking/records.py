"""Tracking records: the JSON-able unit that is queued, sent, and spooled when sending fails.

One record is one MLflow request. Kinds and their fields:

- ``metrics``: ``metrics`` = ``[[key, value, timestamp_ms, step], ...]`` (≤ MLflow's batch cap)
- ``params`` / ``tags``: ``values`` = ``{key: str}`` (≤ MLflow's per-batch cap)
- ``artifact``: ``path`` (a staged copy), ``artifact_path``
- ``text``: ``text``, ``artifact_file``; ``dict``: ``data``, ``artifact_file``
- ``status``: ``status`` (set on resume); ``terminate``: ``status``, ``end_time``
- ``create_run``: ``experiment``, ``run_name``, ``tags`` (the run could not be created at start)
- ``bind``: ``local_run`` -> ``run_id`` (that run was created later, by the live tracker)

A spooled record also carries ``uri`` and either ``run_id`` or ``local_run`` (an id that only
exists in the spool, for records of a run not yet created).
"""

from __future__ import annotations

import functools
import math
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

Record = dict[str, Any]


@functools.cache
def limits() -> ModuleType:
    """MLflow's size limits (``MAX_METRICS_PER_BATCH``, ...). Imported on first use: importing
    mlflow takes seconds, and processes that never log (other ranks, CLI help) should not pay."""
    from mlflow.utils import validation

    return validation


# Names MLflow accepts for metrics, params and tags.
_KEY_RE = re.compile(r"^[\w\-. :/]+$")


def check_key(key: Any, what: str) -> str:
    """Raises a one-line ``ValueError`` for a key MLflow would refuse (late, on another thread)."""
    max_len = limits().MAX_ENTITY_KEY_LENGTH
    if (
        not isinstance(key, str)
        or not _KEY_RE.match(key)
        or len(key) > max_len
        or key.startswith("/")
        or ".." in key.split("/")
    ):
        raise ValueError(
            f"{what} name {key!r} is not allowed: MLflow takes up to {max_len} "
            "letters, digits, '_', '-', '.', ' ', ':', '/' (not starting with '/')"
        )
    return key


def chunk_values(kind: str, values: dict[str, str]) -> list[Record]:
    """``params``/``tags`` records of at most MLflow's batch size, values cut to its length cap."""
    lim = limits()
    cap = lim.MAX_PARAM_VAL_LENGTH if kind == "params" else lim.MAX_TAG_VAL_LENGTH
    batch = lim.MAX_PARAMS_TAGS_PER_BATCH
    items = [(check_key(k, kind[:-1]), str(v)[:cap]) for k, v in values.items()]
    return [{"kind": kind, "values": dict(items[i : i + batch])} for i in range(0, len(items), batch)]


def chunk_metrics(metrics: list[list]) -> list[Record]:
    batch = limits().MAX_METRICS_PER_BATCH
    return [{"kind": "metrics", "metrics": metrics[i : i + batch]} for i in range(0, len(metrics), batch)]


def send(client: MlflowClient, run_id: str, record: Record) -> None:
    """Performs the MLflow request a record stands for (raises what MLflow raises)."""
    from mlflow.entities import Metric, Param, RunTag

    kind = record["kind"]
    if kind == "metrics":
        metrics = [
            Metric(k, math.nan if v is None else float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]
        ]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["values"].items()], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["values"].items()], synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
    elif kind == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif kind == "dict":
        client.log_dict(run_id, record["data"], record["artifact_file"])
    elif kind == "status":
        client.update_run(run_id, status=record["status"])
    elif kind == "terminate":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def discard_staged(record: Record) -> None:
    """Removes the private copy an ``artifact`` record was sent from."""
    if record["kind"] == "artifact" and record.get("staged"):
        shutil.rmtree(Path(record["path"]).parent, ignore_errors=True)
