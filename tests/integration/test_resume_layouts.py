"""Resuming through ``modmoe train``: exactly under the same layout, and across layouts.

Exact resume. A straight run of 6 steps saves at step 3; its step-3 checkpoint is copied into a
fresh run directory and ``--resume auto`` trains steps 4-6 there. That is what a run stopped
at step 3 would resume from (the stop path itself is exercised by the Slurm tests). Every
loss and grad norm of steps 4-6 and every final parameter must be bit-identical: on CPU in
fp32 with deterministic settings the only way to differ is state that was not restored
(weights, Adam moments and step counts, LR position, sampler position, RNG, expert bias).

Resharding. A checkpoint saved under one layout resumes under another (world size, EP, TP,
DDP/FSDP2/DeepSpeed, ZeRO stage); the resumed steps must continue the source run within the
tolerance of two layouts computing the same step (float sums in another order: 1e-5
relative, see test_parallel_layouts.py), and experts keep their global identity.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from runs import read_metrics, run_modmoe, small_overrides
from safetensors.torch import load_file

from checkpoints_tools.consolidate import consolidate

pytestmark = pytest.mark.multirank
STEPS, SAVE_AT = 6, 3
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
# DeepSpeed with EP clips dense and expert gradients separately (docs/parallelism.md), so runs
# compared with it across layouts train without clipping.
NOCLIP = ["optimizer.grad_clip=null"]

LAYOUTS = {
    # name: (ranks, micro-batch per rank, overrides); the global batch is 8 sequences in all.
    "one": (1, 8, []),
    "one_noclip": (1, 8, NOCLIP),
    "one_micro4": (1, 4, []),  # two accumulated micro-batches, as tensor parallelism with dp = 1 runs
    "ep2_ddp": (2, 4, ["parallel.ep=2"]),
    "ep2_fsdp2": (2, 4, ["parallel.ep=2", "parallel.dp_backend=fsdp2"]),
    "ddp2": (2, 4, []),
    "fsdp2_dp2": (2, 4, ["parallel.dp_backend=fsdp2"]),
    "tp2": (2, 4, ["parallel.tp=2"]),
    "ep2_zero2": (2, 4, ["parallel.ep=2", "parallel.dp_backend=deepspeed", "parallel.zero_stage=2", *NOCLIP]),
    "zero3": (2, 4, ["parallel.dp_backend=deepspeed", "parallel.zero_stage=3", *NOCLIP]),
    "ep2_zero1": (2, 4, ["parallel.ep=2", "parallel.dp_backend=deepspeed", "parallel.zero_stage=1", *NOCLIP]),
}


def _args(data_dir: str, run_dir: Path, layout: str) -> tuple[int, list[str]]:
    nproc, micro, extra = LAYOUTS[layout]
    overrides = (
        small_overrides(
            data_dir,
            run_dir,
            **{
                "trainer.max_steps": STEPS,
                "trainer.micro_batch_size": micro,
                "logging.mlflow.enabled": False,
                "checkpoint.interval_steps": SAVE_AT,
            },
        )
        + extra
    )
    return nproc, ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])]


def train(data_dir: str, run_dir: Path, layout: str, resume_from: Path | None = None) -> Path:
    """Runs ``layout`` to step 6; with ``resume_from``, a copy of that checkpoint is the run
    directory's only one and ``--resume auto`` (the default) must pick it up."""
    if resume_from is not None:
        shutil.copytree(resume_from, run_dir / "checkpoints" / resume_from.name)
    nproc, args = _args(data_dir, run_dir, layout)
    proc = run_modmoe(args, nproc=nproc)
    assert (run_dir / "COMPLETED").exists(), proc.stdout[-2000:]
    if resume_from is not None:
        assert (
            f"resumed from {run_dir / 'checkpoints' / resume_from.name} at step {SAVE_AT}" in proc.stdout + proc.stderr
        )
    return run_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = run_dir / "consolidated.safetensors"
    if not out.exists():
        consolidate(run_dir / "checkpoints" / f"step_{STEPS:08d}", out)
    return load_file(out)


@pytest.fixture(scope="module")
def straight(small_data_dir, tmp_path_factory):
    """Uninterrupted 6-step runs per layout, made on first use and shared by the tests."""
    root, runs = tmp_path_factory.mktemp("straight"), {}

    def get(layout: str) -> Path:
        if layout not in runs:
            runs[layout] = train(small_data_dir, root / layout, layout)
        return runs[layout]

    return get


def checkpoint_at(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / f"step_{SAVE_AT:08d}"
    assert (path / "manifest.json").is_file(), path
    return path


# ---------------------------------------------------------------------------------- exact
EXACT = ["ep2_ddp", pytest.param("ep2_zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)]


@pytest.mark.parametrize("layout", EXACT)
def test_resume_is_bit_identical(layout, straight, small_data_dir, tmp_path):
    source = straight(layout)
    resumed = train(small_data_dir, tmp_path / "resumed", layout, resume_from=checkpoint_at(source))
    a, b = read_metrics(source), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(SAVE_AT + 1, STEPS + 1))
    for x, y in zip(a[SAVE_AT:], b):
        for key in ("loss", "grad_norm", "aux_loss_total", "lr"):
            assert y[key] == x[key], (x["step"], key, x[key], y[key])
    wa, wb = final_weights(source), final_weights(resumed)
    assert wa.keys() == wb.keys()
    unequal = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not unequal, f"parameters differ after resume: {unequal[:5]}"


# ---------------------------------------------------------------------------------- reshard
RESHARD = [
    ("ep2_ddp", "one"),  # 2 ranks with EP=2 -> 1 rank
    ("one", "ep2_fsdp2"),  # 1 rank -> 2 ranks with EP=2 on FSDP2
    ("fsdp2_dp2", "ddp2"),  # FSDP2 -> DDP at the same world size
    ("tp2", "one_micro4"),  # tensor parallel -> 1 rank (the aux loss sees each micro-batch alike)
    pytest.param("ep2_zero2", "one_noclip", marks=needs_deepspeed),  # DeepSpeed -> native
    pytest.param("one_noclip", "zero3", marks=needs_deepspeed),  # native -> DeepSpeed ZeRO-3
    pytest.param("ep2_zero1", "ep2_zero2", marks=needs_deepspeed),  # ZeRO stage change
]


@pytest.mark.parametrize(("source_layout", "target_layout"), RESHARD)
def test_resume_under_another_layout_continues_the_run(
    source_layout, target_layout, straight, small_data_dir, tmp_path
):
    source = straight(source_layout)
    resumed = train(small_data_dir, tmp_path / "resumed", target_layout, resume_from=checkpoint_at(source))
    a, b = read_metrics(source), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(SAVE_AT + 1, STEPS + 1))
    for x, y in zip(a[SAVE_AT:], b):
        assert y["lr"] == x["lr"], x["step"]
        for key in ("loss", "grad_norm", "moe_aux_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    # Experts kept their identity: the resumed run's final experts are the source run's, to the
    # rounding that three steps of reordered sums allow (see test_parallel_layouts.py).
    wa, wb = final_weights(source), final_weights(resumed)
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        assert diff.max() <= 1e-4, (name, float(diff.max()))


def test_resume_into_a_different_model_is_one_line(straight, small_data_dir, tmp_path):
    run_dir = tmp_path / "other"
    shutil.copytree(checkpoint_at(straight("one")), run_dir / "checkpoints" / f"step_{SAVE_AT:08d}")
    _, args = _args(small_data_dir, run_dir, "one")
    with pytest.raises(AssertionError) as failed:
        run_modmoe([*args, "--set", "model.moe.expert_hidden=32"])
    err = str(failed.value)
    assert "model.moe.expert_hidden = 64 in the checkpoint but 32 in the config" in err, err[-2000:]
    assert "Traceback" not in err
