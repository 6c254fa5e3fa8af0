"""A pretrained transformers checkpoint imported with ``engine: megatron`` (CPU, gloo, fp32).

Tiny random-init models made by transformers from configs here (no download), every weight
perturbed so that a dropped norm or bias shows (tests/support/hf_models.py):

- one rank: Llama (q/k/v and output biases, llama3 RoPE scaling with Megatron's constants,
  MoD-ified at capacity 1.0 and upcycled into half-width experts), Qwen3 (per-head q/k norms,
  head_dim 24 apart from dim / heads, linear RoPE scaling, tied embeddings), Mixtral and Qwen2-MoE
  (gated shared expert, q/k/v biases, a dense first layer, raw top-k weights), MoD-ified at 1.0:
  Megatron's logits are transformers' (fp32: relative error 3-5e-7, tested at 1e-5; the two
  differ only in the order of float operations), its first training loss is transformers' loss of the
  batch, and it takes an optimizer step;
- MoD-ified at capacity 0.5 (tokens skip) and upcycled, Megatron computes what the native engine's
  import computes: the same routers (the native initialisation for the seed), the same logits;
- ``modmoe train`` imports on a fresh start, a resumed run reads only its checkpoint, and the run
  exports back (``--standard``) to a Llama that transformers loads with the checkpoint's logits;
- what Megatron cannot express is refused in one line (OLMoE's q/k norm over the whole
  projection, llama3 RoPE constants other than Megatron's fixed ones);
- torchrun, 2 ranks: PP=2, EP=2 and TP=2 (Qwen2-MoE MoD-ified at 0.5), TP=2 for Llama and Qwen3,
  give the one-rank logits and training loss (the three Qwen2-MoE layouts the same gradient norm);
  each rank reads only its part of the checkpoint (the two pipeline stages read it once between
  them). The launch costs ~17 CPU-seconds over both ranks, so it stays in the main pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
import hf_models  # noqa: E402
import torch  # noqa: E402
from megatron_hf_worker import backend_for, job_config, megatron_logits, train_step  # noqa: E402
from runs import REPO, TEST_PYTHONPATH  # noqa: E402

from modmoe.config_base import ConfigError  # noqa: E402
from modmoe.hf.load import pretrained_model  # noqa: E402
from modmoe.train.resolve import resolve_job  # noqa: E402

REL = 1e-5
LLAMA3_MEGATRON = {  # the constants Megatron-Core 0.16 fixes (the hub's Llama-3.1/3.2 values)
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
CHECKPOINTS = {  # family -> overrides of tests/support/hf_models.py's tiny config
    "llama": {"rope_scaling": LLAMA3_MEGATRON, "num_hidden_layers": 2},
    "qwen3": {"tie_word_embeddings": True, "num_hidden_layers": 2},
    "mixtral": {"num_hidden_layers": 2},
    "qwen2_moe": {"num_hidden_layers": 4},  # layer 0 dense (mlp_only_layers), two stages of 2
}
MOD_FULL = {"depth": {"enabled": True, "capacity": 1.0}}
UPCYCLE = {"moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_hidden": 48}}  # halves of the MLP
ONE_RANK = {  # family -> model overrides: each keeps transformers' logits
    "llama": {**MOD_FULL, **UPCYCLE},
    "qwen3": {},
    "mixtral": {},
    "qwen2_moe": MOD_FULL,
}
MOD_HALF = {"depth": {"enabled": True, "capacity": 0.5}}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The checkpoints, with their tokens and transformers' logits and loss (WORK/<family>.pt)."""
    root = tmp_path_factory.mktemp("megatron-hf")
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(1))
    for family, overrides in CHECKPOINTS.items():
        model = hf_models.build(family, **overrides)
        hf_models.save(model, root / family)
        with torch.no_grad():
            out = model(ids[:, :-1], labels=ids[:, :-1])  # transformers shifts the labels itself
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        angles = torch.outer(torch.arange(32.0), model.model.rotary_emb.inv_freq)  # (T, hd/2) RoPE, as scaled
        reference = {"ids": ids, "logits": out.logits.float(), "loss": float(loss), "angles": angles}
        torch.save(reference, root / f"{family}.pt")
    return root


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", list(ONE_RANK))
def test_one_rank_computes_transformers_logits_and_trains(family, work, tmp_path):
    reference = torch.load(work / f"{family}.pt")
    ids = reference["ids"]
    backend = backend_for(job_config(work / family, tmp_path, ONE_RANK[family]))
    try:
        weights = backend.pretrained_load
        assert weights is not None and "model.from_hf" in backend.describe()
        assert weights.initialised == [n for n in weights.initialised if ".router." in n]  # routers only
        assert rel_err(megatron_logits(backend, ids[:, :-1]), reference["logits"]) <= REL
        # Small random weights hardly see a slowed RoPE frequency: the angle tables are compared too.
        angles = backend.gpt.rotary_pos_emb(32)[:, 0, 0, : reference["angles"].shape[1]]
        torch.testing.assert_close(angles, reference["angles"], rtol=1e-6, atol=1e-6)
        if family in ("llama", "qwen3"):  # llama3 / linear scaling: not plain RoPE's angles
            hd, theta = 2 * angles.shape[1], backend.cfg.model.rope_theta
            plain = torch.outer(torch.arange(32.0), 1.0 / theta ** (torch.arange(0, hd, 2) / hd))
            assert not torch.allclose(angles, plain, atol=1e-3)
        before = {k: v.detach().clone() for k, v in backend.gpt.named_parameters()}
        loss, grad_norm = train_step(backend, ids)
        assert loss == pytest.approx(reference["loss"], rel=REL)  # the first step sees the pretrained model
        assert grad_norm is not None and 0 < grad_norm < float("inf")
        moved = [k for k, v in backend.gpt.named_parameters() if not torch.equal(v, before[k])]
        assert len(moved) == len(before)
    finally:
        backend.close()


def test_mod_ified_and_upcycled_as_on_the_native_engine(work, tmp_path):
    """Capacity 0.5 (half the tokens skip each routed block): Megatron's routers are the native
    engine's, so its logits and loss are the native engine's import's, not transformers'."""
    reference = torch.load(work / "llama.pt")
    ids = reference["ids"]
    cfg = job_config(work / "llama", tmp_path, {**MOD_HALF, **UPCYCLE})
    native = pretrained_model(cfg.model, seed=cfg.trainer.seed).eval()
    with torch.no_grad():
        expected = native(ids[:, :-1], ids[:, 1:])
    assert rel_err(expected.logits, reference["logits"]) > 1e-2  # skipping tokens changes the output
    backend = backend_for(cfg)
    try:
        assert rel_err(megatron_logits(backend, ids[:, :-1]), expected.logits) <= REL
        loss, _ = train_step(backend, ids)
        assert loss == pytest.approx(float(expected.loss), rel=REL)
    finally:
        backend.close()


@pytest.mark.parametrize(
    "family,overrides,words",
    [
        ("olmoe", {}, ["model.qk_norm = 'full'", "per head", "engine: native"]),
        (
            "llama",
            {},  # hf_models' Llama-3 scaling is for an original context of 16 tokens
            ["model.rope_scaling.original_max_position_embeddings = 16", "fixes it at 8192", "engine: native"],
        ),
    ],
    ids=["qk-norm-over-the-projection", "llama3-rope-constants"],
)
def test_what_megatron_cannot_express_is_refused_in_one_line(family, overrides, words, tmp_path):
    directory = hf_models.save(hf_models.build(family, **overrides), tmp_path / family)
    with pytest.raises(ConfigError) as err:
        resolve_job(job_config(directory, tmp_path / "run"), world_size=1, device="cpu")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_modmoe_train_imports_on_a_fresh_start_resumes_from_its_checkpoint_and_exports_back(
    work, tmp_path, monkeypatch
):
    """A fresh start reads the pretrained weights, a resumed run only its checkpoint; the run
    (a learning rate of 1e-10: the weights stay the checkpoint's) exports with ``--standard`` to a
    Llama that transformers loads and that computes the checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    from modmoe.export.standard import export_standard
    from modmoe.train.loop import Trainer

    directory = hf_models.save_tokenizer(work / "llama")

    def config(max_steps: int):
        return job_config(
            directory,
            tmp_path / "run",
            optimizer={"lr": 1e-10},
            data={"max_corpus_bytes": 100_000, "val_fraction": 0.1, "prepared_dir": str(tmp_path / "data")},
            trainer={"max_steps": max_steps, "eval_every": 0, "eval_batches": 1, "progress_bar": False},
            logging={"plots_every_eval": False},
        )

    fresh = Trainer(config(1), log=lambda _: None)
    try:
        assert fresh.backend.pretrained_load is not None and "model.from_hf" in fresh.backend.describe()
        fresh.train()
    finally:
        fresh.close()

    def refuse(*_):
        raise AssertionError("a resumed run read the pretrained weights")

    monkeypatch.setattr("modmoe.engines.megatron.pretrained.pretrained_reader", refuse)
    resumed = Trainer(config(2), log=lambda _: None)
    try:
        assert resumed.step == 1 and resumed.backend.pretrained_load is None
        resumed.train()
    finally:
        resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    export_standard(tmp_path / "run", tmp_path / "export")
    reference = torch.load(work / "llama.pt")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert rel_err(hf_models.logits(exported, reference["ids"][:, :-1]), reference["logits"]) <= REL


# ---------------------------------------------------------------------------- 2 ranks
LAYOUTS = {  # run -> (family, model overrides, sections)
    "qwen2_moe-pp2": ("qwen2_moe", MOD_HALF, {"megatron": {"pp": 2}}),
    "qwen2_moe-ep2": ("qwen2_moe", MOD_HALF, {"parallel": {"ep": 2}, "trainer": {"global_batch_size": 4}}),
    "qwen2_moe-tp2": ("qwen2_moe", MOD_HALF, {"parallel": {"tp": 2}, "megatron": {"sequence_parallel": True}}),
    "llama-tp2": ("llama", {}, {"parallel": {"tp": 2}}),
    "qwen3-tp2": ("qwen3", {}, {"parallel": {"tp": 2}}),
}


def checkpoint_bytes(directory: Path, part: str = "") -> int:
    """Bytes of the checkpoint's tensors whose name holds ``part``."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if part in k)  # noqa: SIM118


@pytest.fixture(scope="module")
def launched(work) -> Path:
    """The one-rank references (the native engine's import, which one Megatron rank computes:
    above), then one torchrun launch over every layout."""
    for family in ("qwen2_moe", "llama", "qwen3"):
        reference = torch.load(work / f"{family}.pt")
        model = MOD_HALF if family == "qwen2_moe" else {}
        cfg = job_config(work / family, work / "unused", model)
        model = pretrained_model(cfg.model, seed=cfg.trainer.seed).eval()
        with torch.no_grad():
            out = model(reference["ids"][:, :-1], reference["ids"][:, 1:])
        torch.save({**reference, "logits": out.logits, "loss": float(out.loss)}, work / f"reference-{family}.pt")
    specs = {name: {"family": f, "model": m, "sections": s} for name, (f, m, s) in LAYOUTS.items()}
    (work / "layouts.json").write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TEST_PYTHONPATH, "PYTHONWARNINGS": "ignore"}
    worker = REPO / "tests" / "support" / "megatron_hf_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker), str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_ranks_give_the_one_rank_logits_and_loss(name, launched):
    family = LAYOUTS[name][0]
    reference = torch.load(launched / f"reference-{family}.pt")
    results = [json.loads((launched / f"{name}-{rank}.json").read_text()) for rank in (0, 1)]
    errors = [r["rel_err"] for r in results if "rel_err" in r]  # the last pipeline stage's logits
    assert errors and max(errors) <= REL, results
    for r in results:
        assert r["loss"] == pytest.approx(reference["loss"], rel=REL), results
    total = checkpoint_bytes(launched / family)
    read = [r["bytes_read"] for r in results]
    if name.endswith("pp2"):
        assert sum(read) == total  # each stage its layers: the checkpoint once between them
    elif name.endswith("ep2"):
        assert sum(read) == 2 * total - checkpoint_bytes(launched / family, ".experts.")  # each expert once
    else:
        assert max(read) < 0.6 * total, (read, total)  # its rows or columns of (almost) every tensor


@pytest.mark.multirank
def test_the_layouts_of_one_model_take_the_same_step(launched):
    """PP=2, EP=2 and TP=2 of the MoD-ified Qwen2-MoE: the same gradient norm (Megatron's, over
    its stages, expert ranks and tensor shards) on every rank."""
    norms = [
        json.loads((launched / f"{name}-{rank}.json").read_text())["grad_norm"]
        for name in LAYOUTS
        if name.startswith("qwen2_moe")
        for rank in (0, 1)
    ]
    assert max(norms) == pytest.approx(min(norms), rel=REL), norms
