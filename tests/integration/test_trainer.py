"""The training loop on the stdlib corpus: learning, the run record, data parallelism."""

import json

import pytest
import torch
import yaml
from runs import read_metrics, run_modmoe, small_overrides

from modmoe.checkpoint.manifest import CheckpointError
from modmoe.config import load_config
from modmoe.train.loop import Trainer


def test_loss_falls_and_run_dir_is_complete(small_data_dir, tmp_path):
    cfg = load_config("configs/tiny.yaml", small_overrides(small_data_dir, tmp_path, **{"trainer.max_steps": 40}))
    trainer = Trainer(cfg, log=lambda _: None)
    first_eval = trainer.evaluate()
    final = trainer.train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in (
        "loss",
        "tokens_per_s",
        "moe_aux_loss",
        "moe_z_loss",
        "mod_bce_loss",
        "lr",
        "grad_norm",
        "mod/entry_fraction",
        "moe/max_over_mean_load",
        "mod/causal_agreement",
    ):
        assert key in records[-1], key
    # 40 steps of 512 tokens: well below the uniform-guess loss ln(512) = 6.24.
    assert final["eval/loss_topk"] < first_eval["eval/loss_topk"] - 1.0
    assert final["eval/loss_causal"] < first_eval["eval/loss_causal"] - 1.0
    assert records[-1]["mod/entry_fraction"] == pytest.approx(0.25)  # exactly k = capacity * T tokens
    assert (tmp_path / "COMPLETED").exists()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 40 and saved["model"]["depth"]["capacity"] == 0.25


def test_gradient_accumulation_keeps_the_global_batch(small_data_dir, tmp_path):
    """micro 4 x 2 accumulation steps sees the same data as micro 8: losses stay close."""
    runs = {}
    for micro in (8, 4):
        cfg = load_config(
            None,
            small_overrides(
                small_data_dir,
                tmp_path / str(micro),
                **{
                    "trainer.max_steps": 3,
                    "trainer.micro_batch_size": micro,
                    "model.moe.aux_loss_coef": 0.0,
                    "model.moe.z_loss_coef": 0.0,
                    "model.depth.bce_loss_coef": 0.0,
                },
            ),
        )
        Trainer(cfg, log=lambda _: None).train()
        runs[micro] = [r["loss"] for r in read_metrics(tmp_path / str(micro))]
    # Top-k routing is per sequence and the LM loss a mean over equal-size micro-batches, so the
    # gradients agree up to float summation order.
    assert runs[4] == pytest.approx(runs[8], rel=1e-4)


@pytest.mark.multirank
def test_two_rank_data_parallel_matches_one_rank_with_the_doubled_batch(small_data_dir, tmp_path):
    common = {"trainer.max_steps": 8, "trainer.global_batch_size": 8}
    run_modmoe(
        [
            "train",
            "configs/tiny.yaml",
            *sum(
                (
                    ["--set", o]
                    for o in small_overrides(
                        small_data_dir, tmp_path / "one", **common, **{"trainer.micro_batch_size": 8}
                    )
                ),
                [],
            ),
        ]
    )
    run_modmoe(
        [
            "train",
            "configs/tiny.yaml",
            *sum(
                (
                    ["--set", o]
                    for o in small_overrides(
                        small_data_dir, tmp_path / "two", **common, **{"trainer.micro_batch_size": 4}
                    )
                ),
                [],
            ),
        ],
        nproc=2,
    )
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 8
    # fp32 on CPU: the only difference is the order of float sums (all-reduce of two halves vs
    # one batch), ~1e-7 relative per step; Adam over 8 steps keeps it below 1e-4. The balance
    # loss sees the global expert load on both layouts, so aux losses agree too.
    for a, b in zip(one, two):
        for key in ("loss", "moe_aux_loss", "moe_z_loss", "mod_bce_loss", "eval/loss_topk"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        assert b["mod/entry_fraction"] == a["mod/entry_fraction"]


class StopAfter(Trainer):
    """Stops at a given step as a preempted job does (signal -> checkpoint -> exit)."""

    stop_at = 0

    def stop_requested(self) -> bool:
        return self.step == self.stop_at


def test_exact_resume_single_rank(small_data_dir, tmp_path):
    """2N steps straight vs N, stop, resume, N: bit-identical losses and parameters."""
    extra = {
        "trainer.max_steps": 8,
        "trainer.eval_every": 4,
        "model.moe.bias_update_rate": 0.01,
        "logging.mlflow.enabled": False,
    }
    straight = Trainer(load_config(None, small_overrides(small_data_dir, tmp_path / "a", **extra)), log=lambda _: None)
    straight.train()
    StopAfter.stop_at = 4
    first = StopAfter(load_config(None, small_overrides(small_data_dir, tmp_path / "b", **extra)), log=lambda _: None)
    first.train()
    assert not (tmp_path / "b" / "COMPLETED").exists()
    resumed = Trainer(load_config(None, small_overrides(small_data_dir, tmp_path / "b", **extra)), log=lambda _: None)
    assert resumed.step == 4
    resumed.train()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical, step by step
    assert [r.get("eval/loss_causal") for r in a] == [r.get("eval/loss_causal") for r in b]
    for (name, p), q in zip(straight.backend.core.state_dict().items(), resumed.backend.core.state_dict().values()):
        assert torch.equal(p, q), name  # includes the expert-bias buffers


def test_resume_none_and_bad_path(small_data_dir, tmp_path):
    extra = {"trainer.max_steps": 2, "logging.mlflow.enabled": False}
    Trainer(load_config(None, small_overrides(small_data_dir, tmp_path, **extra)), log=lambda _: None).train()
    assert (
        Trainer(
            load_config(None, small_overrides(small_data_dir, tmp_path, **extra)), log=lambda _: None, resume="none"
        ).step
        == 0
    )
    assert Trainer(load_config(None, small_overrides(small_data_dir, tmp_path, **extra)), log=lambda _: None).step == 2
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Trainer(
            load_config(None, small_overrides(small_data_dir, tmp_path, **extra)),
            log=lambda _: None,
            resume=str(tmp_path / "nope"),
        )


def test_a_checkpoint_from_before_a_model_field_existed_resumes(small_data_dir, tmp_path):
    """An earlier modmoe recorded no ``model.attention_bias`` or ``depth.prefix_prior_tokens``: it
    ran with what their defaults mean now, so its checkpoints resume; a real difference is one line."""
    extra = {"trainer.max_steps": 2, "logging.mlflow.enabled": False}
    Trainer(load_config(None, small_overrides(small_data_dir, tmp_path, **extra)), log=lambda _: None).train()
    manifest_path = sorted((tmp_path / "checkpoints").glob("step_*"))[-1] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    model = manifest["meta"]["config"]["model"]
    del model["attention_bias"], model["depth"]["prefix_prior_tokens"]
    manifest_path.write_text(json.dumps(manifest))
    more = {**extra, "trainer.max_steps": 3}
    assert Trainer(load_config(None, small_overrides(small_data_dir, tmp_path, **more)), log=lambda _: None).step == 2
    model["num_heads"] = 2
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model.num_heads = 2 in the checkpoint but 4 in the config"):
        Trainer(load_config(None, small_overrides(small_data_dir, tmp_path, **more)), log=lambda _: None)
