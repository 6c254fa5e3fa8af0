"""Names and small JSON files of an exported directory (no torch work here).

An export is a Hugging Face style directory::

    config.json                      architecture (``modmoe.model``) + auto_map for trust_remote_code
    generation_config.json           eos/pad ids, greedy by default
    model.safetensors                weights, or model-0000i-of-0000n.safetensors shards
    model.safetensors.index.json     (sharded only) tensor -> shard file
    tokenizer.json                   the run's byte-level BPE
    tokenizer_config.json, special_tokens_map.json
    configuration_modmoe.py, modeling_modmoe.py    the transformers classes (trust_remote_code)
    args.py, transformer.py, block.py, ...         modmoe/model's files, copied: the model code itself
    modmoe_export.json               size and sha256 of every file above (modmoe checks sizes on load)
"""

from __future__ import annotations

from typing import Any

EXPORT_FORMAT = "modmoe-export"
EXPORT_VERSION = 2  # 2: the model package's own files replace modmoe_core.py and modmoe_rules.py
READABLE_VERSIONS = (1, 2)  # the weights and the config record are the same in both
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"
RECORD_NAME = "modmoe_export.json"
TEMPLATE_FILES = ("configuration_modmoe.py", "modeling_modmoe.py")  # modmoe/export/hf_template
# modmoe/model's files that the decoder imports (relative imports, torch only), copied verbatim.
MODEL_FILES = (
    "args.py",
    "attention.py",
    "block.py",
    "depth_router.py",
    "grouped_gemm.py",
    "kv_cache.py",
    "layers.py",
    "moe.py",
    "routing.py",
    "trace.py",
    "transformer.py",
)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Small tensors that make discrete routing choices stay float32 in every export dtype.
_FP32_SUFFIXES = ("router.proj.weight", "mlp.gate.weight", "mlp.shared_gate.weight", "expert_bias")
_FP32_PARTS = (".router.predictor.", ".router.prior_")


def keeps_fp32(name: str) -> bool:
    return name.endswith(_FP32_SUFFIXES) or any(p in name for p in _FP32_PARTS)


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def config_json(
    model: dict[str, Any], record: dict[str, Any], dtype: str, eos_id: int, pad_id: int | None
) -> dict[str, Any]:
    """``config.json``: transformers keys plus the ``modmoe`` record (architecture, source
    checkpoint, validation data)."""
    return {
        "architectures": ["ModMoEForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_modmoe.ModMoEConfig",
            "AutoModelForCausalLM": "modeling_modmoe.ModMoEForCausalLM",
        },
        "model_type": "modmoe",
        "dtype": dtype,
        "vocab_size": model["vocab_size"],
        "hidden_size": model["dim"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_heads"],
        "num_key_value_heads": model.get("num_kv_heads") or model["num_heads"],
        "max_position_embeddings": model["max_seq_len"],
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "routing": "causal",
        "causal_router": None,
        "modmoe": {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "model": model, **record},
    }


def generation_config_json(eos_id: int, pad_id: int | None) -> dict[str, Any]:
    """Greedy by default; the length is the caller's (``max_new_tokens``)."""
    return {"eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False}


def tokenizer_config_json(eos: str, pad: str | None, max_len: int) -> dict[str, Any]:
    """For ``AutoTokenizer``: the fast tokenizer over tokenizer.json, padding on the left (what
    batched ``generate`` expects), no BOS added."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": max_len,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
