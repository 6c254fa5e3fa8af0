"""Every parallel layout trains like one rank holding the whole global batch.

Each layout runs ``modmoe train`` under torchrun over gloo (fp32 on CPU) and is compared with a
single-process run on the same global batch and seed: per-step loss and gradient norm, and the
final parameters (read back from both runs' sharded checkpoints, which also proves that the
checkpoint gathers every rank's shard).

Tolerances. Layouts differ from one rank only in the order of float sums (all-reduce of
per-rank halves, all-to-all reordering rows, tensor-parallel partial sums), ~1e-7 relative per
op: losses agree to 1e-5 relative over 6 steps. Grad norms agree to 1e-4 relative: a step
whose batch holds a near-tie of a discrete choice (two experts of almost equal score) can send a
token's gradient elsewhere when the order of sums changes, while the loss does not move
(measured on the stdlib corpus: step 6 of tp2, grad norms 2e-5 relative apart, losses 4e-8;
consistent with such a tie). Grad norms are compared because Adam is invariant to gradient
scale: a layout that averaged expert gradients over the wrong group would still produce nearly
the same parameters, but its norm would be off by a factor, far outside 1e-4. Parameters: Adam divides by sqrt(v), so an element
whose gradient is almost zero can turn a rounding-level difference into a visible step (up to
lr = 0.01); we require at most 1e-4 absolute difference anywhere and more than 1e-6 on fewer
than 2 % of the elements of any tensor (measured: 0.85 % of one attention projection under
fsdp2_dp2_tp2, after the same step).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from runs import read_metrics, run_modmoe, small_overrides
from safetensors.torch import load_file

from checkpoints_tools.consolidate import consolidate
from modmoe.checkpoint.reader import read_dcp_metadata

pytestmark = pytest.mark.multirank
STEPS = 6
COMMON = {"trainer.max_steps": STEPS, "trainer.global_batch_size": 8, "logging.mlflow.enabled": False}


def train(data_dir: str, run_dir: Path, nproc: int, micro: int, *layout: str) -> Path:
    overrides = small_overrides(data_dir, run_dir, **COMMON, **{"trainer.micro_batch_size": micro}) + list(layout)
    proc = run_modmoe(["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])], nproc=nproc)
    assert (run_dir / "COMPLETED").exists(), proc.stdout[-2000:]
    return run_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    out = run_dir / "consolidated.safetensors"
    if not out.exists():
        consolidate(ckpt, out)
    return load_file(out)


@pytest.fixture(scope="module")
def reference(small_data_dir, tmp_path_factory):
    """One rank, the whole global batch of 8: in one micro-batch, or in two (the split a
    tensor-parallel layout with dp = 1 uses, so accumulation order matches too); and without
    gradient clipping, for DeepSpeed with EP, which clips dense and expert parts separately."""
    root = tmp_path_factory.mktemp("reference")
    refs = {micro: train(small_data_dir, root / f"micro{micro}", 1, micro) for micro in (8, 4)}
    refs["noclip"] = train(small_data_dir, root / "noclip", 1, 8, "optimizer.grad_clip=null")
    return refs


def assert_same_training(ref: Path, run: Path) -> None:
    a, b = read_metrics(ref), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("loss", "moe_aux_loss", "mod_bce_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (x["step"], "grad_norm")
        assert y["mod/entry_fraction"] == x["mod/entry_fraction"]
    wa, wb = final_weights(ref), final_weights(run)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].shape == wb[name].shape, name
        diff = (wa[name] - wb[name]).abs()
        assert diff.max() <= 1e-4, (name, float(diff.max()))
        assert (diff > 1e-6).float().mean() < 0.02, (name, int((diff > 1e-6).sum()))


LAYOUTS = {
    # name: (ranks, micro-batch per rank, reference micro-batch, overrides)
    "ep2_ddp": (2, 4, 8, ["parallel.ep=2"]),
    "ep2_fsdp2": (2, 4, 8, ["parallel.ep=2", "parallel.dp_backend=fsdp2"]),
    "ep2_fsdp2_zero2_ac": (
        2,
        4,
        8,
        [
            "parallel.ep=2",
            "parallel.dp_backend=fsdp2",
            "parallel.zero_stage=2",
            "parallel.activation_checkpointing=all",
        ],
    ),
    "tp2": (2, 4, 4, ["parallel.tp=2"]),
    # FSDP2 x TP on a real 2-D mesh: dp 2 x tp 2 (four ranks on two cores: tiny model, 6 steps).
    "fsdp2_dp2_tp2": (4, 4, 8, ["parallel.tp=2", "parallel.dp_backend=fsdp2"]),
}
DEEPSPEED = {
    f"ep2_deepspeed_zero{stage}": (
        2,
        4,
        "noclip",
        ["parallel.ep=2", "parallel.dp_backend=deepspeed", f"parallel.zero_stage={stage}", "optimizer.grad_clip=null"],
    )
    for stage in (1, 2, 3)
}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.mark.parametrize("name", [*LAYOUTS, *(pytest.param(n, marks=needs_deepspeed) for n in DEEPSPEED)])
def test_layout_matches_one_rank(name, reference, small_data_dir, tmp_path):
    nproc, micro, ref_micro, layout = {**LAYOUTS, **DEEPSPEED}[name]
    run = train(small_data_dir, tmp_path / name, nproc, micro, *layout)
    assert_same_training(reference[ref_micro], run)
    records = read_metrics(run)
    if "parallel.ep=2" in layout:
        # Tokens really crossed ranks: some routed rows went to the other rank's experts.
        assert 0 < records[-1]["ep/a2a_remote_fraction"] < 1 and records[-1]["ep/a2a_forward_mb"] > 0


def test_expert_placement_under_ep2(reference, small_data_dir, tmp_path):
    """Each EP rank held exactly its half of every expert tensor, and gathering the halves
    reproduces the single-rank experts."""
    run = train(small_data_dir, tmp_path / "ep2", 2, 4, "parallel.ep=2")
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    _, md = read_dcp_metadata(ckpt)
    experts = [k for k in md.state_dict_metadata if k.startswith("train.model.") and ".mlp.experts." in k]
    assert experts
    for key in experts:
        chunks = sorted(tuple(c.offsets) for c in md.state_dict_metadata[key].chunks)
        size = md.state_dict_metadata[key].size
        assert [c[0] for c in chunks] == [0, size[0] // 2], key  # two slices of E/2 experts, one per rank
        assert all(tuple(c.sizes)[0] == size[0] // 2 for c in md.state_dict_metadata[key].chunks), key
    ref, got = final_weights(reference[8]), final_weights(run)
    for key in (k for k in ref if ".mlp.experts." in k):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-4)
