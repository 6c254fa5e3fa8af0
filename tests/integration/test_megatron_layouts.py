"""Megatron layouts on CPU over gloo against one rank, from the same initial weights.

Every layout loads its part of the native model's initial weights (modmoe/engines/megatron/load.py),
so pipeline (1F1B), expert, tensor and mixed layouts must train like one rank: fp32 on CPU, they
differ only in the order of float sums, so losses, gradient norms, every MoE and MoD metric and
the validation loss agree within 1e-5 relative over 4 steps (the gradient norm under TP within
1e-4: Megatron sums the squares of its shards). With every Megatron setting at its default and
clipping at 0.5 (active: the norms are ~1), the engine picks its CPU parts itself.

The model puts routed and MoE layers on both pipeline stages (routed blocks 1 and 3, MoE in every
block), and 8 sequences in micro-batches of 2 make 4 micro-batches per step, more than 2 stages.

Checkpoints resume under another layout: PP=2's on one rank; EP=2's as TP=2 x EP=2 (slow pass).
Switching expert parallelism on or off is refused in one line (Megatron's optimizer keeps the
experts' state apart only when ep > 1).

This file is also the torchrun worker: ``torchrun ... test_megatron_layouts.py OUT DATA two|four``
runs, in one launch (each costs ~15 s of imports on 2 cores), the loading check and the PP=2 and
EP=2 runs (two ranks), or the TP=2xEP=2 and PP=2xTP=2 runs and the resume (four ranks, the slow pass).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")  # the workers build Megatron models (the megatron extra)
import torch
from runs import REPO, TEST_PYTHONPATH

TIMEOUT = 420
REL = 1e-5
NOT_COMPARED = ("tokens_per_s", "tflops", "memory/", "mfu", "straggler")  # speed and memory


def train_config(run_dir: str | Path, data_dir: str, extra: list[str]):
    """A ~0.1M-parameter MoDE model, 4 steps of 4 micro-batches of 2, checkpoints at steps 2 and 4."""
    from modmoe.config import load_config

    values = {
        "engine": "megatron",
        "model.vocab_size": 512,
        "model.dim": 32,
        "model.num_layers": 4,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.ffn_hidden": 64,
        "model.max_seq_len": 64,
        "model.depth.capacity": 0.25,
        "model.depth.predictor": True,
        "model.moe.num_experts": 4,
        "model.moe.top_k": 2,
        "model.moe.expert_hidden": 32,
        "model.moe.seq_aux_loss_coef": 0.01,
        "data.max_corpus_bytes": 600_000,
        "data.val_fraction": 0.15,
        "data.vocab_size": 512,
        "data.prepared_dir": data_dir,
        "data.seq_len": 64,
        "optimizer.lr": 0.01,
        "optimizer.warmup_steps": 2,
        "optimizer.grad_clip": 0.5,
        "trainer.run_dir": str(run_dir),
        "trainer.max_steps": 4,
        "trainer.global_batch_size": 8,
        "trainer.micro_batch_size": 2,
        "trainer.eval_every": 0,
        "trainer.eval_batches": 1,
        "trainer.device": "cpu",
        "trainer.progress_bar": False,
        "logging.mlflow.enabled": False,
        "checkpoint.interval_steps": 2,
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()] + list(extra))


LAYOUTS = {  # run name -> overrides; "two" runs on 2 ranks, "four" on 4
    "pp2": ["megatron.pp=2"],
    "ep2": ["parallel.ep=2"],
    "tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "megatron.sequence_parallel=true", "megatron.etp=1"],
    "pp2_tp2": ["megatron.pp=2", "parallel.tp=2", "megatron.sequence_parallel=true"],
}


# ---------------------------------------------------------------------------- workers
def _record_loading(out: Path, data_dir: str, name: str) -> None:
    """Builds this rank's GPTModel for layout ``name`` and records which native tensors its
    load reads (the reader drops each tensor it gives: a second read of one would fail)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from modmoe.engines.megatron.cpu_emulation import megatron_on_cpu
    from modmoe.engines.megatron.load import load_native_weights, native_init_reader
    from modmoe.engines.megatron.spec import build_gpt_model
    from modmoe.engines.megatron.translate import build_transformer_config, translate

    cfg = train_config(out / "unused", data_dir, LAYOUTS[name])
    plan = translate(
        cfg.model,
        cfg.parallel,
        cfg.megatron,
        world_size=dist.get_world_size(),
        seq_len=64,
        precision="auto",
        device="cpu",
    )
    ps.initialize_model_parallel(**plan.layout.parallel_state_kwargs())
    try:
        with megatron_on_cpu():
            tc = build_transformer_config(plan, use_cpu_initialization=True)
            gpt = build_gpt_model(plan, tc, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
            names = load_native_weights(gpt, cfg.model, native_init_reader(cfg.model, cfg.trainer.seed))
    finally:
        ps.destroy_model_parallel()
    (out / f"read_{name}_{dist.get_rank()}.json").write_text(json.dumps(names))


def _train(cfg) -> None:
    """``run_training`` without leaving the process group at the end (the next run reuses it)."""
    from modmoe.train.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


def _worker(out: Path, data_dir: str, ranks: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if ranks == "four":
        # ep2_to_tp2_ep2 holds EP=2's step-2 checkpoint (copied by the test): it resumes under TP=2 x EP=2.
        for name, layout in (("tp2_ep2", "tp2_ep2"), ("pp2_tp2", "pp2_tp2"), ("ep2_to_tp2_ep2", "tp2_ep2")):
            _train(train_config(out / name, data_dir, LAYOUTS[layout]))
    else:
        for name in ("pp2", "ep2"):
            _record_loading(out, data_dir, name)
            _train(train_config(out / name, data_dir, LAYOUTS[name]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, data_dir: str, ranks: str) -> None:
    env = {**os.environ, "PYTHONPATH": TEST_PYTHONPATH, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    nproc = {"two": 2, "four": 4}[ranks]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, str(out), data_dir, ranks]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


# ---------------------------------------------------------------------------- helpers
def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _numbers(row: dict) -> dict[str, float]:
    """Every metric a layout must reproduce (not timings, throughput or memory)."""
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, int | float) and not k.endswith("_s") and not any(t in k for t in NOT_COMPARED)
    }


def assert_follows(reference: list[dict], other: list[dict], grad_norm_rel: float = REL) -> None:
    """Same steps, same metric names, same values (``grad_norm`` within ``grad_norm_rel``)."""
    assert [r["step"] for r in other] == [r["step"] for r in reference]
    for a, b in zip(reference, other, strict=True):
        want, got = _numbers(a), _numbers(b)
        assert got.keys() == want.keys(), (a["step"], sorted(got.keys() ^ want.keys()))
        for key, value in want.items():
            rel = grad_norm_rel if key == "grad_norm" else REL
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), (a["step"], key, got[key], value)


def _train_here(run_dir: Path, data_dir: str, *extra: str) -> Path:
    """One rank in this process (the backend creates and destroys its own process group)."""
    from modmoe.train.loop import run_training

    run_training(train_config(run_dir, data_dir, list(extra)))
    return run_dir


def _native_state(run: Path, step: int = 4) -> dict[str, torch.Tensor]:
    from modmoe.config import load_config
    from modmoe.engines.megatron.checkpoint import megatron_checkpoint_to_native

    cfg = load_config(run / "config.yaml")
    return megatron_checkpoint_to_native(run / "checkpoints" / f"step_{step:08d}", cfg.model)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_layouts")
    _launch(root, small_data_dir, "two")
    single = _train_here(root / "single", small_data_dir)
    native = _train_here(root / "native", small_data_dir, "engine=native")
    # PP=2's step-2 checkpoint resumes on one rank.
    shutil.copytree(
        root / "pp2" / "checkpoints" / "step_00000002", root / "pp2_to_one" / "checkpoints" / "step_00000002"
    )
    pp2_to_one = _train_here(root / "pp2_to_one", small_data_dir)
    return {
        "root": root,
        "single": single,
        "native": native,
        "pp2_to_one": pp2_to_one,
        "pp2": root / "pp2",
        "ep2": root / "ep2",
    }


# ---------------------------------------------------------------------------- tests
@pytest.mark.multirank
def test_each_rank_reads_only_the_native_tensors_of_its_part(runs):
    reads = {
        (name, rank): json.loads((runs["root"] / f"read_{name}_{rank}.json").read_text())
        for name in ("pp2", "ep2")
        for rank in (0, 1)
    }
    everything = set(reads["ep2", 0])
    # Expert parallelism: the dense part is replicated and the native experts are stacked (E, ...).
    assert set(reads["ep2", 1]) == everything and "layers.0.mlp.experts.w1" in everything
    first, last = set(reads["pp2", 0]), set(reads["pp2", 1])
    assert not first & last and first | last == everything
    assert "tok_embeddings.weight" in first and {"norm.weight", "output.weight"} <= last
    assert {n.split(".")[1] for n in first if n.startswith("layers.")} == {"0", "1"}
    assert {n.split(".")[1] for n in last if n.startswith("layers.")} == {"2", "3"}
    for stage in (first, last):  # each stage holds a routed block and MoE blocks
        assert any(".router.proj." in n for n in stage) and any(".mlp.experts." in n for n in stage)


@pytest.mark.multirank
def test_megatron_starts_from_the_native_model(runs):
    """One Megatron rank and the native engine: the same initial weights, so the same first
    step (the aux-loss definitions agree; see docs/megatron.md)."""
    single, native = _metrics(runs["single"])[0], _metrics(runs["native"])[0]
    for key in ("loss", "grad_norm", "eval/loss_topk", "moe_aux_loss", "moe_z_loss", "mod_bce_loss"):
        assert single[key] == pytest.approx(native[key], rel=1e-5), key


@pytest.mark.multirank
def test_pipeline_parallel_1f1b_trains_like_one_rank(runs):
    single, pp2 = _metrics(runs["single"]), _metrics(runs["pp2"])
    assert single[-1]["loss"] < single[0]["loss"]
    assert_follows(single, pp2)
    assert "moe_seq_aux_loss" in pp2[0] and "mod_predictor_loss" in pp2[0]  # reduced over both stages
    assert {k for k in pp2[0] if k.startswith("moe/layer") and k.endswith("max_over_mean_load")} == {
        f"moe/layer{i}/max_over_mean_load" for i in range(4)
    }
    config = (runs["pp2"] / "config.yaml").read_text()
    assert "pp: 2" in config


@pytest.mark.multirank
def test_expert_parallel_trains_like_one_rank(runs):
    assert_follows(_metrics(runs["single"]), _metrics(runs["ep2"]))


@pytest.mark.multirank
def test_checkpoint_resumes_under_another_layout(runs):
    """PP=2's step-2 checkpoint, resumed on one rank, continues the one-rank curve."""
    single, resumed = _metrics(runs["single"]), _metrics(runs["pp2_to_one"])
    assert_follows(single[2:], resumed)
    saved = json.loads((runs["pp2"] / "checkpoints" / "step_00000002" / "manifest.json").read_text())["meta"]
    meta = json.loads((runs["pp2_to_one"] / "checkpoints" / "step_00000004" / "manifest.json").read_text())["meta"]
    assert saved["layout"].startswith("tp1-pp2-") and meta["layout"].startswith("tp1-pp1-cp1-ep1-dp1-")


@pytest.mark.multirank
def test_switching_expert_parallelism_on_or_off_is_refused_in_one_line(runs, small_data_dir, tmp_path):
    """Megatron keeps the experts' optimizer state apart only when ep > 1: EP=2's checkpoint on
    one rank (ep = 1) is refused before anything is read, naming parallel.ep."""
    from modmoe.config_base import ConfigError

    shutil.copytree(runs["ep2"] / "checkpoints" / "step_00000002", tmp_path / "run" / "checkpoints" / "step_00000002")
    with pytest.raises(ConfigError, match=r"written with parallel\.ep = 2.*resumes with parallel\.ep > 1") as err:
        _train_here(tmp_path / "run", small_data_dir)
    assert "\n" not in str(err.value)


@pytest.mark.multirank
def test_pipeline_and_expert_parallel_checkpoints_export_the_one_rank_model(runs, tmp_path):
    """The final checkpoints of the PP=2 and EP=2 runs convert to the native weights of the
    one-rank run; ``modmoe export`` of the EP=2 run directory scores the validation set as the run did."""
    from runs import run_modmoe

    from modmoe.inference.evaluate import evaluate, load_validation
    from modmoe.inference.loading import load_exported

    reference = _native_state(runs["single"])
    for name in ("pp2", "ep2"):
        state = _native_state(runs[name])
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    proc = run_modmoe(["export", str(runs["ep2"]), "--out", str(tmp_path / "export")])
    assert "exported step 4" in proc.stdout, proc.stdout + proc.stderr
    result = evaluate(load_exported(tmp_path / "export"), load_validation(load_exported(tmp_path / "export")))
    assert result.loss_topk == pytest.approx(_metrics(runs["ep2"])[-1]["eval/loss_topk"], rel=1e-5)


CPU_OPTIONS = {  # one rank, every other Megatron setting at its default
    "recompute_all": ["parallel.activation_checkpointing=all"],
    "allgather": ["megatron.dispatcher=allgather"],
    "global_aux_loss": ["megatron.aux_loss_scope=global_batch"],
    "sigmoid_bias_shared_expert": [
        "model.moe.score=sigmoid",
        "model.moe.bias_update_rate=0.01",
        "model.moe.num_shared_experts=1",
        "megatron.aux_loss_with_expert_bias=megatron",
    ],
    "dense_mod": ["model.moe.enabled=false"],
    "moe_only_tied": ["model.depth.enabled=false", "model.tie_embeddings=true"],
}


@pytest.mark.parametrize("name", list(CPU_OPTIONS))
def test_megatron_options_train_on_cpu(name, small_data_dir, tmp_path):
    """Options whose Megatron code paths differ train 2 steps on CPU (never a traceback); activation
    recompute and the allgather dispatcher compute what the defaults compute."""
    extra = [*CPU_OPTIONS[name], "trainer.max_steps=2", "checkpoint.interval_steps=0"]
    rows = _metrics(_train_here(tmp_path / name, small_data_dir, *extra))
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (tmp_path / name / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    if name in ("recompute_all", "allgather"):
        base = _metrics(_train_here(tmp_path / "base", small_data_dir, "trainer.max_steps=2"))
        for a, b in zip(base, rows, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"])


def test_cpu_refusal_is_one_line_from_the_cli(small_data_dir, tmp_path):
    from runs import small_overrides

    overrides = small_overrides(small_data_dir, tmp_path, engine="megatron", **{"trainer.device": "cpu"})
    args = ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.run(
        [sys.executable, "-m", "modmoe", *args, "--set", "megatron.distributed_optimizer=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modmoe: config error: megatron.distributed_optimizer = True"), lines
    assert "use null" in lines[0] and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.multirank
@pytest.mark.slow
def test_four_rank_layouts_train_like_one_rank(runs, small_data_dir, tmp_path):
    """TP=2 x EP=2 (whole experts per rank: the alltoall dispatcher) and PP=2 x TP=2 (experts split
    over TP: allgather, which the engine picks on CPU) on 4 ranks; EP=2's checkpoint resumes as
    TP=2 x EP=2."""
    checkpoint = runs["ep2"] / "checkpoints" / "step_00000002"
    shutil.copytree(checkpoint, tmp_path / "ep2_to_tp2_ep2" / "checkpoints" / "step_00000002")
    _launch(tmp_path, small_data_dir, "four")
    single = _metrics(runs["single"])
    for name in ("tp2_ep2", "pp2_tp2"):
        assert_follows(single, _metrics(tmp_path / name), grad_norm_rel=1e-4)
    assert_follows(single[2:], _metrics(tmp_path / "ep2_to_tp2_ep2"), grad_norm_rel=1e-4)  # EP=2 resumed as TP=2 x EP=2


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
