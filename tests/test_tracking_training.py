"""A 2-rank training run against a real MLflow server: every metric family, params, plots."""

import pytest
import yaml
from mlflow.tracking import MlflowClient

from modmoe.tracking import flatten_config
from modmoe.config import load_config

from conftest import read_metrics, run_modmoe, small_overrides
from mlflow_server import mlflow_server  # noqa: F401 - fixture

FAMILIES = [
    # throughput
    "tokens_per_s", "tokens_per_s_per_device", "step_time_s", "data_wait_s", "executed_tflops_per_s",
    # losses
    "loss", "moe_aux_loss", "moe_z_loss", "mod_bce_loss", "mod_predictor_loss", "eval/loss_topk", "eval/loss_causal",
    # MoD router health, aggregated and per routed layer
    "mod/entry_fraction", "mod/causal_agreement", "mod/router_weight_mean", "mod/router_weight_std",
    "mod/selection_entropy", "mod/first_decile_share", "mod/layer1/entry_fraction",
    # MoE router health
    "moe/max_over_mean_load", "moe/dead_experts", "moe/dropped_fraction", "moe/layer0/max_over_mean_load",
]


@pytest.mark.multirank
def test_two_rank_run_reaches_the_server(mlflow_server, small_data_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = small_overrides(small_data_dir, run_dir, **{
        "trainer.max_steps": 6, "trainer.micro_batch_size": 4, "trainer.eval_every": 3,
        "logging.mlflow.tracking_uri": mlflow_server.uri, "logging.mlflow.experiment": "it-2rank",
    })
    run_modmoe(["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])], nproc=2)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("it-2rank")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for key in FAMILIES:
        history = client.get_metric_history(run.info.run_id, key)
        steps = sorted(m.step for m in history)
        expected = [1, 3, 6] if key.startswith("eval/") else list(range(1, 7))  # eval: first step, every 3, last
        assert steps == expected, (key, steps)
    # Values equal the local record (rank 0 logs the global numbers).
    local = {r["step"]: r for r in read_metrics(run_dir)}
    for m in client.get_metric_history(run.info.run_id, "loss"):
        assert m.value == pytest.approx(local[m.step]["loss"])
    resolved = load_config(run_dir / "config.yaml")
    assert run.data.params == flatten_config(resolved.model_dump(mode="json"))
    assert run.data.tags["parallel_layout"] == "dp2-ddp" and run.data.tags["engine"] == "native"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/expert_load_step0000003.png", "plots/depth_routing_step0000003.png"} <= plots
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in top
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 6
