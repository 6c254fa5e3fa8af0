"""One Trainer, several backends: the same job through the native and the Megatron backend
(its CPU path) logs the same metric names, and each Trainer-level key is honoured by the
Megatron backend or refused in one line.

Runs in this process on one rank: the Megatron backend creates and removes its own process
group and Megatron's parallel state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from runs import read_metrics, small_overrides

pytest.importorskip("megatron.core")

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.train.loop import Trainer
from modmoe.train.resolve import resolve_job

# A model both backends build the same way (docs/megatron.md: sigmoid scores with the expert
# bias need no balance loss; Megatron clips gradients with CUDA-only kernels).
SHARED = {
    "model.moe.score": "sigmoid",
    "model.moe.aux_loss_coef": 0.0,
    "model.moe.bias_update_rate": 0.01,
    "optimizer.grad_clip": "null",
    "trainer.device": "cpu",
    "trainer.max_steps": 4,
    "trainer.micro_batch_size": 4,
    "trainer.eval_every": 2,
    "checkpoint.interval_steps": 2,
}
MEGATRON = {"engine": "megatron", "megatron.dispatcher": "allgather", "megatron.distributed_optimizer": False}

# Metric names only one backend logs (docs/tracking.md, "Backend-specific metrics"). Native only:
# per-layer router health of depth routing (Megatron's MoD layer keeps loss sums only),
# per-layer balance losses, the unweighted balance losses whose coefficient is 0 (Megatron
# computes only the losses it trains with), the expert-bias summary, and evaluation under causal
# routing (Megatron's layers have no per-token routing mode; `modmoe eval` runs it on the export).
NATIVE_ONLY = (
    "mod/layer",
    "mod/entry_fraction",
    "mod/causal_entry_fraction",
    "mod/causal_precision",
    "mod/causal_recall",
    "mod/router_weight_",
    "mod/selection_entropy",
    "mod/first_decile_share",
    "mod/entry_rate_by_position/",
    "moe/layer{}/aux_loss",
    "moe/layer{}/seq_aux_loss",
    "moe/layer{}/z_loss",
    "moe/layer{}/expert_bias_",
    "moe/expert_bias_",
    "moe_aux_loss",
    "moe_seq_aux_loss",
    "eval/loss_causal",
    "eval/causal_agreement",
    "eval/causal_entry_fraction",
    "eval/causal_precision",
    "eval/causal_recall",
    "eval/loss_gap_causal_vs_topk",
)


def _native_only(name: str) -> bool:
    generic = name
    if name.startswith("moe/layer"):
        layer = name.split("/")[1][len("layer") :]
        generic = name.replace(f"moe/layer{layer}/", "moe/layer{}/", 1)
    return any(generic.startswith(prefix) for prefix in NATIVE_ONLY)


def _config(data_dir: str, run_dir: Path, **extra):
    return load_config("configs/tiny.yaml", small_overrides(data_dir, run_dir, **{**SHARED, **extra}))


def _train(cfg, log=lambda _: None) -> Trainer:
    trainer = Trainer(resolve_job(cfg), log=log)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def _mlflow_names(run_dir: Path) -> set[str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    return set(run.data.metrics)


def _jsonl_names(run_dir: Path) -> set[str]:
    return {key for record in read_metrics(run_dir) for key in record} - {"step"}


def test_native_and_megatron_log_the_same_metric_names(small_data_dir, tmp_path):
    native, megatron = tmp_path / "native", tmp_path / "megatron"
    _train(_config(small_data_dir, native))
    _train(_config(small_data_dir, megatron, **MEGATRON))
    for names in (_jsonl_names, _mlflow_names):
        ours, theirs = names(native), names(megatron)
        assert {n for n in ours if not _native_only(n)} == theirs, (names.__name__, ours ^ theirs)
    # Both wrote the files around the metrics the same way.
    for run in (native, megatron):
        assert json.loads((run / "COMPLETED").read_text()) == {"step": 4}
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
        # Evaluations at step 1 (the first), 2 and 4 (eval_every 2), each with both plots.
        expected = [f"{kind}_step{step:07d}.png" for kind in ("depth_routing", "expert_load") for step in (1, 2, 4)]
        assert sorted(p.name for p in (run / "plots").iterdir()) == expected


def test_megatron_honours_the_trainer_keys(small_data_dir, tmp_path):
    """checkpoint.interval_minutes, checkpoint.keep_every, trainer.deterministic,
    trainer.progress_bar and logging.plots_every_eval under ``engine: megatron``: each
    changes what the run does."""
    lines: list[str] = []
    cfg = _config(
        small_data_dir,
        tmp_path / "a",
        **MEGATRON,
        **{
            "checkpoint.interval_steps": 0,
            "checkpoint.interval_minutes": 1e-9,  # due after every step
            "checkpoint.keep_last": 1,
            "checkpoint.keep_every": 2,
            "trainer.deterministic": False,
            "trainer.progress_bar": True,
            "logging.plots_every_eval": False,
        },
    )
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        trainer = Trainer(resolve_job(cfg), log=lines.append)
        assert not torch.are_deterministic_algorithms_enabled()
        trainer.train()
        trainer.close()
    finally:
        torch.use_deterministic_algorithms(was)
    # Saved after every step (by time), pruned to the newest plus every second step.
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert [line.split(":")[0] for line in lines if line.startswith("step ") and "/4" in line] == [
        "step 1/4",
        "step 2/4",
        "step 3/4",
        "step 4/4",
    ]
    assert not (tmp_path / "a" / "plots").exists()

    quiet: list[str] = []
    _train(_config(small_data_dir, tmp_path / "b", **MEGATRON, **{"trainer.progress_bar": False}), log=quiet.append)
    assert not any("/4:" in line for line in quiet)


def test_megatron_deepspeed_honours_deepspeed_extra(small_data_dir, tmp_path):
    extra = {"zero_optimization": {"reduce_bucket_size": 123456}}
    cfg = _config(
        small_data_dir,
        tmp_path,
        **{
            **MEGATRON,
            "parallel.dp_backend": "deepspeed",
            "parallel.zero_stage": 1,
            "megatron.distributed_optimizer": "null",
            "parallel.deepspeed_extra": json.dumps(extra),
            "trainer.max_steps": 2,
        },
    )
    trainer = Trainer(resolve_job(cfg), log=lambda _: None)
    try:
        # The same builder as the native DeepSpeed backend: modmoe's keys plus the extra ones,
        # and DeepSpeed itself runs with them.
        assert trainer.backend.ds_config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123456}
        assert trainer.backend.deepspeed.zero_reduce_bucket_size() == 123456
        trainer.train()
    finally:
        trainer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_megatron_refuses_async_checkpoint_saves(small_data_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_job(_config(small_data_dir, tmp_path, **MEGATRON, **{"checkpoint.async_save": True}))
    assert str(err.value) == (
        "config error: checkpoint.async_save = True: not honoured by the megatron backend (the keys each "
        "backend honours: docs/architecture.md); remove it or pick a backend that implements it"
    )
    assert not (tmp_path / "config.yaml").exists()  # refused before any work


def test_native_deepspeed_runs_in_one_plain_process(small_data_dir, tmp_path):
    """No torchrun and no process group: the DeepSpeed backend makes its own one-rank group,
    trains, resumes from its checkpoint, and leaves no group behind."""
    deepspeed = {"parallel.dp_backend": "deepspeed", "parallel.zero_stage": 1, "trainer.max_steps": 2}
    assert not torch.distributed.is_initialized()
    _train(_config(small_data_dir, tmp_path, **deepspeed))
    assert not torch.distributed.is_initialized()
    _train(_config(small_data_dir, tmp_path, **{**deepspeed, "trainer.max_steps": 4}))
    assert not torch.distributed.is_initialized()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "COMPLETED").read_text()) == {"step": 4}
