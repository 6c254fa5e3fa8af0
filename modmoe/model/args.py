"""The architecture of a MoDE model as plain frozen dataclasses, and the rules that follow from it.

``ModelArgs`` is what every part of the one model definition reads: the training model, the
Megatron translation and layer, generation, evaluation and the export. modmoe's validated config
(``modmoe.model_config.ModelConfig``, pydantic, with a docstring per field) converts into it; an
export rebuilds it from the ``modmoe.model`` record of its ``config.json``. The fields mean what
the config fields of the same name mean; here only resolved values live (``num_kv_heads`` and
``head_dim`` are always numbers).

The rules defined once:
- which blocks are depth-routed and which have experts (``every``/``offset``/``first_dense``);
- how many tokens of a sequence enter a staged routed block: ``ceil(capacity * T)``;
- how many no-op experts an integrated block adds to its router.

This file imports nothing but the standard library: the config layer imports it, and ``modmoe
export`` copies it (with the rest of the model package) into every exported directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

# Allowed values of the string-valued choices (the config validates them; ``from_dict`` re-checks
# them for exported directories, which are files a user hands us).
ROUTER_WEIGHTS = ("raw", "sigmoid", "unit")
CAUSAL_ROUTERS = ("aux_loss", "predictor", "prefix_rank")
DEPTH_VARIANTS = ("staged", "integrated")
EXPERT_SCORES = ("softmax", "sigmoid")
ATTENTION_BIASES = ("none", "qkv", "all")
QK_NORMS = ("none", "head", "full")
ROPE_TYPES = ("llama3", "linear")


def is_routed(layer: int, enabled: bool, every: int, offset: int) -> bool:
    """Whether block ``layer`` has a depth router (staged or integrated)."""
    return enabled and layer % every == offset


def is_moe(layer: int, enabled: bool, every: int, first_dense: int) -> bool:
    """Whether block ``layer``'s MLP is a mixture of experts."""
    return enabled and layer >= first_dense and (layer - first_dense) % every == 0


def entering_tokens(capacity: float, seq_len: int) -> int:
    """Tokens of each ``seq_len``-token sequence that enter a staged routed block (top-k routing)."""
    return max(1, math.ceil(capacity * seq_len))


def noop_experts_at(routed: bool, integrated: bool, moe: bool, noop_experts: int) -> int:
    """No-op experts in a block's MoE router: only integrated MoDE blocks that are routed and MoE."""
    return noop_experts if routed and integrated and moe else 0


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling of a pretrained long-context model (Llama-3's ``llama3`` or ``linear``)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class DepthArgs:
    enabled: bool = True
    variant: str = "staged"
    capacity: float = 0.125
    every: int = 2
    offset: int = 1
    router_weight: str = "raw"
    causal_router: str = "prefix_rank"
    bce_loss_coef: float = 0.01
    bce_detach_input: bool = False
    predictor: bool = False
    predictor_hidden: int = 64
    prefix_prior_tokens: float = 32.0
    noop_experts: int = 0

    def is_routed(self, layer: int) -> bool:
        """Block ``layer`` has a depth router, staged or integrated."""
        return is_routed(layer, self.enabled, self.every, self.offset)


@dataclass(frozen=True)
class MoEArgs:
    enabled: bool = True
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    shared_expert_gate: bool = False
    score: str = "softmax"
    normalize_top_k: bool = True
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    every: int = 1
    first_dense: int = 0

    def is_moe(self, layer: int) -> bool:
        return is_moe(layer, self.enabled, self.every, self.first_dense)

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the shared experts' SwiGLU (0: none)."""
        if not self.num_shared_experts:
            return 0
        return self.shared_expert_hidden or self.num_shared_experts * self.expert_hidden


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 4096
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 32
    ffn_hidden: int = 688
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: str = "none"
    qk_norm: str = "none"
    init_std: float = 0.02
    depth: DepthArgs = field(default_factory=DepthArgs)
    moe: MoEArgs = field(default_factory=MoEArgs)

    @classmethod
    def from_dict(cls, model: dict[str, Any]) -> ModelArgs:
        """From the ``model`` section of a config (a plain dict, e.g. an export's record). Keys
        this version does not know are ignored; missing ones take the defaults above, except the
        sizes, which must be present. Raises ``ValueError`` naming the first bad field."""
        if not isinstance(model, dict):
            raise ValueError("model config must be a mapping")
        for required in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len"):
            if required not in model:
                raise ValueError(f"model config is missing field {required}")
        top = _known(cls, model, exclude=("depth", "moe", "rope_scaling", "num_kv_heads", "head_dim"))
        num_heads = int(model["num_heads"])
        if model.get("head_dim") is None and int(model["dim"]) % num_heads:
            raise ValueError(f"model config field num_heads = {num_heads} must divide dim ({model['dim']})")
        scaling = model.get("rope_scaling")
        args = cls(
            **top,
            num_kv_heads=int(model.get("num_kv_heads") or num_heads),
            head_dim=int(model.get("head_dim") or int(model["dim"]) // num_heads),
            rope_scaling=RopeScaling(**_known(RopeScaling, scaling, ())) if scaling else None,
            depth=DepthArgs(**_known(DepthArgs, model.get("depth") or {}, ())),
            moe=MoEArgs(**_known(MoEArgs, model.get("moe") or {}, ())),
        )
        args.check()
        return args

    def check(self) -> None:
        """The string choices and the predictor rule; ``ValueError`` naming the field."""
        choices = {
            "depth.variant": (self.depth.variant, DEPTH_VARIANTS),
            "depth.router_weight": (self.depth.router_weight, ROUTER_WEIGHTS),
            "depth.causal_router": (self.depth.causal_router, CAUSAL_ROUTERS),
            "moe.score": (self.moe.score, EXPERT_SCORES),
            "attention_bias": (self.attention_bias, ATTENTION_BIASES),
            "qk_norm": (self.qk_norm, QK_NORMS),
        }
        if self.rope_scaling is not None:
            choices["rope_scaling.rope_type"] = (self.rope_scaling.rope_type, ROPE_TYPES)
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(
                    f"model config field {name} = {value!r} is not supported (allowed: {', '.join(allowed)})"
                )
        if self.depth.causal_router == "predictor" and not self.depth.predictor:
            raise ValueError("model config field depth.causal_router = 'predictor' needs depth.predictor = true")
        if self.head_dim % 2:
            raise ValueError(f"model config field head_dim = {self.head_dim} must be even (RoPE rotates pairs)")

    def entering_tokens(self, seq_len: int) -> int:
        """Tokens per sequence that enter a staged routed block under top-k routing."""
        return entering_tokens(self.depth.capacity, seq_len)

    def layer_kind(self, layer: int) -> tuple[bool, bool]:
        """(staged depth-routed?, MoE?) for one block."""
        routed = self.depth.is_routed(layer) and self.depth.variant == "staged"
        return routed, self.moe.is_moe(layer)

    def noop_experts_at(self, layer: int) -> int:
        """No-op experts of the integrated variant in this block (0 elsewhere)."""
        return noop_experts_at(
            self.depth.is_routed(layer),
            self.depth.variant == "integrated",
            self.moe.is_moe(layer),
            self.depth.noop_experts,
        )


def as_args(cfg: Any) -> ModelArgs:
    """``cfg`` itself when it is a :class:`ModelArgs`, else ``cfg.to_args()`` (modmoe's validated
    ``ModelConfig`` converts that way; this module cannot import it)."""
    return cfg if isinstance(cfg, ModelArgs) else cfg.to_args()


def _known(cls: type, data: Any, exclude: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"model config section for {cls.__name__} must be a mapping")
    names = {f.name for f in fields(cls)} - set(exclude)
    return {k: v for k, v in data.items() if k in names}
