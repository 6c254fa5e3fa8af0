"""``modmoe train`` against real MLflow: a 2-rank run with every metric family, params and plots;
a crash and resume that continues the same run; the README's ``mlflow ui`` over a run's database."""

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowUi
from runs import read_metrics, run_modmoe, small_overrides

from modmoe.config import load_config
from modmoe.tracking import flatten_config

# small_overrides' model: 4 blocks, all MoE with 4 experts; blocks 1 and 3 routed (tiny.yaml's MoD pattern).
MOE_LAYERS, MOD_LAYERS, EXPERTS = (0, 1, 2, 3), (1, 3), 4
PEAK_TFLOPS = 0.5  # a made-up peak: MFU is only logged on CPU when one is configured

THROUGHPUT = [
    "tokens_per_s",
    "tokens_per_s_per_device",
    "step_time_s",
    "data_wait_s",
    "executed_tflops_per_s",
    "executed_tflops_per_s_per_device",
    "mfu",
    "memory/cpu_rss_gib",
    "straggler/local_max_s",
    "straggler/local_median_s",
    "straggler/max_over_median",
    "straggler/slowest_rank",
]
LOSSES = [
    "loss",
    "aux_loss_total",
    "moe_aux_loss",
    "moe_seq_aux_loss",
    "moe_z_loss",
    "mod_bce_loss",
    "mod_predictor_loss",
    "lr",
    "grad_norm",
]
MOD_BOTH = [
    "entry_fraction",
    "causal_entry_fraction",
    "causal_agreement",
    "causal_precision",
    "causal_recall",
    "router_weight_mean",
    "router_weight_std",
    "selection_entropy",
    "first_decile_share",
    *(f"entry_rate_by_position/{b}" for b in range(10)),
]
MOD_LAYER_ONLY = ["bce_loss", "predictor_loss"]
MOE_BOTH = ["max_over_mean_load", "dead_experts", "dropped_fraction", "expert_bias_norm", "expert_bias_range"]
MOE_LAYER_ONLY = ["aux_loss", "seq_aux_loss", "z_loss", *(f"expert_load/{e}" for e in range(EXPERTS))]
EVAL = [
    "eval/loss_topk",
    "eval/loss_causal",
    "eval/causal_agreement",
    "eval/causal_entry_fraction",
    "eval/causal_precision",
    "eval/causal_recall",
    "eval/loss_gap_causal_vs_topk",
]


def every_step_metrics() -> list[str]:
    """Names docs/tracking.md promises at every logged step for this model."""
    names = THROUGHPUT + LOSSES
    names += [f"mod/{n}" for n in MOD_BOTH] + [f"moe/{n}" for n in MOE_BOTH]
    names += [f"mod/layer{i}/{n}" for i in MOD_LAYERS for n in MOD_BOTH + MOD_LAYER_ONLY]
    names += [f"moe/layer{i}/{n}" for i in MOE_LAYERS for n in MOE_BOTH + MOE_LAYER_ONLY]
    return names


def mlflow_history(client: MlflowClient, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def local_history(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step":
                out.setdefault(k, []).append((r["step"], v))
    return {k: sorted(v) for k, v in out.items()}


def train(overrides: list[str], nproc: int = 1, extra: tuple[str, ...] = ()) -> None:
    run_modmoe(["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), []), *extra], nproc=nproc)


@pytest.mark.multirank
def test_two_rank_run_reaches_the_server(mlflow_server, small_data_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    train(
        small_overrides(
            small_data_dir,
            run_dir,
            **{
                "trainer.max_steps": 6,
                "trainer.micro_batch_size": 2,
                "trainer.eval_every": 3,  # 2 micro-batches per rank
                "model.moe.bias_update_rate": 0.01,
                "model.moe.seq_aux_loss_coef": 0.001,
                "logging.peak_tflops_per_device": PEAK_TFLOPS,
                "logging.mlflow.tracking_uri": mlflow_server.uri,
                "logging.mlflow.experiment": "it-2rank",
                "logging.mlflow.system_metrics": True,
                "logging.mlflow.system_metrics_interval_s": 1.0,
            },
        ),
        nproc=2,
    )
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("it-2rank").experiment_id])
    assert run.info.status == "FINISHED"

    # Every family at the right steps: each step once, eval at the first step, every 3 and the last.
    local = local_history(read_metrics(run_dir))
    for key in every_step_metrics():
        assert [s for s, _ in local.get(key, [])] == [1, 2, 3, 4, 5, 6], key
    for key in EVAL:
        assert [s for s, _ in local[key]] == [1, 3, 6], key
    # MLflow holds exactly the local record (rank 0 logs the global numbers), every key, every step.
    remote = mlflow_history(client, run.info.run_id, local)
    for key, points in local.items():
        assert remote[key] == [(s, pytest.approx(v, rel=1e-9, abs=1e-12)) for s, v in points], key
    assert not {k for k in run.data.metrics if not k.startswith("system/")} - set(local)
    assert any(k.startswith("system/cpu") for k in run.data.metrics)  # mlflow's psutil sampler

    # Values that must hold by construction.
    last = read_metrics(run_dir)[-1]
    assert last["tokens_per_s_per_device"] == pytest.approx(last["tokens_per_s"] / 2)
    assert last["executed_tflops_per_s_per_device"] == pytest.approx(last["executed_tflops_per_s"] / 2)
    assert last["mfu"] == pytest.approx(last["executed_tflops_per_s_per_device"] / PEAK_TFLOPS)
    assert last["mod/layer1/entry_fraction"] == 0.25  # MoD lets exactly the capacity in
    assert sum(last[f"moe/layer0/expert_load/{e}"] for e in range(EXPERTS)) == pytest.approx(1.0)
    assert last["moe/layer0/expert_bias_range"] > 0  # six updates of 0.01 moved the biases apart
    assert 0.1 < last["memory/cpu_rss_gib"] < 64
    assert "memory/gpu_peak_allocated_gib" not in last  # CPU run

    resolved = load_config(run_dir / "config.yaml")
    assert run.data.params == flatten_config(resolved.model_dump(mode="json"))
    assert run.data.tags["parallel_layout"] == "dp2-ddp" and run.data.tags["engine"] == "native"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {f"plots/{kind}_step{s:07d}.png" for kind in ("expert_load", "depth_routing") for s in (1, 3, 6)} == plots
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 6


def test_crash_and_resume_continue_the_same_run(mlflow_server, small_data_dir, tmp_path):  # noqa: F811
    """Checkpoints at steps 2 and 4; the one of step 4 is removed, as if the job had died after
    logging step 4 but before its checkpoint was written. The resumed job redoes steps 3-4 from
    the step-2 checkpoint and goes on to 6: one MLflow run, every step exactly once."""
    run_dir = tmp_path / "run"

    def overrides(max_steps: int) -> list[str]:
        return small_overrides(
            small_data_dir,
            run_dir,
            **{
                "trainer.max_steps": max_steps,
                "checkpoint.interval_steps": 2,
                "model.moe.bias_update_rate": 0.01,
                "logging.peak_tflops_per_device": PEAK_TFLOPS,
                "logging.mlflow.tracking_uri": mlflow_server.uri,
                "logging.mlflow.experiment": "it-resume",
            },
        )

    train(overrides(4))
    first = local_history(read_metrics(run_dir))
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert newest.name.endswith("4")
    shutil.rmtree(newest)
    train(overrides(6), extra=("--resume", "auto"))

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("it-resume").experiment_id])
    assert run.info.status == "FINISHED"
    local = local_history(read_metrics(run_dir))  # truncated at the resume and redone: 1..6 once
    assert [s for s, _ in local["loss"]] == [1, 2, 3, 4, 5, 6]
    remote = mlflow_history(client, run.info.run_id, local)
    for key in every_step_metrics():
        assert [s for s, _ in remote[key]] == [1, 2, 3, 4, 5, 6], key
    for key in EVAL:
        assert [s for s, _ in remote[key]] == [1, 4, 6], key  # 4 was the first job's last step
    for key, points in local.items():
        # Steps MLflow held before the crash keep their first values; later steps are the resumed
        # job's. Each step once (keys logged only at some steps included).
        kept = [(s, v) for s, v in first.get(key, []) if s <= 4] + [(s, v) for s, v in points if s > 4]
        assert remote[key] == [(s, pytest.approx(v, rel=1e-9, abs=1e-12)) for s, v in kept], key


def test_readme_mlflow_ui_opens_the_embedded_database(small_data_dir, tmp_path, monkeypatch):
    """README: runs/tiny/mlflow.db is opened with `mlflow ui --backend-store-uri sqlite:///runs/tiny/mlflow.db`."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "tiny"
    train(small_overrides(small_data_dir, run_dir, **{"trainer.max_steps": 2}))
    assert (run_dir / "mlflow.db").is_file()

    ui = MlflowUi(tmp_path, "sqlite:///runs/tiny/mlflow.db")  # relative, from the directory above runs/
    ui.start()
    try:

        def get(path: str) -> bytes:
            with urllib.request.urlopen(ui.uri + path, timeout=30) as resp:
                assert resp.status == 200
                return resp.read()

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(
                ui.uri + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.load(resp)

        assert b"<html" in get("/").lower()  # the UI itself
        experiments = post("/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        exp_id = next(e["experiment_id"] for e in experiments if e["name"] == "modmoe")
        (run,) = post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["trainer.max_steps"] == "2" and params["trainer.run_dir"] == str(run_dir)
        history = json.loads(get(f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss"))
        local = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
        assert {m["step"]: m["value"] for m in history["metrics"]} == pytest.approx(local)
        artifacts = json.loads(get(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}"))
        assert {"config.yaml", "plots"} <= {f["path"] for f in artifacts["files"]}
    finally:
        ui.stop()
    assert Path(run_dir / "mlartifacts").is_dir()  # artifacts stay in the run directory
