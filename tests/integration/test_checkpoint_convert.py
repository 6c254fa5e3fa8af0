"""``python -m checkpoints_tools convert``: DeepSpeed checkpoints <-> modmoe (DCP) checkpoints.

A real DeepSpeed engine on ``MoDETransformer`` (torch AdamW in two param groups, 2 ranks over
gloo, tests/ds_convert_worker.py) trains 2 steps under ZeRO 0, 1, 2 (also with
``parameter_alignment``) and 3 and calls
``save_checkpoint``; the small model has parameters of odd size (a 1-element bias), so ZeRO
partitions are split and padded. The worker also dumps DeepSpeed's own full view of the state
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), which every converted
tensor must equal bit for bit. The converted checkpoint resumes in ``modmoe train``; its
DeepSpeed universal conversion loads into fresh engines of other ZeRO stages and world sizes,
again bit-exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import REPO, read_metrics, run_modmoe, small_overrides
from safetensors.torch import load_file
from typer.testing import CliRunner

from checkpoints_tools.cli import app
from checkpoints_tools.convert_torchload import load_pt
from modmoe.checkpoint.manifest import read_manifest, validate
from modmoe.checkpoint.reader import load_tensor_groups, model_tensors, read_dcp_metadata
from modmoe.config import dump_config, load_config
from modmoe.train.optim import lr_factor

WORKER = REPO / "tests/support/ds_convert_worker.py"
STAGES = ("0", "1", "2", "3", "2a")  # 2a: ZeRO-2 with parameter_alignment (padding between parameters)
STEPS = 2  # optimizer steps the DeepSpeed runs take before saving

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"),
]


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.output


def convert_ok(*args: str) -> None:
    code, out = cli(*args)
    assert code == 0, out


def convert_fails(*args: str) -> str:
    """The error of a refused conversion: exit 1 and exactly one line."""
    code, out = cli(*args)
    assert code == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def read_dcp(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a modmoe checkpoint, keyed without the ``train.`` prefix."""
    _, md = read_dcp_metadata(step_dir)
    out: dict[str, torch.Tensor] = {}
    for group in load_tensor_groups(step_dir, model_tensors(md, "train."), 1 << 30):
        out.update(group)
    return out


@pytest.fixture(scope="module")
def work(small_data_dir, tmp_path_factory) -> Path:
    """The job's config (the model the DeepSpeed runs train, and what ``modmoe train`` resumes
    with) and the DeepSpeed checkpoints of every ZeRO stage under ``ds/zero<stage>``."""
    root = tmp_path_factory.mktemp("convert")
    overrides = small_overrides(
        small_data_dir,
        root / "run",
        **{
            "trainer.max_steps": STEPS + 1,
            "logging.mlflow.enabled": False,
            "model.moe.bias_update_rate": 0.01,
        },
    )
    dump_config(load_config(REPO / "configs/tiny.yaml", overrides), root / "config.yaml")
    torchrun(2, "save", str(root / "config.yaml"), str(root / "ds"), *STAGES)
    return root


@pytest.fixture(scope="module")
def converted(work) -> dict[str, Path]:
    """``convert --to dcp --config`` of every DeepSpeed checkpoint: stage -> step directory."""
    out = {}
    for stage in STAGES:
        convert_ok(work / "ds" / f"zero{stage}", work / f"dcp{stage}", "--to", "dcp", "--config", work / "config.yaml")
        out[stage] = work / f"dcp{stage}" / f"step_{STEPS:08d}"
    return out


# ------------------------------------------------------------------------------ --to dcp
@pytest.mark.parametrize("stage", STAGES)
def test_to_dcp_equals_deepspeeds_full_state(stage, work, converted):
    step_dir = converted[stage]
    assert validate(step_dir) == []
    manifest = read_manifest(step_dir)
    assert manifest.step == STEPS and manifest.model_prefix == "train.model."
    assert manifest.meta["config"] == load_config(work / "config.yaml").model_dump(mode="json")
    assert "sampler" not in manifest.meta  # a DeepSpeed checkpoint does not know it
    got = read_dcp(step_dir)
    truth = load_file(work / "ds" / f"zero{stage}" / "truth.safetensors")
    params = [k.split("/", 1)[1] for k in truth if k.startswith("fp32/")]
    assert any(truth[f"fp32/{p}"].numel() % 2 for p in params)  # some partition is padded
    if stage == "2a":  # and here parameters are padded apart inside the flat buffers
        optim_file = work / "ds" / "zero2a" / f"global_step{STEPS}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        assert any(any(group) for group in load_pt(optim_file)["optimizer_state_dict"]["param_alignment_paddings"])
    expected = {f"model.{k.split('/', 1)[1]}": v for k, v in truth.items() if k.startswith(("fp32/", "buffer/"))}
    expected |= {
        f"optim.state.{k.split('/', 1)[1]}.{k.split('/')[0]}": v for k, v in truth.items() if k.startswith("exp_avg")
    }
    expected |= {f"optim.state.{p}.step": torch.tensor(float(STEPS)) for p in params}
    expected["lr_scheduler.last_epoch"] = torch.tensor(STEPS)
    assert sorted(got) == sorted(expected)
    unequal = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not unequal, unequal[:5]
    assert truth["adam_steps"].eq(STEPS).all()
    assert any(v.abs().sum() > 0 for k, v in truth.items() if k.endswith("expert_bias"))


def test_tag_directory_and_tag_option_name_the_same_checkpoint(work, converted, tmp_path):
    reference = read_dcp(converted["2"])
    src = work / "ds" / "zero2"
    convert_ok(src / f"global_step{STEPS}", tmp_path / "a", "--to", "dcp")
    convert_ok(src, tmp_path / "b", "--to", "dcp", "--tag", f"global_step{STEPS}")
    for out in (tmp_path / "a", tmp_path / "b"):
        step_dir = out / f"step_{STEPS:08d}"
        assert "config" not in read_manifest(step_dir).meta  # recorded only with --config
        got = read_dcp(step_dir)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert "tag directory 'global_step9' is missing" in convert_fails(
        src, tmp_path / "c", "--to", "dcp", "--tag", "global_step9"
    )


def test_converted_checkpoint_resumes_in_modmoe_train(work, converted):
    """The native engine (1 process) resumes it at the right step and trains on."""
    proc = run_modmoe(["train", str(work / "config.yaml"), "--resume", str(converted["3"])])
    assert f"resumed from {converted['3']} at step {STEPS}" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(work / "run")] == [STEPS + 1]


# ------------------------------------------------------------------------------ --to deepspeed
@pytest.fixture(scope="module")
def universal(work, converted) -> Path:
    out = work / "universal"
    convert_ok(converted["2"], out, "--to", "deepspeed", "--group-mb", "1")
    return out


@pytest.mark.parametrize(("nproc", "stage"), [(2, "3"), (1, "1")])
def test_universal_loads_bit_exact_into_another_zero_stage(nproc, stage, work, universal):
    out = work / f"loaded_{nproc}_{stage}"
    torchrun(nproc, "load", str(work / "config.yaml"), str(universal), str(stage), str(out))
    truth = load_file(work / "ds" / "zero2" / "truth.safetensors")
    loaded = load_file(out / "loaded.safetensors")
    keys = [k for k in truth if k != "adam_steps"]
    assert sorted(keys) == sorted(k for k in loaded if k != "adam_steps")
    unequal = [k for k in keys if not torch.equal(truth[k], loaded[k])]
    assert not unequal, unequal[:5]
    assert loaded["adam_steps"].eq(STEPS).all()
    info = json.loads((out / "info.json").read_text())
    cfg = load_config(work / "config.yaml")
    lr = cfg.optimizer.lr * lr_factor(STEPS, cfg.optimizer, cfg.trainer.max_steps)
    assert info["global_steps"] == STEPS and info["last_epoch"] == STEPS
    assert info["lrs"] == [lr] * len(info["lrs"])
    assert info["global_steps_after_step"] == STEPS + 1
    if stage != "3":  # DeepSpeed's ZeRO-3 universal loader shares one step tensor between groups
        assert info["adam_steps_after_step"] == [STEPS + 1.0] * len(info["adam_steps_after_step"])


def test_universal_layout(universal):
    tag = (universal / "latest_universal").read_text()
    assert tag == f"global_step{STEPS}"
    param = universal / tag / "zero" / "layers.1.router.predictor.2.bias"
    assert sorted(p.name for p in param.iterdir()) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    assert torch.load(param / "fp32.pt", weights_only=True)["param"].shape == (1,)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        states = torch.load(universal / tag / name, weights_only=True)
        buffers = ("expert_bias", "prior_quantiles", "prior_updates")  # the module states hold buffers only
        assert states["global_steps"] == STEPS and all(k.endswith(buffers) for k in states["module"])
    assert not [p for p in universal.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------ refusals
def _copy(work: Path, stage: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"zero{stage}"
    shutil.copytree(work / "ds" / f"zero{stage}", dst)
    return dst


def test_wrong_source_kind_and_busy_destination(work, converted, tmp_path):
    assert "use --to deepspeed" in convert_fails(converted["2"], tmp_path / "a", "--to", "dcp")
    assert "use --to dcp" in convert_fails(work / "ds" / "zero2", tmp_path / "b", "--to", "deepspeed")
    assert "is a directory of checkpoints" in convert_fails(converted["2"].parent, tmp_path / "c", "--to", "deepspeed")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert "exists and is not empty" in convert_fails(work / "ds" / "zero2", busy, "--to", "dcp")
    assert "--config: only used with --to dcp" in convert_fails(
        converted["2"], tmp_path / "d", "--to", "deepspeed", "--config", work / "config.yaml"
    )


def test_missing_files_and_mismatched_partitions(work, tmp_path):
    src = _copy(work, "2", tmp_path)
    tag = src / f"global_step{STEPS}"
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(tmp_path / "rank0.pt")
    assert "optimizer file of data-parallel rank 0 is missing" in convert_fails(src, tmp_path / "a", "--to", "dcp")
    (tmp_path / "rank0.pt").rename(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "field 'partition_count' = [2, 2]: expected 1" in convert_fails(src, tmp_path / "b", "--to", "dcp")

    src3 = _copy(work, "3", tmp_path)
    model_file = src3 / f"global_step{STEPS}" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = torch.load(model_file, weights_only=True)  # model-states files pickle no DeepSpeed class
    states["param_shapes"][0].popitem()  # one parameter fewer than the partitions hold
    torch.save(states, model_file)
    assert "mismatched partitions" in convert_fails(src3, tmp_path / "c", "--to", "dcp")
    model_file.unlink()
    assert f"{model_file}: missing" in convert_fails(src3, tmp_path / "d", "--to", "dcp")


def test_unknown_optimizer_keys_and_unsafe_pickles(work, tmp_path):
    src = _copy(work, "0", tmp_path)
    model_file = src / f"global_step{STEPS}" / "mp_rank_00_model_states.pt"
    states = torch.load(model_file, weights_only=True)
    first = next(iter(states["optimizer"]["state"].values()))
    first["max_exp_avg_sq"] = first["exp_avg_sq"].clone()  # AMSGrad state: not Adam as converted here
    torch.save(states, model_file)
    assert "unknown optimizer state key 'max_exp_avg_sq'" in convert_fails(src, tmp_path / "a", "--to", "dcp")
    states["evil"] = os.system  # pickled by reference: a weights_only=False load would resolve it
    torch.save(states, model_file)
    line = convert_fails(src, tmp_path / "b", "--to", "dcp")
    assert f"{model_file}: pickles the global posix.system, which is not allowed" in line


def test_paths_from_files_stay_inside(work, tmp_path):
    src = _copy(work, "2", tmp_path)
    (src / "latest").write_text("../../outside")
    assert "must be one path component" in convert_fails(src, tmp_path / "a", "--to", "dcp")


def test_config_mismatch_names_the_tensor(work, tmp_path):
    other = load_config(work / "config.yaml", ["model.moe.expert_hidden=32"])
    dump_config(other, tmp_path / "other.yaml")
    line = convert_fails(work / "ds" / "zero2", tmp_path / "a", "--to", "dcp", "--config", tmp_path / "other.yaml")
    assert (
        "tensor 'layers.0.mlp.experts.w1' has shape [4, 64, 64] in the checkpoint, [4, 64, 32] in MoDETransformer"
        in line
    )


def test_corrupted_dcp_source_is_refused(converted, tmp_path):
    src = tmp_path / "step"
    shutil.copytree(converted["2"], src)
    shard = next(src.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "fails its sha256 checksum" in convert_fails(src, tmp_path / "out", "--to", "deepspeed")
