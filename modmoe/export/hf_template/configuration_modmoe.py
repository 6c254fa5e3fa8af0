"""transformers configuration of an exported modmoe MoDE model (loaded with trust_remote_code).

Written by ``modmoe export`` next to the weights; it needs transformers and torch, not modmoe.
The architecture lives in ``modmoe["model"]``, the training config's ``model`` section as it
was; the usual transformers attributes (hidden_size, ...) are derived from it for tools that
read them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class ModMoEConfig(PretrainedConfig):
    model_type = "modmoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    modmoe: dict[str, Any] | None = None
    """Export record: ``model`` (architecture), ``source`` (checkpoint), ``data`` (validation data)."""
    routing: str = "causal"
    """``causal``: each token decides alone per routed block (KV cache works). ``topk``: the
    training routing over whole sequences (no cache: pass use_cache=False)."""
    causal_router: str | None = None
    """``aux_loss`` (sigmoid(r) > 0.5) or ``predictor``; None = what the model was trained for."""
    include_aux_losses: bool = True
    """Training with labels: the loss is the language-model loss plus the auxiliary losses weighted
    as the run trained them (expert balance, z-loss, router BCE, predictor BCE); False: the
    language-model loss alone (the output's ``aux_loss`` holds the weighted sum either way)."""
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        model = (self.modmoe or {}).get("model") or {}
        if model:
            self.vocab_size = model["vocab_size"]
            self.hidden_size = model["dim"]
            self.num_hidden_layers = model["num_layers"]
            self.num_attention_heads = model["num_heads"]
            self.num_key_value_heads = model.get("num_kv_heads") or model["num_heads"]
            self.head_dim = model.get("head_dim") or model["dim"] // model["num_heads"]
            self.max_position_embeddings = model["max_seq_len"]
        # Output and input embeddings are separate tensors in the export, even when training tied them.
        self.tie_word_embeddings = False
        super().__post_init__(**kwargs)
