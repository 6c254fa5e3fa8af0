"""Making an ``MlflowClient`` that fails fast, classifying its errors, opening runs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from modmoe.tracking.config import local_artifact_root

if TYPE_CHECKING:  # mlflow is imported where a client is made: it takes seconds to import
    from mlflow import MlflowClient

# Whether the user set MLflow's HTTP settings; if not, ours apply (per tracker, last one wins).
_USER_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ
_USER_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT" in os.environ

# Error codes that say "the request itself is wrong": retrying the same batch cannot help.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "RESOURCE_ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FEATURE_DISABLED",
        "ENDPOINT_NOT_FOUND",
        "NOT_IMPLEMENTED",
    }
)


def make_client(tracking_uri: str, http_timeout_s: int = 10) -> MlflowClient:
    """Client for ``tracking_uri`` whose HTTP requests give up quickly.

    MLflow reads its HTTP retry/timeout settings from the environment on every request; by
    default an unreachable server costs 7 retries with exponential backoff (minutes). Our own
    loop retries whole batches, so MLflow's is switched off unless the user set it explicitly
    (these are process-wide environment variables: MLflow offers no per-client setting).
    """
    if not _USER_MAX_RETRIES:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    if not _USER_TIMEOUT:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(http_timeout_s)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def is_permanent(err: BaseException) -> bool:
    """True when the server understood and refused the request (bad key, unknown run, ...)."""
    if isinstance(err, (ValueError, FileNotFoundError, IsADirectoryError)):
        return True  # a bad record or a vanished local file: the same again fails the same way
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in _PERMANENT_CODES


def short_error(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment ``name``, created when missing (a concurrent creator may win the race)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(tracking_uri))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        found = client.get_experiment_by_name(name)
        assert found is not None
        return found.experiment_id


def create_run(
    client: MlflowClient, tracking_uri: str, experiment: str, run_name: str | None, tags: dict[str, str]
) -> str:
    exp_id = experiment_id(client, experiment, tracking_uri)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    return run.info.run_id
