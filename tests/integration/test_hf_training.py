"""Training from a pretrained checkpoint (``model.from_hf``), in process: the trunk frozen by
``optimizer.routers_only_steps`` keeps every bit while the routers learn, a resumed run takes its
weights from its checkpoint (not from the pretrained directory) and continues exactly, and the
run records the completed architecture; and the command line's one-line refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hf_models
import pytest
import torch
import yaml
from runs import REPO

from modmoe.config import JobConfig
from modmoe.config_base import validate_config
from modmoe.train.loop import Trainer
from modmoe.train.optim import is_router, lr_factor

pytest.importorskip("transformers")
FROZEN = 2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    directory = hf_models.save(hf_models.build("qwen3"), tmp_path_factory.mktemp("hf") / "qwen3")
    return hf_models.save_tokenizer(directory)


def config(pretrained: Path, data_dir: Path, run_dir: Path, max_steps: int) -> JobConfig:
    """MoD-ified (capacity 0.5) and upcycled into 4 half-width experts, routers alone for 2 steps."""
    return validate_config(
        JobConfig,
        {
            "model": {
                "from_hf": str(pretrained),
                "max_seq_len": 32,
                "depth": {"enabled": True, "capacity": 0.5},
                "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_hidden": 48},
            },
            "data": {"max_corpus_bytes": 200_000, "val_fraction": 0.1, "seq_len": 32, "prepared_dir": str(data_dir)},
            "optimizer": {"lr": 0.01, "warmup_steps": 0, "routers_only_steps": FROZEN},
            "trainer": {
                "max_steps": max_steps,
                "global_batch_size": 4,
                "micro_batch_size": 4,
                "eval_every": 0,
                "eval_batches": 1,
                "run_dir": str(run_dir),
                "progress_bar": False,
            },
            "logging": {"mlflow": {"enabled": False}, "plots_every_eval": False},
        },
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "prepared"


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.backend.core.named_parameters()}


def test_routers_alone_then_everything(pretrained, data_dir, tmp_path):
    trainer = Trainer(config(pretrained, data_dir, tmp_path / "run", 3), log=lambda _: None)
    try:
        start = weights(trainer)
        for _ in range(FROZEN):
            trainer.train_step()
        frozen = weights(trainer)
        trainer.train_step()
        after = weights(trainer)
    finally:
        trainer.close()
    routers = [k for k in start if is_router(k)]
    trunk = [k for k in start if not is_router(k)]
    assert any(".router.proj" in k for k in routers) and any(k.endswith("mlp.gate.weight") for k in routers)
    assert all(torch.equal(start[k], frozen[k]) for k in trunk), "a frozen weight moved"
    assert all(not torch.equal(start[k], frozen[k]) for k in routers), "a router did not learn"
    moved = [k for k in trunk if not torch.equal(frozen[k], after[k])]
    assert len(moved) == len(trunk), sorted(set(trunk) - set(moved))  # step 3 trains every weight
    # ... with a fresh Adam: its first step moves each element by the learning rate (|m/sqrt(v)| = 1
    # after one gradient), beside the decay; a count or moments left from the frozen steps would not.
    opt = trainer.cfg.optimizer
    lr = opt.lr * lr_factor(FROZEN, opt, trainer.cfg.trainer.max_steps)
    name = "layers.0.attn.wq.weight"
    step = (after[name] - frozen[name] * (1 - lr * opt.weight_decay)).abs()
    assert step.median() / lr == pytest.approx(1.0, rel=0.02)


def test_a_resumed_run_continues_exactly_without_reading_the_pretrained_weights(
    pretrained, data_dir, tmp_path, monkeypatch
):
    straight = Trainer(config(pretrained, data_dir, tmp_path / "straight", 3), log=lambda _: None)
    try:
        straight.train()
        expected = weights(straight)
    finally:
        straight.close()
    first = Trainer(config(pretrained, data_dir, tmp_path / "resumed", 1), log=lambda _: None)
    try:
        first.train()  # saves its last step: the middle of the frozen phase
    finally:
        first.close()

    def refuse(*_):
        raise AssertionError("a resumed run read the pretrained weights")

    monkeypatch.setattr("modmoe.hf.load.load_pretrained", refuse)
    resumed = Trainer(config(pretrained, data_dir, tmp_path / "resumed", 3), log=lambda _: None)
    try:
        assert resumed.step == 1
        resumed.train()
        got = weights(resumed)
    finally:
        resumed.close()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name

    # What the run records is the completed architecture, and the pretrained config.json.
    recorded = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["model"]
    assert (recorded["hf_architecture"], recorded["num_layers"], recorded["head_dim"]) == ("Qwen3ForCausalLM", 3, 24)
    manifest = json.loads(next((tmp_path / "resumed" / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert manifest["meta"]["config"]["model"] == recorded
    assert manifest["meta"]["pretrained"]["config"]["architectures"] == ["Qwen3ForCausalLM"]


def test_the_command_line_refuses_a_pickle_in_one_line(pretrained, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_bytes((pretrained / "config.json").read_bytes())
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"from_hf": str(directory)}}))
    proc = subprocess.run(
        [sys.executable, "-m", "modmoe", "train", str(cfg), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("modmoe:")]
    assert len(lines) == 1 and "pickle-only checkpoint (pytorch_model.bin)" in lines[0], proc.stderr
