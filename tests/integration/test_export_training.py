"""The exported model trains in the Hugging Face world: with plain transformers, PEFT LoRA, TRL's
SFTTrainer and activation checkpointing, where modmoe is not importable too; and its edges
(empty prompt, generation up to the context, routing tensors kept in float32)."""

import subprocess
import sys
import warnings

import pytest
import torch
from runs import small_overrides

from modmoe.config import load_config
from modmoe.export import export_checkpoint
from modmoe.train.loop import Trainer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(small_data_dir, tmp_path_factory):
    """6 training steps of the small MoDE model (predictor on): (run dir, training model)."""
    run_dir = tmp_path_factory.mktemp("export-train-run")
    cfg = load_config(
        None,
        small_overrides(small_data_dir, run_dir, **{"trainer.max_steps": 6, "logging.mlflow.enabled": False}),
    )
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.train()
    return run_dir, trainer.backend.core.eval()


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports-train") / "fp32"
    export_checkpoint(run[0], out, dtype="fp32")
    return out


def load(exported, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, **kwargs)


def fixed_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 500, (4, 48), generator=torch.Generator().manual_seed(seed))


def shifted(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)


def test_train_mode_routes_top_k_and_returns_modmoe_training_loss(run, exported):
    """train() with labels computes what modmoe's training step computes: the language-model loss
    plus the auxiliary losses with the run's coefficients, under top-k routing."""
    _, native = run
    model = load(exported).train()
    ids = fixed_batch()
    out = model(input_ids=ids, labels=ids)
    native.train()
    try:
        ref = native(ids, shifted(ids), routing="topk")
    finally:
        native.eval()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss + ref.aux_total, rtol=1e-5, atol=1e-6)
    model.config.include_aux_losses = False
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_fine_tuning_with_plain_transformers_lowers_the_loss_and_reaches_every_parameter(exported):
    model = load(exported).train()
    ids = fixed_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=ids, labels=ids).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # routers, predictor, gates, every expert, norms, embeddings
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.step()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    for name in ("layers.1.router.proj.weight", "layers.0.mlp.experts.w1", "layers.0.mlp.gate.weight"):
        assert not torch.equal(params[name], before[name]), name


def test_right_and_left_padding_train_on_the_real_tokens_only(exported):
    """A padded batch trains like its rows: the loss of a row padded on either side equals its
    loss alone (padding is moved behind the real tokens and never chosen while they compete)."""
    model = load(exported).train()
    model.config.include_aux_losses = False
    ids = fixed_batch(1)[:1, :40]
    alone = model(input_ids=ids, labels=ids).loss
    pad = torch.full((1, 8), 1)
    for side in ("right", "left"):
        padded = torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1)
        mask = torch.cat([torch.ones(1, 40), torch.zeros(1, 8)], 1).long()
        mask = mask if side == "right" else mask.flip(1)
        labels = padded.masked_fill(mask == 0, -100)
        got = model(input_ids=padded, attention_mask=mask, labels=labels).loss
        # k of top-k follows the padded length, so the routed blocks may take one more token.
        torch.testing.assert_close(got, alone, rtol=0.05, atol=0.0)


def test_activation_checkpointing_gives_the_same_gradients(exported):
    ids = fixed_batch(2)
    grads = []
    for checkpointing in (False, True):
        model = load(exported).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.layers[0].__class__.__name__ == "TransformerBlock"
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    model = load(exported).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="must be non-reentrant"):
        model(input_ids=ids, labels=ids)


def test_peft_lora_trains_the_adapters_only(exported):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        load(exported).train(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w1", "w3"])
    )
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = fixed_batch(3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())


def test_trl_sft_trainer_runs_steps(exported, tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    # An in-process DeepSpeed test earlier in the session leaves LOCAL_RANK set (DeepSpeed needs
    # it); accelerate would then start torch.distributed for this plain single process.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    datasets = pytest.importorskip("datasets")
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 4
    model = load(exported)
    before = model.layers[1].router.proj.weight.detach().clone()
    # The predictor is stop-gradient: only its own BCE, an auxiliary loss, can move it. TRL
    # computes the loss from base_model's hidden states, on which the auxiliary losses ride.
    predictor_before = model.layers[1].router.predictor[0].weight.detach().clone()
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=64,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tok
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.layers[1].router.proj.weight, before)
    assert not torch.equal(model.layers[1].router.predictor[0].weight, predictor_before)


def test_empty_prompt_is_refused_before_any_work(exported):
    model = load(exported).eval()
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    with pytest.raises(ValueError, match="empty"):
        model(**tok("", return_tensors="pt"))


def test_generation_up_to_the_context_stops_there_and_keeps_the_tokens(exported):
    model = load(exported).eval()
    context = model.config.max_position_embeddings
    ids = fixed_batch()[:1, :8]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(input_ids=ids, max_new_tokens=context + 20, do_sample=False, eos_token_id=None)
    assert out.shape[1] == context and torch.equal(out[:, :8], ids)
    assert any("past the context" in str(w.message) for w in caught)


def test_bf16_load_keeps_routing_tensors_fp32_and_saves_them_so(run, exported, tmp_path):
    bf16_dir = tmp_path / "bf16"
    export_checkpoint(run[0], bf16_dir, dtype="bf16")
    for dtype in (torch.bfloat16, "auto"):
        model = load(bf16_dir, dtype=dtype)
        state = model.state_dict()
        routing = [n for n in state if "router" in n or n.endswith("gate.weight") or n.endswith("expert_bias")]
        assert routing and all(state[n].dtype == torch.float32 for n in routing)
        assert state["layers.0.attn.wq.weight"].dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "resaved")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("layers.1.router.proj.weight").dtype == torch.float32
        assert f.get_tensor("layers.0.mlp.gate.weight").dtype == torch.float32
    with torch.no_grad():  # and it runs: bf16 trunk, float32 routing
        assert model.eval()(fixed_batch()[:1]).logits.dtype == torch.bfloat16


def test_export_trains_and_generates_where_modmoe_cannot_be_imported(exported):
    script = f"""
import sys
sys.modules["modmoe"] = None  # any import of modmoe now raises ImportError
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
ids = torch.randint(5, 500, (2, 32), generator=torch.Generator().manual_seed(0))
out = m.eval().generate(input_ids=ids[:1, :6], max_new_tokens=5, do_sample=False, eos_token_id=None)
assert out.shape == (1, 11), out.shape
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
losses = []
for _ in range(4):
    opt.zero_grad()
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
print("ok", losses)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
