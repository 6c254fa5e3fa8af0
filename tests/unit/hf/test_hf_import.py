"""``model.from_hf`` and ``modmoe export --standard`` for the eight supported families, in process.

Each family is a tiny random-init transformers model built from a config here (no download), its
weights perturbed so that a dropped norm or bias shows (tests/support/hf_models.py). Imported, it
gives transformers' logits (fp32, relative error <= 1e-5); MoD-ified at capacity 1.0 and (dense
families) upcycled into copies or slices of the MLP, still; written back with ``--standard``,
transformers loads it without remote code and gives the same logits again.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import hf_models
import pytest
import torch
from safetensors.torch import load_file, save_file

from modmoe.checkpoint import CheckpointManager, TrainState
from modmoe.checkpoint.config import CheckpointConfig
from modmoe.checkpoint.manager import DcpStateIO
from modmoe.config import JobConfig
from modmoe.config_base import ConfigError, validate_config
from modmoe.errors import UserError
from modmoe.export.source import ExportError
from modmoe.export.standard import export_standard
from modmoe.hf.config import pretrained_record
from modmoe.hf.families import MODEL_TYPES, SUPPORTED, describe
from modmoe.hf.load import pretrained_model
from modmoe.model import MoDETransformer
from modmoe.train.resolve import resolve_job

transformers = pytest.importorskip("transformers")

FAMILIES = list(hf_models.FAMILIES)
IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (directory with config.json, safetensors and a tokenizer; transformers' logits)."""
    made: dict[str, tuple[Path, torch.Tensor]] = {}

    def get(family: str) -> tuple[Path, torch.Tensor]:
        if family not in made:
            model = hf_models.build(family)
            directory = hf_models.save(model, tmp_path_factory.mktemp("hf") / family)
            hf_models.save_tokenizer(directory)
            made[family] = (directory, hf_models.logits(model, IDS))
        return made[family]

    return get


def job(directory: Path, **model) -> JobConfig:
    """The job config as ``modmoe train`` validates it (one-line ConfigError for a bad one)."""
    return validate_config(JobConfig, {"model": {"from_hf": str(directory), **model}})


def logits_of(model: MoDETransformer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def save_run_checkpoint(model: MoDETransformer, cfg: JobConfig, directory: Path) -> Path:
    """A committed checkpoint of ``model`` with the manifest a training run writes."""
    manager = CheckpointManager(directory / "checkpoints", CheckpointConfig())
    meta = {"config": cfg.model_dump(mode="json")}
    if cfg.model.from_hf is not None:
        meta["pretrained"] = pretrained_record(cfg.model.from_hf)
    manager.save(1, DcpStateIO({"train": TrainState(model)}), meta)
    manager.close()
    return directory


def load_stock(directory: Path):
    """transformers' own class for the exported directory: no remote code."""
    assert not list(directory.glob("*.py"))
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_the_logits_of_transformers(family, checkpoint):
    directory, reference = checkpoint(family)
    cfg = job(directory)
    assert cfg.model.hf_architecture == transformers.AutoConfig.from_pretrained(directory).architectures[0]
    assert cfg.data.tokenizer == str(directory)  # the checkpoint's tokenizer by default
    assert not cfg.model.depth.enabled
    assert hf_models.rel_err(logits_of(pretrained_model(cfg.model)), reference) <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_mod_ified_at_capacity_one_keeps_the_logits_and_trains_its_routers(family, checkpoint):
    directory, reference = checkpoint(family)
    cfg = job(directory, depth={"enabled": True, "capacity": 1.0})
    assert cfg.model.depth.router_weight == "unit"
    model = pretrained_model(cfg.model)
    routers = [b.router for b in model.layers if b.router is not None]
    assert len(routers) == 1  # blocks 1 of 3 (every 2, offset 1)
    assert hf_models.rel_err(logits_of(model), reference) <= TOLERANCE
    out = model.train()(IDS, IDS)
    out.loss.backward()
    assert routers[0].proj.weight.grad.abs().sum() > 0  # 1 in value, the logit's gradient


@pytest.mark.parametrize("family", hf_models.DENSE)
@pytest.mark.parametrize("expert_hidden", [96, 48, 24], ids=["copies", "halves", "quarters"])
def test_upcycled_keeps_the_dense_logits(family, expert_hidden, checkpoint):
    directory, reference = checkpoint(family)
    slices = 96 // expert_hidden
    moe = {"enabled": True, "num_experts": 2 * slices, "top_k": slices, "expert_hidden": expert_hidden}
    cfg = job(directory, moe=moe)
    model = pretrained_model(cfg.model)
    assert all(block.mlp.experts.w1.shape == (2 * slices, 64, expert_hidden) for block in model.layers)
    assert hf_models.rel_err(logits_of(model), reference) <= TOLERANCE


def test_upcycled_and_mod_ified_together(checkpoint):
    directory, reference = checkpoint("qwen3")
    cfg = job(directory, depth={"enabled": True, "capacity": 1.0, "every": 1, "offset": 0}, moe={"enabled": True})
    assert cfg.model.moe.expert_hidden == cfg.model.ffn_hidden  # copies unless asked for slices
    assert hf_models.rel_err(logits_of(pretrained_model(cfg.model)), reference) <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_export_standard_round_trip(family, checkpoint, tmp_path):
    directory, reference = checkpoint(family)
    cfg = job(directory)
    run = save_run_checkpoint(pretrained_model(cfg.model), cfg, tmp_path / "run")
    out = tmp_path / "out"
    export_standard(run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [cfg.model.hf_architecture]
    assert (out / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    assert hf_models.rel_err(hf_models.logits(load_stock(out), IDS), reference) <= TOLERANCE


@pytest.mark.parametrize("family,architecture", [("mistral", "MixtralForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")])
def test_an_upcycled_model_exports_as_the_moe_family(family, architecture, checkpoint, tmp_path):
    directory, reference = checkpoint(family)
    cfg = job(directory, moe={"enabled": True, "num_experts": 4, "top_k": 2, "expert_hidden": 48})
    run = save_run_checkpoint(pretrained_model(cfg.model), cfg, tmp_path / "run")
    export_standard(run, tmp_path / "out", max_shard_bytes=100_000)  # shards and an index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    stock = load_stock(tmp_path / "out")
    assert type(stock).__name__ == architecture
    assert hf_models.rel_err(hf_models.logits(stock, IDS), reference) <= TOLERANCE


def from_scratch(tmp_path: Path, **model) -> tuple[Path, torch.Tensor]:
    base = dict(vocab_size=320, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=96, max_seq_len=64)
    cfg = validate_config(JobConfig, {"model": {**base, "depth": {"enabled": False}, **model}})
    torch.manual_seed(0)
    net = MoDETransformer(cfg.model.to_args())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_run_checkpoint(net, cfg, tmp_path / "run"), logits_of(net)


@pytest.mark.parametrize(
    "model,architecture",
    [
        ({"moe": {"enabled": False}}, "LlamaForCausalLM"),
        ({"moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}}, "MixtralForCausalLM"),
        ({"qk_norm": "head", "moe": {"num_experts": 4, "expert_hidden": 32, "first_dense": 1}}, "Qwen3MoeForCausalLM"),
    ],
)
def test_a_model_trained_from_scratch_exports_as_llama_mixtral_or_qwen3_moe(model, architecture, tmp_path):
    run, reference = from_scratch(tmp_path, **model)
    tokenizer = hf_models.save_tokenizer(tmp_path / "tok")
    export_standard(run, tmp_path / "out", tokenizer=tokenizer)
    stock = load_stock(tmp_path / "out")
    assert type(stock).__name__ == architecture
    assert hf_models.rel_err(hf_models.logits(stock, IDS), reference) <= TOLERANCE


@pytest.mark.parametrize(
    "model,words",
    [
        ({"depth": {"enabled": True}}, "a MoDE model (depth routing)"),
        ({"depth": {"enabled": True, "variant": "integrated", "noop_experts": 2}}, "a MoDE model"),
        ({"qk_norm": "full", "moe": {"enabled": False}}, "no stock transformers architecture fits"),
        ({"moe": {"score": "sigmoid"}}, "sigmoid scores"),
    ],
)
def test_export_standard_refuses_what_no_stock_architecture_has(model, words, tmp_path):
    run, _ = from_scratch(tmp_path, **model)
    with pytest.raises(ExportError) as err:
        export_standard(run, tmp_path / "out", tokenizer=hf_models.save_tokenizer(tmp_path / "tok"))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_qwen2_upcycled_has_no_stock_architecture(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen2")  # q/k/v biases and experts without a shared expert: no family
    cfg = job(directory, moe={"enabled": True, "num_experts": 2, "top_k": 1})
    run = save_run_checkpoint(pretrained_model(cfg.model), cfg, tmp_path / "run")
    with pytest.raises(ExportError, match="no stock transformers architecture fits"):
        export_standard(run, tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_config_keys_take_the_defaults_of_transformers(family):
    """A hub config.json lists few keys: each missing one must read as transformers' default."""
    architecture = next(a for a, t in MODEL_TYPES.items() if t == family)
    full = transformers.AutoConfig.for_model(family).to_dict()
    full.update(architectures=[architecture])
    ours, theirs = describe({"architectures": [architecture]}, "x"), describe(full, "x")
    assert (ours.model, ours.max_position_embeddings, ours.sliding_window) == (
        theirs.model,
        theirs.max_position_embeddings,
        theirs.sliding_window,
    )


def test_modmoe_flops_sees_the_imported_model(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from modmoe.cli import app

    directory, _ = checkpoint("qwen2_moe")
    (tmp_path / "job.yaml").write_text(f"model: {{from_hf: {directory}}}\ndata: {{seq_len: 32}}\n")
    result = CliRunner().invoke(app, ["flops", str(tmp_path / "job.yaml")])
    assert result.exit_code == 0, result.output
    total = sum(p.numel() for p in pretrained_model(job(directory).model).parameters())
    assert f"parameters: {total:,} total" in result.output


def test_both_rope_spellings_read_the_same():
    legacy = {
        "architectures": ["LlamaForCausalLM"],
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    v5 = {
        "architectures": ["LlamaForCausalLM"],
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert describe(legacy, "x").model == describe(v5, "x").model
    assert describe(legacy, "x").model["rope_scaling"]["rope_type"] == "llama3"


def test_the_fused_expert_layout_of_transformers_5_reads_the_same(checkpoint, tmp_path):
    """transformers 5 holds experts fused in memory (gate_up_proj (E, 2F, D), down_proj (E, D, F));
    a checkpoint saved from that state dict imports like the per-expert one."""
    directory, reference = checkpoint("mixtral")
    model = hf_models.build("mixtral")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_bytes((directory / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(fused / "model.safetensors"))
    cfg = job(fused)
    assert hf_models.rel_err(logits_of(pretrained_model(cfg.model)), reference) <= TOLERANCE


def test_a_sharded_checkpoint_reads_the_same(checkpoint, tmp_path):
    directory, reference = checkpoint("qwen2_moe")
    sharded = tmp_path / "sharded"
    model = hf_models.build("qwen2_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert hf_models.rel_err(logits_of(pretrained_model(job(sharded).model)), reference) <= TOLERANCE
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        pretrained_model(job(sharded).model)
    one_line(err, "'../elsewhere.safetensors', not a .safetensors file here")


# ---------------------------------------------------------------------------------- bad inputs
def copy_checkpoint(directory: Path, to: Path, config: dict | None = None) -> Path:
    to.mkdir(parents=True)
    for p in directory.iterdir():
        (to / p.name).write_bytes(p.read_bytes())
    if config is not None:
        data = json.loads((to / "config.json").read_text())
        data.update(config)
        (to / "config.json").write_text(json.dumps(data))
    return to


def edit_weights(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def resolve(directory: Path, tmp_path: Path, **model):
    cfg = validate_config(
        JobConfig,
        {
            "model": {"from_hf": str(directory), **model},
            "data": {"seq_len": 32},
            "trainer": {"run_dir": str(tmp_path / "run")},
        },
    )
    return resolve_job(cfg, world_size=1, device="cpu")


def one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, text


def test_pickle_only_checkpoint(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ConfigError) as err:
        job(directory)
    one_line(err, "pickle-only checkpoint (pytorch_model.bin)", "safetensors")


def test_code_in_the_directory(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
    (directory / "modeling_custom.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ConfigError) as err:
        job(directory)
    one_line(err, "holds code (modeling_custom.py)")


@pytest.mark.parametrize(
    "change,words",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, ["'GPT2LMHeadModel' is not supported", *SUPPORTED]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, ["RoPE type 'yarn'"]),
        ({"hidden_act": "gelu"}, ["hidden_act = 'gelu' is not supported"]),
        ({"mlp_bias": True}, ["mlp_bias = True is not supported"]),
        ({"auto_map": {"AutoModelForCausalLM": "x.Y"}}, ["auto_map (remote code)"]),
    ],
    ids=["architecture", "rope-type", "activation", "mlp-bias", "remote-code"],
)
def test_unsupported_config(change, words, checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt", change)
    with pytest.raises(ConfigError) as err:
        job(directory)
    one_line(err, *words)


@pytest.mark.parametrize(
    "family,model,words",
    [
        ("llama", {"num_layers": 5}, ["model.num_layers = 5 contradicts", "which gives 3"]),
        ("qwen3", {"head_dim": 16}, ["model.head_dim = 16 contradicts", "which gives 24"]),
        ("mixtral", {"moe": {"enabled": False}}, ["model.moe.enabled = False contradicts", "which gives True"]),
        ("qwen2", {"tie_embeddings": False}, ["model.tie_embeddings = False contradicts"]),
        ("mistral", {"max_seq_len": 64}, ["sliding window of 48 tokens", "model.max_seq_len <= 48"]),
        ("llama", {"moe": {"enabled": True, "expert_hidden": 40}}, ["model.moe.expert_hidden = 40", "divisor"]),
        ("llama", {"moe": {"enabled": True, "expert_hidden": 48, "top_k": 1}}, ["model.moe.top_k = 1", "multiple"]),
        ("llama", {"moe": {"enabled": True, "normalize_top_k": False}}, ["normalize_top_k = False"]),
        (
            "mixtral",
            {"depth": {"enabled": True, "variant": "integrated", "noop_experts": 1}},
            ["variant = 'integrated'"],
        ),
    ],
    ids=["layers", "head-dim", "experts-off", "tied", "sliding-window", "slices", "top-k", "normalize", "integrated"],
)
def test_fields_the_checkpoint_cannot_take(family, model, words, checkpoint):
    with pytest.raises(ConfigError) as err:
        job(checkpoint(family)[0], **model)
    one_line(err, *words)


def test_a_field_that_agrees_is_fine(checkpoint):
    cfg = job(checkpoint("qwen3")[0], head_dim=24, num_layers=3, max_seq_len=32)
    assert (cfg.model.head_dim, cfg.model.max_seq_len) == (24, 32)


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), ["no tensor 'model.layers.1.self_attn.k_proj.bias'"]),
        (
            lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(95, 64)}),
            ["tensor 'model.layers.2.mlp.up_proj.weight' has shape [95, 64]", "implies [96, 64]"],
        ),
    ],
    ids=["missing-tensor", "wrong-shape"],
)
def test_weights_that_do_not_match_the_config(edit, words, checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
    edit_weights(directory, edit)
    with pytest.raises(UserError) as err:
        resolve(directory, tmp_path)
    one_line(err, *words)


def test_a_tokenizer_without_tokenizer_json(checkpoint, tmp_path):
    directory = copy_checkpoint(checkpoint("llama")[0], tmp_path / "ckpt")
    (directory / "tokenizer.json").rename(directory / "tokenizer.model")
    with pytest.raises(ConfigError) as err:
        job(directory)
    one_line(err, "data.tokenizer", "no tokenizer.json")


@pytest.mark.parametrize(
    "extra,words",
    [
        ({}, ["optimizer.routers_only_steps = 5", "no routers"]),
        (
            {"model": {"depth": {"enabled": True}}, "parallel": {"dp_backend": "deepspeed"}},
            ["optimizer.routers_only_steps = 5", "not honoured by the deepspeed backend"],
        ),
    ],
    ids=["no-routers", "deepspeed"],
)
def test_routers_only_steps_needs_routers_and_the_native_backend(extra, words, checkpoint, tmp_path):
    data = {"model": {"from_hf": str(checkpoint("llama")[0])}, "optimizer": {"routers_only_steps": 5}}
    data["model"].update(extra.pop("model", {}))
    data.update(data={"seq_len": 32}, trainer={"run_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError) as err:
        resolve_job(validate_config(JobConfig, {**data, **extra}), world_size=1, device="cpu")
    one_line(err, *words)
