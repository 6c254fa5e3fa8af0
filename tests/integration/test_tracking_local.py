"""Tracking parts that need no server: embedded SQLite default, config, flattening, tags,
plots, spool parsing, lazy imports, and the numbers the trainer logs (throughput and MFU,
memory, router statistics)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from modmoe.config import JobConfig
from modmoe.config_base import ConfigError, validate_config
from modmoe.model import MoDETransformer
from modmoe.model_config import ModelConfig
from modmoe.parallel.dims import ParallelDims
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
from modmoe.tracking.spool import logged_steps, read
from modmoe.train.backends.native import layout_tag
from modmoe.train.memory import step_memory
from modmoe.train.router_stats import RouterStats, expert_bias_summary
from modmoe.train.throughput import lookup_peak, peak_tflops_per_device, throughput_metrics


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
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
    ]
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


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"tracking_uri": "localhost:5000"}, "tracking_uri"),
        ({"flush_interval_s": 0}, "flush_interval_s"),
        ({"experiment": ""}, "experiment"),
        ({"retries": 3}, "retries"),
    ],
)
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
    nested = {
        "model": {"dim": 256, "moe": {"experts": 8, "shared": None, "dropless": True}},
        "optim": {"betas": [0.9, 0.95], "lr": 3e-4},
        "stages": [{"steps": 10}, {"steps": 20}],
        "empty": {},
        "name": "tiny",
    }
    assert flatten_config(nested) == {
        "model.dim": "256",
        "model.moe.experts": "8",
        "model.moe.shared": "null",
        "model.moe.dropless": "true",
        "optim.betas": "[0.9, 0.95]",
        "optim.lr": "0.0003",
        "stages.0.steps": "10",
        "stages.1.steps": "20",
        "empty": "{}",
        "name": "tiny",
    }
    with pytest.raises(TypeError):
        flatten_config([1, 2])  # type: ignore[arg-type]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_default_tags(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("1")
    _git(repo, "add", "f.txt")
    _git(repo, "commit", "-q", "-m", "init")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
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


def test_spool_logged_steps(tmp_path: Path) -> None:
    spool = tmp_path / "mlflow_spool.jsonl"
    lines = [
        {"kind": "metrics", "run_id": "A", "metrics": [["loss", 1.0, 0, 7], ["lr", 0.1, 0, 7]]},
        {"kind": "metrics", "run_id": "A", "metrics": [["loss", 1.0, 0, 9]]},
        {"kind": "metrics", "local_run": "x", "metrics": [["loss", 1.0, 0, 12], ["eval/loss", 2.0, 0, 12]]},
        {"kind": "bind", "local_run": "x", "run_id": "A"},  # x was created later as A
        {"kind": "metrics", "run_id": "B", "metrics": [["loss", 1.0, 0, 50]]},
        {"kind": "params", "run_id": "A", "values": {"a": "1"}},
    ]
    spool.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert logged_steps(spool, "A") == {"loss": 12, "lr": 7, "eval/loss": 12}
    assert logged_steps(spool, "C") == {}
    assert logged_steps(tmp_path / "none.jsonl", "A") == {}


def test_importing_tracking_loads_neither_mlflow_nor_matplotlib() -> None:
    # Every rank imports the trainer; only rank 0 logs. mlflow alone takes seconds to import.
    code = (
        "import sys, modmoe.tracking, modmoe.train.loop; "
        "print(sorted(m for m in ('mlflow', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_lookup(name: str, peak: float | None) -> None:
    assert lookup_peak(name) == peak


def test_throughput_metrics_and_mfu() -> None:
    cpu = torch.device("cpu")
    assert peak_tflops_per_device(cpu, None) is None  # no MFU on CPU unless configured
    assert peak_tflops_per_device(cpu, 2.5) == 2.5
    m = throughput_metrics(tokens=4096, step_time_s=0.5, flops_per_token=1e9, devices=4, peak_tflops=2.0)
    assert m["tokens_per_s"] == 8192 and m["tokens_per_s_per_device"] == 2048
    assert m["executed_tflops_per_s"] == pytest.approx(8.192e-3 * 1e3)
    assert m["executed_tflops_per_s_per_device"] == pytest.approx(2.048)
    assert m["mfu"] == pytest.approx(2.048 / 2.0)
    assert "mfu" not in throughput_metrics(4096, 0.5, 1e9, 4, None)
    with pytest.raises(ConfigError, match="logging.peak_tflops_per_device"):
        validate_config(JobConfig, {"logging": {"peak_tflops_per_device": 0}})


def test_step_memory_on_cpu() -> None:
    mem = step_memory(torch.device("cpu"))
    assert list(mem) == ["memory/cpu_rss_gib"]  # no GPU key on CPU
    assert mem["memory/cpu_rss_gib"] == pytest.approx(psutil.Process().memory_info().rss / 2**30, rel=0.2)


def _tiny_model(**moe) -> MoDETransformer:
    torch.manual_seed(0)
    return MoDETransformer(
        ModelConfig(
            vocab_size=64,
            dim=32,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            ffn_hidden=64,
            max_seq_len=40,
            depth={"capacity": 0.25, "predictor": True},
            moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32, **moe},
        )
    )


def test_router_stats_per_layer_and_aggregated() -> None:
    model = _tiny_model()
    stats, outs = RouterStats(), []
    for seed in (1, 2):  # two micro-batches of 3 sequences of 40 tokens
        tokens = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(seed))
        outs.append(model(tokens, tokens))
        stats.add(outs[-1])
    stats.reduce(lambda t: t)
    s = stats.summary()
    moe_layers, mod_layers = [0, 1, 2, 3], [1, 3]
    for i in moe_layers:
        loads = [s[f"moe/layer{i}/expert_load/{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0) and min(loads) >= 0
        assert s[f"moe/layer{i}/max_over_mean_load"] == pytest.approx(max(loads) * 4)
    for name in ("aux_loss", "seq_aux_loss", "z_loss"):  # per-layer means add up to the model's sum
        expected = sum(float(o.aux_losses[f"moe_{name}"]) for o in outs) / 2
        assert sum(s[f"moe/layer{i}/{name}"] for i in moe_layers) == pytest.approx(expected, rel=1e-5)
    for name in ("bce_loss", "predictor_loss"):
        expected = sum(float(o.aux_losses[f"mod_{name}"]) for o in outs) / 2
        assert sum(s[f"mod/layer{i}/{name}"] for i in mod_layers) == pytest.approx(expected, rel=1e-5)
    capacity = 10 / 40  # k = ceil(0.25 * 40) tokens of each sequence enter
    for i in mod_layers:
        assert s[f"mod/layer{i}/entry_fraction"] == pytest.approx(capacity)
        rates = [s[f"mod/layer{i}/entry_rate_by_position/{b}"] for b in range(10)]
        assert sum(rates) / 10 == pytest.approx(capacity)  # equal bins of 4 positions
        assert 0 <= s[f"mod/layer{i}/selection_entropy"] <= 1
    assert s["mod/entry_fraction"] == pytest.approx(capacity)
    assert s["mod/router_weight_std"] == pytest.approx(
        (s["mod/layer1/router_weight_std"] + s["mod/layer3/router_weight_std"]) / 2
    )
    assert s["moe/dead_experts"] == sum(s[f"moe/layer{i}/dead_experts"] for i in moe_layers)
    names, loads = stats.expert_loads()
    assert names == [f"layer {i}" for i in moe_layers] and loads.shape == (4, 4)


def test_expert_bias_summary() -> None:
    biases = {0: torch.tensor([0.3, -0.1, 0.0, 0.2]), 2: torch.zeros(4)}
    s = expert_bias_summary(biases)
    assert s["moe/layer0/expert_bias_norm"] == pytest.approx(math.sqrt(0.14))
    assert s["moe/layer0/expert_bias_range"] == pytest.approx(0.4)
    assert s["moe/layer2/expert_bias_norm"] == 0 and s["moe/layer2/expert_bias_range"] == 0
    assert s["moe/expert_bias_norm"] == pytest.approx(math.sqrt(0.14) / 2)
    assert s["moe/expert_bias_range"] == pytest.approx(0.2)
    assert expert_bias_summary({}) == {}


def test_layout_tag() -> None:
    def tag(**kw) -> str:
        base = dict(dp=2, ep=1, tp=1, world_size=2, dp_backend="ddp", zero_stage=0)
        return layout_tag(ParallelDims(**(base | kw)))

    assert tag() == "dp2-ddp"
    assert tag(dp=4, ep=2, world_size=4, dp_backend="deepspeed", zero_stage=2) == "dp4-deepspeed-zero2-ep2"
    assert tag(dp=1, tp=2, dp_backend="fsdp2") == "dp1-fsdp2-tp2"
