"""Tiny random-init transformers checkpoints of the eight supported families (no download).

Each family's config turns on what sets it apart (Llama-3 RoPE scaling and attention biases,
Mistral's sliding window, Qwen2's q/k/v biases and tied embeddings, Qwen3's head_dim and
per-head q/k norms, Mixtral's experts, Qwen2-MoE's gated shared expert and dense layers,
Qwen3-MoE's normalized top-k, OLMoE's full q/k norms), and every weight is perturbed so that a
dropped norm or bias changes the logits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": dict(
        attention_bias=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(sliding_window=48),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
}
DENSE = ("llama", "mistral", "qwen2", "qwen3")


def build(family: str, seed: int = 0, **overrides):
    """A perturbed random-init transformers model of ``family`` (eval mode, fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # untrained norms are all ones: perturb so a dropped norm shows
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save(model, directory: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, safe_serialization=True)
    return directory


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def save_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE of at most ``vocab_size`` tokens (trained on this file's own text) as the
    ``tokenizer.json`` + ``tokenizer_config.json`` a transformers model directory holds."""
    import json

    from modmoe.data.tokenizer import EOT, train_tokenizer

    tok = train_tokenizer([Path(__file__).read_text(encoding="utf-8")] * 4, vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "model_max_length": 64}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
