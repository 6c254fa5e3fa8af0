"""Configuration of the MoDE transformer: trunk, depth routing (MoD) and experts (MoE).

The validated, documented form of the architecture (the ``model`` section of a job config). The
model code never sees it: :meth:`ModelConfig.to_args` converts it into the plain
:class:`~modmoe.model.args.ModelArgs` that ``modmoe.model`` reads, so the model package stays free
of pydantic and of modmoe's config system (the export copies it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from modmoe.config_base import ConfigModel, field_error
from modmoe.model.args import ModelArgs, is_moe, is_routed


class DepthRoutingConfig(ConfigModel):
    """Mixture-of-Depths: per-sequence top-k token routing around whole blocks."""

    enabled: bool = True
    """Route tokens around some blocks. ``false`` gives the MoE-only (or dense) baseline built
    from the same code."""

    variant: Literal["staged", "integrated"] = "staged"
    """``staged``: a depth router picks the top-k tokens that enter the block, whose MLP is
    then the MoE. ``integrated``: no depth router; the MoE router of a routed block also has
    ``noop_experts`` identity experts, so one router decides both (tokens sent to a no-op
    skip the MLP)."""

    capacity: float = Field(default=0.125, gt=0.0, le=1.0)
    """Fraction of each sequence that enters a routed block: k = ceil(capacity * seq_len)."""

    every: int = Field(default=2, ge=1)
    """A block is routed when ``layer_index % every == offset``."""

    offset: int = Field(default=1, ge=0)
    """See ``every``. The default (every=2, offset=1) routes blocks 1, 3, 5, ... and keeps the
    first block full, as in the paper."""

    router_weight: Literal["raw", "sigmoid", "unit"] = "raw"
    """What scales the block output of a chosen token: the raw router logit ``r`` (paper),
    ``sigmoid(r)``, or ``unit``: 1 in value with the gradient of ``sigmoid(r)`` (a pretrained block's
    update is kept exactly; the router still learns which tokens to send)."""

    causal_router: Literal["aux_loss", "predictor", "prefix_rank"] = "prefix_rank"
    """How tokens are routed when future tokens are unknown (generation, causal eval):
    ``aux_loss`` enters when sigmoid(r) > 0.5, taught by ``bce_loss_coef``; ``predictor``
    enters when a small stop-gradient MLP says so; ``prefix_rank`` enters when the token's router
    logit ranks within the top ``capacity`` of its sequence so far (its own included), counted with
    ``prefix_prior_tokens`` virtual tokens from the logit distribution seen in training (no
    parameters; docs/research.md section 2)."""

    bce_loss_coef: float = Field(default=0.01, ge=0.0)
    """Weight of the BCE loss that teaches sigmoid(r) to predict top-k membership."""

    bce_detach_input: bool = False
    """Compute the BCE on the router applied to the detached residual stream, so it trains
    only the router's weight; ``false``: its gradient also reaches the blocks below."""

    predictor: bool = False
    """Train the stop-gradient predictor MLP (required when causal_router = predictor)."""

    predictor_hidden: int = Field(default=64, ge=1)
    """Hidden width of the predictor MLP."""

    prefix_prior_tokens: float = Field(default=32.0, ge=0.0, le=1e6)
    """``prefix_rank`` only: how many tokens' worth of weight the population prior has against the
    sequence's own prefix (a short prefix says little about its sequence's top-k threshold)."""

    noop_experts: int = Field(default=0, ge=0)
    """Integrated variant only: number of identity experts added to each routed block's MoE
    router. With balanced routing, a token slot reaches a real expert with probability
    num_experts / (num_experts + noop_experts)."""

    @model_validator(mode="after")
    def _check(self) -> DepthRoutingConfig:
        if self.offset >= self.every:
            raise field_error("model.depth.offset", self.offset, f"must be < every ({self.every})")
        if self.causal_router == "predictor" and not self.predictor:
            raise field_error("model.depth.causal_router", "predictor", "needs model.depth.predictor = true")
        if self.enabled and self.variant == "integrated" and self.noop_experts < 1:
            raise field_error("model.depth.noop_experts", self.noop_experts, "must be >= 1 for the integrated variant")
        return self

    def is_routed(self, layer_index: int) -> bool:
        """Block ``layer_index`` has a depth router (staged or integrated)."""
        return is_routed(layer_index, self.enabled, self.every, self.offset)


class MoEConfig(ConfigModel):
    """Sparse Mixture-of-Experts MLP."""

    enabled: bool = True
    """Use experts in the MLP of the blocks chosen by ``every``/``first_dense``; ``false`` gives
    a dense SwiGLU everywhere."""

    num_experts: int = Field(default=8, ge=1)
    """Routed experts per MoE layer (E)."""

    top_k: int = Field(default=2, ge=1)
    """Experts each token is sent to (token choice)."""

    expert_hidden: int = Field(default=256, ge=1)
    """Hidden width of one expert's SwiGLU."""

    num_shared_experts: int = Field(default=0, ge=0)
    """Always-on experts (one SwiGLU of width num_shared_experts * expert_hidden, unless
    shared_expert_hidden says otherwise)."""

    shared_expert_hidden: int | None = Field(default=None, ge=1)
    """Hidden width of the shared experts' SwiGLU (null = num_shared_experts * expert_hidden)."""

    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(w . x) (Qwen2-MoE's shared expert gate)."""

    score: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function over expert logits."""

    normalize_top_k: bool = True
    """Renormalize the chosen experts' scores to sum to 1 (always done for sigmoid scores)."""

    capacity_factor: float | None = Field(default=None, gt=0.0)
    """``null``: dropless. Otherwise each expert takes at most
    ceil(capacity_factor * tokens * top_k / num_experts) token slots, in token order; the rest
    are dropped (they keep only the residual and shared-expert output)."""

    aux_loss_coef: float = Field(default=0.01, ge=0.0)
    """Switch/GShard load-balancing loss over the batch: E * sum_e f_e * P_e."""

    seq_aux_loss_coef: float = Field(default=0.0, ge=0.0)
    """The same balance loss computed per sequence and averaged (DeepSeek-V3 style)."""

    z_loss_coef: float = Field(default=0.001, ge=0.0)
    """Router z-loss: mean(logsumexp(logits)^2)."""

    bias_update_rate: float = Field(default=0.0, ge=0.0)
    """Auxiliary-loss-free balancing: each step, every expert's selection bias moves by this
    rate toward balance (sign of the load error). 0 disables the bias."""

    every: int = Field(default=1, ge=1)
    """Blocks with index >= first_dense and (index - first_dense) % every == 0 use experts."""

    first_dense: int = Field(default=0, ge=0)
    """Number of leading blocks kept dense."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise field_error("model.moe.top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        return self

    def is_moe(self, layer_index: int) -> bool:
        return is_moe(layer_index, self.enabled, self.every, self.first_dense)


class RopeScalingConfig(ConfigModel):
    """How a pretrained model stretches RoPE beyond its original context."""

    rope_type: Literal["llama3", "linear"]
    """``llama3``: Llama-3.1's frequency-dependent scaling; ``linear``: every frequency / factor."""

    factor: float = Field(gt=0.0)
    """How much longer than the original context the model reads."""

    low_freq_factor: float = Field(default=1.0, gt=0.0)
    """llama3: wavelengths above original / low_freq_factor are slowed by ``factor``."""

    high_freq_factor: float = Field(default=4.0, gt=0.0)
    """llama3: wavelengths below original / high_freq_factor keep their speed."""

    original_max_position_embeddings: int = Field(default=8192, ge=1)
    """The context the model was pretrained with before scaling."""

    @model_validator(mode="after")
    def _check(self) -> RopeScalingConfig:
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise field_error(
                "model.rope_scaling.high_freq_factor",
                self.high_freq_factor,
                f"must be > low_freq_factor ({self.low_freq_factor})",
            )
        return self


MAX_LAYERS = 4096
HFArchitecture = Literal[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
]


class ModelConfig(ConfigModel):
    """Decoder-only transformer trunk (RMSNorm, RoPE, grouped-query attention, SwiGLU)."""

    from_hf: str | None = None
    """A transformers model directory (``config.json`` + safetensors weights) to start from: every
    architecture field not set here is read from its ``config.json``, depth routing is off and
    experts are as in the checkpoint unless set here, and the weights are loaded at step 0
    (docs/pretrained.md). null = random initialisation."""

    hf_architecture: HFArchitecture | None = None
    """The stock transformers architecture this model is (``LlamaForCausalLM``, ...): filled from
    ``model.from_hf``'s ``config.json``; ``modmoe export --standard`` writes it. null: modmoe's own
    (the export then picks Llama, Mixtral or Qwen3-MoE by the model's features)."""

    vocab_size: int = Field(default=4096, ge=2)
    """Embedding rows; must be >= the tokenizer's vocabulary (the trainer checks)."""

    dim: int = Field(default=256, ge=8)
    """Hidden size D."""

    num_layers: int = Field(default=6, ge=1, le=MAX_LAYERS)
    """Transformer blocks (at most 4096: the deepest published models have ~130; the bound keeps
    per-layer loops, such as the parameter count, short for any config)."""

    num_heads: int = Field(default=8, ge=1)
    """Query heads."""

    num_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads for grouped-query attention (null = num_heads)."""

    ffn_hidden: int = Field(default=688, ge=1)
    """Hidden width of the dense SwiGLU (blocks without experts)."""

    head_dim: int | None = Field(default=None, ge=2)
    """Width of one attention head (null = dim / num_heads; pretrained models such as Qwen3 set
    it apart from dim)."""

    max_seq_len: int = Field(default=1024, ge=8)
    """Longest sequence the model takes (positions 0 .. max_seq_len - 1)."""

    rope_theta: float = Field(default=10000.0, gt=0.0)
    """RoPE base frequency."""

    rope_scaling: RopeScalingConfig | None = None
    """RoPE frequency scaling of a long-context pretrained model (null = none)."""

    attention_bias: Literal["none", "qkv", "all"] = "none"
    """Biases of the attention projections: ``qkv`` on the query, key and value projections
    (Qwen2), ``all`` on the output projection too (Llama's attention_bias)."""

    qk_norm: Literal["none", "head", "full"] = "none"
    """RMSNorm of queries and keys before RoPE: ``head`` per head (Qwen3), ``full`` over the
    whole projection (OLMoE)."""

    norm_eps: float = Field(default=1e-5, gt=0.0)
    """RMSNorm epsilon."""

    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""

    init_std: float = Field(default=0.02, gt=0.0)
    """Std of the normal init; residual output projections are scaled by 1/sqrt(2*num_layers)."""

    depth: DepthRoutingConfig = DepthRoutingConfig()
    """Mixture-of-Depths routing."""

    moe: MoEConfig = MoEConfig()
    """Experts."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise field_error("model.num_heads", self.num_heads, f"must divide dim ({self.dim})")
            if (self.dim // self.num_heads) % 2:
                raise field_error("model.num_heads", self.num_heads, "dim / num_heads must be even (RoPE)")
        elif self.head_dim % 2:
            raise field_error("model.head_dim", self.head_dim, "must be even (RoPE rotates pairs of channels)")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise field_error("model.num_kv_heads", kv, f"must divide num_heads ({self.num_heads})")
        integrated = self.depth.enabled and self.depth.variant == "integrated"
        if integrated and not any(self.depth.is_routed(i) and self.moe.is_moe(i) for i in range(self.num_layers)):
            raise field_error(
                "model.depth.variant", "integrated", "needs routed blocks that also use experts (model.moe)"
            )
        return self

    def to_args(self) -> ModelArgs:
        """The plain architecture record the model code reads (sizes resolved)."""
        return ModelArgs.from_dict(self.model_dump(mode="json"))
