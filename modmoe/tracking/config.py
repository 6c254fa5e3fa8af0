"""Configuration of experiment tracking (MLflow), and where the tracking URI comes from."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, field_validator

from modmoe.config_base import ConfigModel

# scheme://... as MLflow understands it (http, https, sqlite, postgresql, ...), or "databricks"
_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://.|databricks$)")


class TrackingConfig(ConfigModel):
    enabled: bool = True
    """Log metrics, params and artifacts to MLflow (from rank 0 only). ``false`` makes the
    tracker a no-op."""

    tracking_uri: str | None = None
    """MLflow tracking URI (``http://host:5000`` for a server, ``sqlite:///path/mlflow.db`` for
    a local database). ``None`` = the ``MLFLOW_TRACKING_URI`` environment variable when set,
    else ``sqlite:///<run_dir>/mlflow.db``."""

    experiment: str = Field(default="modmoe", min_length=1, max_length=500)
    """MLflow experiment the run belongs to (created when missing)."""

    run_name: str | None = Field(default=None, min_length=1, max_length=250)
    """Display name of the run; ``None`` lets MLflow pick one."""

    tags: dict[str, str] = {}
    """Extra tags of the run (``modmoe sweep`` sets ``sweep``, ``budget``, ``variant``, ``size``,
    ...), added to the ones modmoe sets itself (commit, engine, layout, host, Slurm job) and
    refreshed on resume."""

    system_metrics: bool = False
    """Also log MLflow's system metrics (CPU, memory, disk, network; GPU when pynvml is
    installed) under ``system/…``, sampled with psutil."""

    system_metrics_interval_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    """Seconds between two system-metrics samples."""

    flush_interval_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    """Longest time a logged metric waits in the background queue before its batch is sent."""

    max_retries: int = Field(default=3, ge=0, le=20)
    """Retries of a failed batch (exponential backoff) before it is appended to
    ``<run_dir>/mlflow_spool.jsonl`` for a later ``modmoe tracking replay``."""

    retry_backoff_s: float = Field(default=1.0, ge=0.0, le=600.0)
    """Wait before the first retry; doubled on each further retry."""

    http_timeout_s: int = Field(default=10, ge=1, le=600)
    """Timeout of one HTTP request to a tracking server (MLflow's own default is 120 s with 7
    retries, which would stall the background thread for minutes on an unreachable server).
    An explicit ``MLFLOW_HTTP_REQUEST_TIMEOUT`` in the environment wins."""

    @field_validator("tracking_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and not _URI_RE.match(value):
            raise ValueError("expected a URI such as http://127.0.0.1:5000 or sqlite:///path/mlflow.db")
        return value


def resolve_tracking_uri(tracking_uri: str | None, run_dir: str | Path) -> str:
    """The URI a run logs to: explicit value, else ``MLFLOW_TRACKING_URI``, else a SQLite
    database inside the run directory (MLflow ≥3.13 refuses the old ``./mlruns`` file store)."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow.db")


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a local SQLite URI, the artifact directory next to the database (``mlartifacts``),
    so artifacts of the embedded default stay in the run directory instead of ``./mlruns``
    of whatever the working directory is. ``None`` for servers (they decide)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return None
    db_path = Path(tracking_uri[len(prefix) :]).resolve()
    return (db_path.parent / "mlartifacts").as_uri()
