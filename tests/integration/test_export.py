"""``modmoe export``: DCP checkpoint -> Hugging Face style directory, loaded by transformers
(trust_remote_code) with the training model's logits, and its refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import small_overrides
from safetensors import safe_open

from modmoe.checkpoint.fsutil import sha256_file
from modmoe.config import load_config
from modmoe.export import ExportError, export_checkpoint
from modmoe.inference.export_format import MODEL_FILES
from modmoe.inference.generate import Generator
from modmoe.inference.loading import load_exported
from modmoe.inference.sampling import SamplingConfig
from modmoe.train.loop import Trainer


def hf():
    """transformers (the ``export`` extra): the tests that load with it skip without it."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(small_data_dir, tmp_path_factory):
    """12 steps with checkpoints at 6 and 12 (aux-loss-free bias on): (run dir, training model)."""
    run_dir = tmp_path_factory.mktemp("export-run")
    cfg = load_config(
        None,
        small_overrides(
            small_data_dir,
            run_dir,
            **{
                "trainer.max_steps": 12,
                "checkpoint.interval_steps": 6,
                "logging.mlflow.enabled": False,
                "model.moe.bias_update_rate": 0.01,
            },
        ),
    )
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.train()
    return run_dir, trainer.backend.core.eval()


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """fp32, sharded at 300 kB (the weights are ~1.3 MB), so the index path is exercised."""
    out = tmp_path_factory.mktemp("exports") / "fp32"
    export_checkpoint(run[0], out, dtype="fp32", max_shard_bytes=300_000)
    return out


@pytest.fixture(scope="module")
def hf_model(exported):
    return hf().AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def test_export_layout_weights_and_record(run, exported):
    run_dir, model = run
    names = sorted(p.name for p in exported.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modeling_modmoe.py",
        "configuration_modmoe.py",
        "modmoe_export.json",
        *MODEL_FILES,
    ):
        assert required in names, required
    model_dir = Path(__file__).resolve().parents[2] / "modmoe" / "model"
    for name in MODEL_FILES:  # the model code itself, not a second implementation of it
        assert (exported / name).read_bytes() == (model_dir / name).read_bytes(), name
    weights = read_weights(exported)
    trained = model.state_dict()
    assert sorted(weights) == sorted(trained)  # model only: no optimizer, scheduler or RNG state
    for key, value in trained.items():
        assert torch.equal(weights[key], value), key
    # Experts stacked with global identity; the expert bias (it steers routing) is kept.
    assert weights["layers.1.mlp.experts.w1"].shape == (4, 64, 64)
    assert weights["layers.1.mlp.experts.w2"].shape == (4, 64, 64)
    assert weights["layers.0.mlp.expert_bias"].abs().sum() > 0
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_modmoe.ModMoEForCausalLM"
    assert cfg["modmoe"]["model"]["depth"]["capacity"] == 0.25
    assert cfg["modmoe"]["source"]["step"] == 12  # the newest checkpoint of the run
    assert (exported / "tokenizer.json").read_bytes() == (
        Path(cfg["modmoe"]["data"]["prepared_dir"]) / "tokenizer.json"
    ).read_bytes()
    record = json.loads((exported / "modmoe_export.json").read_text())["files"]
    assert record[shards[0]]["sha256"] == sha256_file(exported / shards[0])
    gen_cfg = json.loads((exported / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == 0 and gen_cfg["pad_token_id"] == 1


def test_transformers_logits_equal_the_training_model(run, exported, hf_model):
    _, model = run
    tokens = torch.randint(0, 500, (2, 48))
    with torch.no_grad():
        causal = hf_model(tokens, use_cache=False).logits
        torch.testing.assert_close(causal, model(tokens, routing="causal").logits, rtol=1e-5, atol=1e-5)
        topk_model = hf().AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, routing="topk")
        torch.testing.assert_close(
            topk_model(tokens, use_cache=False).logits, model(tokens, routing="topk").logits, rtol=1e-5, atol=1e-5
        )
        with pytest.raises(ValueError, match="cannot use a KV cache"):
            topk_model(tokens, use_cache=True)


def test_export_runs_where_modmoe_cannot_be_imported(run, exported):
    """The exported code (the modeling file and the model package's files) is self-contained:
    transformers loads it in a process where ``import modmoe`` fails, and its logits are the
    training model's."""
    _, model = run
    tokens = torch.randint(0, 500, (2, 48))
    with torch.no_grad():
        expected = model(tokens, routing="causal").logits
    script = f"""
import sys
sys.modules["modmoe"] = None  # any import of modmoe now raises ImportError
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
package = type(m).__module__.rsplit(".", 1)[0]
assert type(m.layers[0]).__module__ == package + ".block", type(m.layers[0]).__module__
torch.save(m(torch.tensor({tokens.tolist()}), use_cache=False).logits, sys.argv[1])
"""
    out = exported.parent / "no-modmoe-logits.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(out, weights_only=True), expected, rtol=1e-5, atol=1e-5)


def test_bf16_export_is_close_and_keeps_routing_tensors_fp32(run, tmp_path):
    _, model = run
    out = tmp_path / "bf16"
    summary = export_checkpoint(run[0], out, dtype="bf16")
    assert (
        summary.shards == 1
        and (out / "model.safetensors").is_file()
        and not (out / "model.safetensors.index.json").exists()
    )
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("layers.0.attn.wq.weight").dtype == torch.bfloat16
        for key in (
            "layers.1.router.proj.weight",
            "layers.1.router.predictor.0.weight",
            "layers.0.mlp.gate.weight",
            "layers.0.mlp.expert_bias",
        ):
            assert f.get_tensor(key).dtype == torch.float32, key
    model_bf16 = hf().AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, routing="topk")
    tokens = torch.randint(0, 500, (2, 48))
    with torch.no_grad():
        ref = model(tokens, routing="topk").logits
        got = model_bf16(tokens, use_cache=False).logits.float()
    assert model_bf16.dtype == torch.bfloat16
    assert (got - ref).abs().mean() < 0.05 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_transformers_generate_matches_the_runtime(exported, hf_model):
    tok = hf().AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    gen = Generator(load_exported(exported))
    prompts = ["def main(args):\n    ", "import os"]
    expected = gen.generate_ids([gen.encode(p) for p in prompts], SamplingConfig(max_new_tokens=16, stop_at_eos=False))
    for prompt, want in zip(prompts, expected):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = hf_model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
        assert out[0, ids.shape[1] :].tolist() == want
    # A left-padded batch (what the tokenizer makes) generates what each prompt does alone.
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the shorter prompt is padded on the left
    out = hf_model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert [row[batch.input_ids.shape[1] :].tolist() for row in out] == expected


def test_export_picks_the_newest_valid_checkpoint_and_refuses_damage(run, tmp_path):
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = copy / "checkpoints" / "step_00000012"
    with open(newest / ".metadata", "ab") as f:  # DCP's index is a pickle: it must not be read now
        f.write(b"\0")
    summary = export_checkpoint(copy, tmp_path / "older")
    assert summary.step == 6
    with pytest.raises(
        ExportError, match=r"refusing to export .*step_00000012: file '.metadata' has \d+ bytes, manifest says"
    ):
        export_checkpoint(newest, tmp_path / "damaged")
    assert not (tmp_path / "damaged").exists()


def test_export_refuses_bad_input_with_one_line(run, exported, tmp_path):
    run_dir, _ = run
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither a checkpoint .* nor a run directory"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(ExportError, match="--out .*: exists; choose a new directory or pass --overwrite"):
        export_checkpoint(run_dir, exported)
    with pytest.raises(ExportError, match="--dtype 'int8': allowed fp32, bf16, fp16"):
        export_checkpoint(run_dir, tmp_path / "o3", dtype="int8")
    # A config that does not match the weights (the manifest's meta edited by hand).
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpt = copy / "checkpoints" / "step_00000012"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["meta"]["config"]["model"]["moe"]["expert_hidden"] = 32
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ExportError,
        match=r"tensor 'layers.0.mlp.experts.w1' has shape \[4, 64, 64\], config.model implies \[4, 64, 32\]",
    ):
        export_checkpoint(ckpt, tmp_path / "o4")
    manifest["meta"]["config"]["model"]["moe"]["top_k"] = 9
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"config error: model.moe.top_k = 9: must be <= num_experts \(4\)"):
        export_checkpoint(ckpt, tmp_path / "o5")
    with pytest.raises(ExportError, match="tokenizer file .*missing.json: not found"):
        export_checkpoint(run_dir, tmp_path / "o6", tokenizer=tmp_path / "missing.json")


@pytest.mark.multirank
def test_export_of_an_ep2_run_equals_the_training_weights(small_data_dir, tmp_path):
    """Experts trained as Shard(0) slices over two EP ranks are exported with global identity:
    the transformers model's logits equal a plain model loaded from the consolidated checkpoint."""
    from runs import run_modmoe
    from safetensors.torch import load_file

    from checkpoints_tools.consolidate import consolidate
    from modmoe.model import MoDETransformer

    transformers = hf()
    run_dir = tmp_path / "ep2"
    overrides = small_overrides(
        small_data_dir,
        run_dir,
        **{
            "trainer.max_steps": 4,
            "trainer.micro_batch_size": 4,
            "logging.mlflow.enabled": False,
            "parallel.ep": 2,
            "model.moe.bias_update_rate": 0.01,
        },
    )
    run_modmoe(["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])], nproc=2)
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    consolidate(ckpt, tmp_path / "weights.safetensors")
    cfg = load_config(run_dir / "config.yaml", [])
    model = MoDETransformer(cfg.model).eval()
    model.load_state_dict(load_file(tmp_path / "weights.safetensors"), strict=True)
    out = tmp_path / "export"
    export_checkpoint(run_dir, out, dtype="fp32")
    exported_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = torch.randint(0, 500, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(
            exported_model(tokens, use_cache=False).logits, model(tokens, routing="causal").logits, rtol=1e-5, atol=1e-5
        )
