"""Run tags that say where a run came from: code version, engine, layout, job, host."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

# The key MLflow's UI shows as the run's source commit.
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(repo_dir: Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the working tree containing ``repo_dir``; ``None`` without git, outside
    a repository, or before the first commit."""
    commit = _git(repo_dir, "rev-parse", "--verify", "HEAD")
    if not commit:
        return None
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def default_tags(engine: str, parallel_layout: str, repo_dir: str | Path | None = None) -> dict[str, str]:
    """Tags for a new run: git commit (+ ``git_dirty``) of the code's working tree when there is
    one (``repo_dir``, default: the tree holding this package, else the working directory),
    ``engine``, ``parallel_layout``, ``slurm_job_id`` when running under Slurm, ``hostname``."""
    tags = {
        "engine": str(getattr(engine, "value", engine)),
        "parallel_layout": parallel_layout,
        "hostname": socket.gethostname(),
    }
    candidates = [Path(repo_dir)] if repo_dir is not None else [Path(__file__).resolve().parents[2], Path.cwd()]
    for candidate in candidates:
        state = git_state(candidate)
        if state is not None:
            tags[GIT_COMMIT_TAG] = state[0]
            tags["git_dirty"] = "true" if state[1] else "false"
            break
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        tags["slurm_job_id"] = job
    return tags
