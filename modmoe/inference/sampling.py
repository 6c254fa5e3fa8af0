"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from modmoe.config_base import ConfigModel, field_error


class SamplingConfig(ConfigModel):
    """How tokens are chosen and when a sequence ends."""

    max_new_tokens: int = Field(default=64, ge=1)
    """Tokens to generate per prompt at most (fewer when a stop condition or the context end comes first)."""

    temperature: float = Field(default=0.0, ge=0.0)
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""

    top_k: int | None = Field(default=None, ge=1)
    """Sample only among the k most likely tokens (None = all)."""

    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Sample only among the smallest set of most likely tokens whose probability reaches p (None = all)."""

    stop: list[str] = Field(default_factory=list)
    """Strings that end a sequence; the text is cut before the first one."""

    stop_at_eos: bool = True
    """End a sequence at the end-of-text token."""

    seed: int = 0
    """Seed of the sampling generator (same seed, same prompts: same text)."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise field_error("stop", "", "stop strings must be non-empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits: (B, V) -> the same with excluded tokens at -inf (the most likely always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # (B, V), never the first
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) of the last position -> (B,) token ids, on the CPU."""
    logits = logits.float().cpu()
    if cfg.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
