"""Where a submitted job's MLflow run will be, said before the job has started.

The run is created by the job's rank 0 when training starts (tagged ``slurm_job_id``), and
every requeued attempt continues it (the checkpoint holds its id). So at submission the link
names the experiment and selects the job's run by that tag: for a server, a URL of the MLflow
UI's run list filtered to this job; for a local database, the URI and how to browse it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

JOB_TAG = "slurm_job_id"  # set by modmoe.tracking.default_tags from SLURM_JOB_ID


def job_filter(job_id: str) -> str:
    """MLflow search filter that selects the run of Slurm job ``job_id``."""
    return f"tags.{JOB_TAG} = '{job_id}'"


def tracking_uri(job_cfg: Any, run_dir: Path) -> str | None:
    """The job's tracking URI (its config, else ``MLFLOW_TRACKING_URI``, which the job inherits
    from the submitting shell, else the SQLite database in the run directory); ``None`` when
    the config disables MLflow."""
    from modmoe.tracking.config import resolve_tracking_uri

    mlflow_cfg = job_cfg.logging.mlflow
    if not mlflow_cfg.enabled:
        return None
    return resolve_tracking_uri(mlflow_cfg.tracking_uri, run_dir)


def run_link(job_cfg: Any, run_dir: Path, job_id: str) -> str:
    """One line telling where the job's MLflow run is (or that tracking is off)."""
    uri = tracking_uri(job_cfg, run_dir)
    if uri is None:
        return "disabled (logging.mlflow.enabled = false)"
    experiment = job_cfg.logging.mlflow.experiment
    if not uri.startswith(("http://", "https://")):
        return (
            f"{uri} (experiment {experiment!r}, filter {job_filter(job_id)}; "
            f"browse with: mlflow ui --backend-store-uri {uri})"
        )
    try:
        exp_id = _experiment_id(uri, experiment, job_cfg.logging.mlflow.http_timeout_s)
    except Exception as err:  # noqa: BLE001 - the job is queued either way; say why there is no link
        from modmoe.tracking.client import short_error

        return (
            f"{uri} (experiment {experiment!r} not reachable now: {short_error(err, 120)}; filter {job_filter(job_id)})"
        )
    return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs?searchFilter={quote(job_filter(job_id), safe='')}"


def _experiment_id(uri: str, experiment: str, timeout_s: int) -> str:
    """Id of the experiment on the server, created now if missing (the job would create the
    same one), so the link is complete before the job starts."""
    from modmoe.tracking.client import experiment_id, make_client

    return experiment_id(make_client(uri, timeout_s), experiment, uri)
