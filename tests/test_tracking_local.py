"""Tracking parts that need no server: embedded SQLite default, config, flattening, tags,
plots, spool parsing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from modmoe.config_base import ConfigError, validate_config
from modmoe.tracking import (
    MlflowTracker,
    TrackingConfig,
    default_tags,
    depth_routing_map,
    expert_load_heatmap,
    flatten_config,
    resolve_tracking_uri,
)
from modmoe.tracking.plots import DPI, heatmap_size, routing_map_size
from modmoe.tracking.records import check_key
from modmoe.tracking.spool import read


def test_embedded_default_is_sqlite_in_the_run_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(TrackingConfig(flush_interval_s=0.1), run_dir, params={"model.dim": "64"})
    assert tracker.tracking_uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    with pytest.raises(ValueError, match="not allowed"):
        tracker.log_metrics({"bad?name": 1.0}, 1)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": step / 10}, step)
    tracker.log_text("hi", "notes.txt")
    tracker.close()
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log_metrics({"loss": 0.0}, 4)

    assert (run_dir / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")) == [
        (1, 0.1), (2, 0.2), (3, 0.3)]
    assert client.get_run(tracker.run_id).data.params == {"model.dim": "64"}
    assert (run_dir / "mlartifacts").is_dir()  # artifacts next to the database ...
    assert not (tmp_path / "mlruns").exists()  # ... not in the working directory
    assert [f.path for f in client.list_artifacts(tracker.run_id)] == ["notes.txt"]


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.mark.parametrize(("data", "field"), [
    ({"max_retries": -1}, "max_retries"),
    ({"tracking_uri": "localhost:5000"}, "tracking_uri"),
    ({"flush_interval_s": 0}, "flush_interval_s"),
    ({"experiment": ""}, "experiment"),
    ({"retries": 3}, "retries"),
])
def test_config_errors_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as err:
        validate_config(TrackingConfig, data, prefix="tracking")
    assert "\n" not in str(err.value)
    assert TrackingConfig.model_fields["flush_interval_s"].description  # docstrings became descriptions


def test_disabled_tracker_is_a_no_op(tmp_path: Path) -> None:
    tracker = MlflowTracker(TrackingConfig(enabled=False), tmp_path / "run", params={"a": "1"})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_text("x", "x.txt")
    assert tracker.flush() and tracker.run_id is None
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_check_key() -> None:
    assert check_key("train/loss_ema-0.9 :x", "metric")
    for bad in ("a?b", "/abs", "a/../b", "", "x" * 251):
        with pytest.raises(ValueError):
            check_key(bad, "metric")


def test_flatten_config() -> None:
    nested = {"model": {"dim": 256, "moe": {"experts": 8, "shared": None, "dropless": True}},
              "optim": {"betas": [0.9, 0.95], "lr": 3e-4},
              "stages": [{"steps": 10}, {"steps": 20}], "empty": {}, "name": "tiny"}
    assert flatten_config(nested) == {
        "model.dim": "256", "model.moe.experts": "8", "model.moe.shared": "null",
        "model.moe.dropless": "true", "optim.betas": "[0.9, 0.95]", "optim.lr": "0.0003",
        "stages.0.steps": "10", "stages.1.steps": "20", "empty": "{}", "name": "tiny"}
    with pytest.raises(TypeError):
        flatten_config([1, 2])  # type: ignore[arg-type]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
                   cwd=cwd, check=True, capture_output=True)


def test_default_tags(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("1")
    _git(repo, "add", "f.txt")
    _git(repo, "commit", "-q", "-m", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = default_tags("megatron", "tp2.pp1.dp4", repo_dir=repo)
    assert tags["mlflow.source.git.commit"] == head and tags["git_dirty"] == "false"
    assert tags["engine"] == "megatron" and tags["parallel_layout"] == "tp2.pp1.dp4"
    assert tags["slurm_job_id"] == "4242" and tags["hostname"]
    (repo / "f.txt").write_text("2")
    assert default_tags("native", "dp1", repo_dir=repo)["git_dirty"] == "true"

    monkeypatch.delenv("SLURM_JOB_ID")
    plain = tmp_path / "plain"
    plain.mkdir()
    tags = default_tags("native", "dp1", repo_dir=plain)
    assert "mlflow.source.git.commit" not in tags and "slurm_job_id" not in tags


def _png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    image = imread(path)  # (H, W, 4)
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return image


def test_expert_load_heatmap(tmp_path: Path) -> None:
    loads = np.random.default_rng(0).dirichlet(np.ones(16), size=6)  # (layers, experts)
    out = expert_load_heatmap(loads, [f"layer {i}" for i in range(6)], tmp_path / "p" / "load.png")
    w, h = heatmap_size(6, 16)
    assert _png(out).shape[:2] == (round(h * DPI), round(w * DPI))
    narrow = _png(expert_load_heatmap(loads[:, :4], [f"l{i}" for i in range(6)], tmp_path / "n.png"))
    assert _png(out).shape[1] > narrow.shape[1] * 2  # width grows with the number of experts
    with pytest.raises(ValueError, match="layer_names"):
        expert_load_heatmap(loads, ["only one"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        expert_load_heatmap(np.ones(4), ["l"], tmp_path / "x.png")


def test_depth_routing_map(tmp_path: Path) -> None:
    tokens = ["def", " f", "(", "x", "):", "\n", "    return", " $x", "\t"] * 7 + ["!"]  # T = 64
    chosen = np.random.default_rng(1).random((4, 64)) < 0.125  # (routed_layers, T)
    out = depth_routing_map(tokens, chosen, [f"block {i}" for i in (1, 3, 5, 7)], tmp_path / "r.png")
    image = _png(out)
    w, h = routing_map_size(4, 64)
    assert image.shape[:2] == (round(h * DPI), round(w * DPI))
    assert image.shape[1] / image.shape[0] > 3  # one readable column per token
    assert w * DPI / 64 >= 20  # at least 20 px per token column
    with pytest.raises(ValueError, match="tokens"):
        depth_routing_map(tokens[:10], chosen, ["a", "b", "c", "d"], tmp_path / "x.png")


def test_spool_reader(tmp_path: Path) -> None:
    spool = tmp_path / "mlflow_spool.jsonl"
    spool.write_text('{"kind": "metrics", "metrics": [["loss", NaN, 1, 2]]}\n{"kind": "met')
    [rec] = read(spool)  # the torn last line (crash mid-write) is skipped
    assert rec["metrics"][0][0] == "loss" and np.isnan(rec["metrics"][0][1])
    spool.write_text('not json\n{"kind": "metrics", "metrics": []}\n')
    with pytest.raises(ValueError, match=r"mlflow_spool.jsonl:1"):
        read(spool)
