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

import math
import re
import shutil
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

Record = dict[str, Any]

# Names MLflow accepts for metrics, params and tags.
_KEY_RE = re.compile(r"^[\w\-. :/]+$")


def check_key(key: Any, what: str) -> str:
    """Raises a one-line ``ValueError`` for a key MLflow would refuse (late, on another thread)."""
    if (not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > MAX_ENTITY_KEY_LENGTH
            or key.startswith("/") or ".." in key.split("/")):
        raise ValueError(
            f"{what} name {key!r} is not allowed: MLflow takes up to {MAX_ENTITY_KEY_LENGTH} "
            "letters, digits, '_', '-', '.', ' ', ':', '/' (not starting with '/')"
        )
    return key


def chunk_values(kind: str, values: dict[str, str]) -> list[Record]:
    """``params``/``tags`` records of at most MLflow's batch size, values cut to its length cap."""
    cap = MAX_PARAM_VAL_LENGTH if kind == "params" else MAX_TAG_VAL_LENGTH
    items = [(check_key(k, kind[:-1]), str(v)[:cap]) for k, v in values.items()]
    return [
        {"kind": kind, "values": dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])}
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH)
    ]


def chunk_metrics(metrics: list[list]) -> list[Record]:
    return [
        {"kind": "metrics", "metrics": metrics[i : i + MAX_METRICS_PER_BATCH]}
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH)
    ]


def _metric(key: str, value: float, timestamp: int, step: int) -> Metric:
    return Metric(key, float(value) if value is not None else math.nan, int(timestamp), int(step))


def send(client: MlflowClient, run_id: str, record: Record) -> None:
    """Performs the MLflow request a record stands for (raises what MLflow raises)."""
    kind = record["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[_metric(*m) for m in record["metrics"]], synchronous=True)
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["values"].items()],
                         synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["values"].items()],
                         synchronous=True)
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
