"""Megatron engine on CPU (emulation of Megatron's local layers), one process and torchrun over gloo.

- sequence-parallel routing (2 ranks): the pure functions on [s/2, b, h] shards choose the same
  tokens as one process, leave the others bit-identical, and give the same outputs and
  gradients (float64, to 1e-10), uneven selections included;
- training: ``run_training`` (``engine: megatron``) with TP=2 + sequence parallelism (2 ranks) gives the
  losses of one rank; its TP=2 checkpoint resumes on one rank and continues the same curve;
  DeepSpeed ZeRO-1 trains the same curve; the final dist checkpoint exports to a native model
  whose validation loss equals the Megatron run's.

This file is also the torchrun worker: ``python -m torch.distributed.run ... tests/test_megatron_multirank.py OUT DATA``
checks the routing, then trains with TP=2 (one launch: each costs ~15 s of imports on 2 cores).
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

TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": TEST_PYTHONPATH,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        __file__,
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# ---------------------------------------------------------------------------- workers
def _routing_worker(out: Path) -> None:
    """Each rank computes the single-process reference on whole sequences, then the SP version
    on its shard; errors go to out/routing_<rank>.json."""
    import torch.distributed as dist

    from modmoe.engines.megatron.routing import (
        all_gather_logits,
        all_gather_seq,
        gather_routed,
        plan_routed_rows,
        scatter_routed,
    )
    from modmoe.model.routing import router_weight

    dist.init_process_group("gloo")  # the training run after this check reuses the group
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    results = []
    for case, (s, b, h, k, skew) in enumerate([(16, 3, 8, 4, False), (24, 2, 6, 12, False), (16, 2, 4, 8, True)]):
        torch.manual_seed(case)
        x = torch.randn(s, b, h, dtype=torch.float64)
        w = torch.randn(h, dtype=torch.float64)
        mix = torch.randn(h, h, dtype=torch.float64)
        grad_out = torch.randn(s, b, h, dtype=torch.float64)
        bias = torch.zeros(s, 1, dtype=torch.float64)
        if skew:  # every chosen token on rank 0: rank 1 packs only padding
            bias[: s // world] = 100.0

        def inner(routed, mix):  # a layer mixing the routed sequence causally: [k, b, h] -> [k, b, h]
            return torch.tanh(routed.cumsum(0) * 0.3) @ mix

        # Reference: one process, whole sequences.
        xr, wr, mr = (t.clone().requires_grad_() for t in (x, w, mix))
        logits = xr @ wr + bias  # [s, b]
        plan = plan_routed_rows(logits.detach(), k)
        ref = scatter_routed(xr, plan, inner(gather_routed(xr, plan), mr), router_weight(logits, "sigmoid"))
        (ref * grad_out).sum().backward()

        # Sequence parallel: this rank's shard only.
        n = s // world
        part = slice(rank * n, (rank + 1) * n)
        xs, ws, ms = x[part].clone().requires_grad_(), w.clone().requires_grad_(), mix.clone().requires_grad_()
        local_logits = xs @ ws + bias[part]  # [s/W, b]
        sp_plan = plan_routed_rows(all_gather_logits(local_logits, group), k, rank, world)
        routed = gather_routed(xs, sp_plan, group)  # [k/W, b, h]
        full = all_gather_seq(routed, group)  # what an SP layer's first linear does
        kl = k // world
        update = inner(full, ms)[rank * kl : (rank + 1) * kl]
        out_sp = scatter_routed(xs, sp_plan, update, router_weight(local_logits, "sigmoid"), group)
        (out_sp * grad_out[part]).sum().backward()
        for t in (ws.grad, ms.grad):  # replicated parameters: sum the shards' gradients
            dist.all_reduce(t, group=group)
        member = sp_plan.local_mask
        results.append(
            {
                "same_choice": bool(torch.equal(member, plan.mask[part])),
                "out": float((out_sp.detach() - ref.detach()[part]).abs().max()),
                "skipped_untouched": bool(torch.equal(out_sp.detach()[~member], x[part][~member])),
                "chosen_here": int(member.sum()),
                "x_grad": float((xs.grad - xr.grad[part]).abs().max()),
                "w_grad": float((ws.grad - wr.grad).abs().max()),
                "mix_grad": float((ms.grad - mr.grad).abs().max()),
            }
        )
    (out / f"routing_{rank}.json").write_text(json.dumps(results))


def train_config(run_dir: str | Path, data_dir: str, extra: list[str]):
    """A ~0.1M-parameter MoDE model, 4 steps of 2 micro-batches, checkpoints at steps 2 and 4."""
    from modmoe.config import load_config

    values = {
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
        "model.moe.score": "sigmoid",
        "model.moe.aux_loss_coef": 0.0,
        "model.moe.bias_update_rate": 0.01,  # the expert-bias update path
        "data.max_corpus_bytes": 600_000,
        "data.val_fraction": 0.15,
        "data.vocab_size": 512,
        "data.prepared_dir": data_dir,
        "data.seq_len": 64,
        "optimizer.lr": 0.01,
        "optimizer.warmup_steps": 2,
        "trainer.run_dir": str(run_dir),
        "trainer.max_steps": 4,
        "trainer.global_batch_size": 8,
        "trainer.micro_batch_size": 4,
        "trainer.eval_every": 0,
        "trainer.eval_batches": 2,
        "trainer.device": "cpu",
        "trainer.progress_bar": False,
        "logging.mlflow.enabled": False,
        "checkpoint.interval_steps": 2,
    }
    values["engine"] = "megatron"  # every Megatron setting at its default: the engine picks what runs on CPU
    return load_config(None, [f"{k}={v}" for k, v in values.items()] + list(extra))


def _sp_worker(out: Path, data_dir: str) -> None:
    from modmoe.train.loop import run_training

    _routing_worker(out)
    run_training(train_config(out / "tp2_sp", data_dir, ["parallel.tp=2", "megatron.sequence_parallel=true"]))


# ---------------------------------------------------------------------------- tests
def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_here(run_dir: Path, data_dir: str, *extra: str) -> Path:
    """One rank in this process (the backend creates and destroys its own process group)."""
    from modmoe.train.loop import run_training

    run_training(train_config(run_dir, data_dir, list(extra)))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_runs")
    _launch([str(root), small_data_dir], nproc=2)  # routing check + the TP=2 run
    out = {"root": root, "tp2_sp": root / "tp2_sp", "single": _train_here(root / "single", small_data_dir)}
    # Resume the TP=2 run's step-2 checkpoint under another layout (one rank).
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(out["tp2_sp"] / "checkpoints" / "step_00000002", root / "resumed" / "checkpoints" / "step_00000002")
    out["resumed"] = _train_here(root / "resumed", small_data_dir)
    out["deepspeed"] = _train_here(
        root / "deepspeed",
        small_data_dir,
        "parallel.dp_backend=deepspeed",
        "parallel.zero_stage=1",
    )
    return out


@pytest.mark.multirank
def test_sequence_parallel_routing_equals_one_process(runs):
    ranks = [json.loads((runs["root"] / f"routing_{r}.json").read_text()) for r in (0, 1)]
    for case in range(3):
        for r in (0, 1):
            res = ranks[r][case]
            assert res["same_choice"] and res["skipped_untouched"], (case, r, res)
            assert max(res["out"], res["x_grad"], res["w_grad"], res["mix_grad"]) < 1e-10, (case, r, res)
    assert [ranks[r][2]["chosen_here"] for r in (0, 1)] == [16, 0]  # the skewed case: all on rank 0


@pytest.mark.multirank
def test_tensor_and_sequence_parallel_training_matches_one_rank(runs):
    single, tp2 = _metrics(runs["single"]), _metrics(runs["tp2_sp"])
    assert [m["step"] for m in single] == [1, 2, 3, 4]
    assert single[-1]["loss"] < single[0]["loss"]
    for a, b in zip(single, tp2, strict=True):
        for key in ("loss", "moe_z_loss", "mod_bce_loss", "mod_predictor_loss", "mod/causal_agreement"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    assert tp2[-1]["eval/loss_topk"] == pytest.approx(single[-1]["eval/loss_topk"], rel=1e-5)
    for run in ("single", "tp2_sp"):
        assert json.loads((runs[run] / "COMPLETED").read_text()) == {"step": 4}
        assert sorted(p.name for p in (runs[run] / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


@pytest.mark.multirank
def test_checkpoint_resumes_under_another_layout(runs):
    single, resumed = _metrics(runs["single"]), _metrics(runs["resumed"])
    assert [m["step"] for m in resumed] == [3, 4]
    for m in resumed:
        assert m["loss"] == pytest.approx(single[m["step"] - 1]["loss"], rel=1e-5)
    saved = json.loads((runs["tp2_sp"] / "checkpoints" / "step_00000002" / "manifest.json").read_text())["meta"]
    meta = json.loads((runs["resumed"] / "checkpoints" / "step_00000004" / "manifest.json").read_text())["meta"]
    assert saved["layout"].startswith("tp2-") and meta["layout"].startswith("tp1-")  # e.g. tp2-pp1-cp1-ep1-dp1-...
    assert saved["backend"] == meta["backend"] == "megatron" and meta["sampler"]["position"] == 32


def _expert_biases(run: Path) -> torch.Tensor:
    from modmoe.config import load_config
    from modmoe.engines.megatron.checkpoint import megatron_checkpoint_to_native

    cfg = load_config(run / "config.yaml")
    state = megatron_checkpoint_to_native(run / "checkpoints" / "step_00000004", cfg.model)
    return torch.stack([v for k, v in sorted(state.items()) if k.endswith("expert_bias")])


@pytest.mark.multirank
def test_deepspeed_zero1_trains_the_same_curve(runs):
    single, ds = _metrics(runs["single"]), _metrics(runs["deepspeed"])
    for a, b in zip(single, ds, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]
    step4 = runs["deepspeed"] / "checkpoints" / "step_00000004"
    assert (step4 / "deepspeed").is_dir()
    # DeepSpeed's partitions are written before the seal, so the manifest covers them.
    from modmoe.checkpoint import validate

    listed = [f["path"] for f in json.loads((step4 / "manifest.json").read_text())["files"]]
    assert validate(step4) == [] and any(f.startswith("deepspeed/") for f in listed), listed
    # Aux-loss-free balancing moved every expert bias by +-rate per step, under both optimizers.
    bias_single, bias_ds, bias_tp2 = (_expert_biases(runs[r]) for r in ("single", "deepspeed", "tp2_sp"))
    assert bias_single.abs().max() > 0 and torch.equal(bias_single, bias_tp2)
    assert (bias_ds - bias_single).abs().max() <= 0.02 + 1e-6  # at most one step of 0.01 differs either way


@pytest.mark.multirank
def test_megatron_checkpoint_exports_to_a_native_model(runs):
    from modmoe.config import load_config
    from modmoe.data import prepare_data, validation_batches
    from modmoe.engines.megatron.checkpoint import megatron_checkpoint_to_native
    from modmoe.model import MoDETransformer

    run = runs["tp2_sp"]
    cfg = load_config(run / "config.yaml")
    model = MoDETransformer(cfg.model)
    model.load_state_dict(megatron_checkpoint_to_native(run / "checkpoints" / "step_00000004", cfg.model))
    model.eval()
    data = prepare_data(cfg.data, log=lambda _: None)
    tc = cfg.trainer  # the trainer evaluates eval_batches global batches (dp = 1 here)
    per_global = tc.global_batch_size // tc.micro_batch_size
    batches = validation_batches(data.open("val"), cfg.data.seq_len, tc.micro_batch_size, tc.eval_batches * per_global)
    with torch.no_grad():
        loss = sum(model(x, y).loss.item() for x, y in batches) / len(batches)
    assert loss == pytest.approx(_metrics(run)[-1]["eval/loss_topk"], rel=1e-5)


@pytest.mark.multirank
def test_modmoe_export_of_a_megatron_run_directory(runs, tmp_path):
    """``modmoe export RUN_DIR`` of the TP=2 Megatron run: the newest sealed checkpoint is
    converted and exported; the exported runtime scores the validation batches as the run did.
    A damaged newest checkpoint makes it fall back to the previous one."""
    from runs import run_modmoe

    from modmoe.inference.evaluate import evaluate, load_validation
    from modmoe.inference.loading import load_exported

    run = tmp_path / "run"
    shutil.copytree(runs["tp2_sp"], run)
    proc = run_modmoe(["export", str(run), "--out", str(tmp_path / "export")])
    assert "exported step 4" in proc.stdout, proc.stdout + proc.stderr
    loaded = load_exported(tmp_path / "export")
    assert loaded.record["source"]["step"] == 4 and loaded.record["source"]["world_size"] == 2
    result = evaluate(loaded, load_validation(loaded))
    assert result.loss_topk == pytest.approx(_metrics(run)[-1]["eval/loss_topk"], rel=1e-5)

    # checkpoints_tools validate names the damage; the export takes step 2 instead.
    shard = max((run / "checkpoints" / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])
    check = subprocess.run(
        [sys.executable, "-m", "checkpoints_tools", "validate", str(shard.parent)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert check.returncode != 0 and "truncated" in check.stdout + check.stderr, check.stdout + check.stderr
    proc = run_modmoe(["export", str(run), "--out", str(tmp_path / "export2")])
    assert "exported step 2" in proc.stdout and "skipping invalid checkpoint" in proc.stderr, proc.stdout + proc.stderr
    # Megatron's tensor names and shards are not the native ones: consolidate points at export.
    merged = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoints_tools",
            "consolidate",
            str(run / "checkpoints" / "step_00000002"),
            "--out",
            str(tmp_path / "m.safetensors"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert merged.returncode != 0 and "modmoe export" in merged.stderr, merged.stdout + merged.stderr


if __name__ == "__main__":
    _sp_worker(Path(sys.argv[1]), sys.argv[2])


def test_modmoe_train_dispatches_to_the_megatron_engine(small_data_dir, tmp_path):
    """``engine: megatron`` in the job config makes ``modmoe train`` run the Megatron trainer
    (one CPU rank through the local-layer path, every Megatron setting and gradient clipping at
    their defaults: the engine names what it runs instead of the CUDA-only parts); a second run
    resumes its checkpoint."""
    from runs import read_metrics, run_modmoe, small_overrides

    overrides = small_overrides(
        small_data_dir,
        tmp_path,
        **{
            "engine": "megatron",
            "model.moe.score": "sigmoid",
            "model.moe.aux_loss_coef": 0.0,
            "trainer.max_steps": 4,
            "trainer.device": "cpu",
            "logging.mlflow.enabled": False,
            "checkpoint.interval_steps": 2,
        },
    )
    args = ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])]
    proc = run_modmoe(args)
    assert "on CPU: replicated optimizer (the distributed one is CUDA-only)" in proc.stdout + proc.stderr
    assert "alltoall dispatcher" in proc.stdout + proc.stderr
    assert (tmp_path / "COMPLETED").exists()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)
    assert all(r["grad_norm"] > 0 for r in records)  # clipping at 1.0 computed Megatron's norm
    # Throughput and memory as the native trainer reports them (no MFU on CPU: no peak to divide by).
    for r in records:
        assert r["executed_tflops_per_s_per_device"] > 0 and 0.05 < r["memory/cpu_rss_gib"] < 16 and "mfu" not in r
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"])  # one rank
    # The Megatron trainer wrote it: dist_checkpointing steps (Megatron's metadata.json) sealed
    # by a manifest of layout megatron, not the native engine's DCP steps.
    steps = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000002", "step_00000004"]
    for p in steps:
        assert (p / "metadata.json").is_file() and json.loads((p / "manifest.json").read_text())["layout"] == "megatron"
    (tmp_path / "COMPLETED").unlink()
    # The native engine refuses the Megatron checkpoint in one line rather than misreading it
    native_again = ["--set", "engine=native"]
    native = subprocess.run(
        [sys.executable, "-m", "modmoe", *args, *native_again, "--set", "trainer.max_steps=6"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert native.returncode != 0 and "resume it with engine: megatron" in native.stderr, (
        native.stdout + native.stderr[-3000:]
    )
    assert "Traceback" not in native.stderr, native.stderr[-3000:]
    resumed = run_modmoe([*args, "--set", "trainer.max_steps=6"])
    assert "resumed" in (resumed.stdout + resumed.stderr) and "at step 4" in (resumed.stdout + resumed.stderr)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
