"""Batched generation with causal routing and a ragged KV cache, streamed as events.

Prompts of different lengths share one batch with *per-sequence lengths*, not left padding:
the prefill gets the prompts right-padded (each row's real tokens first), every row keeps its
own position counter, and every layer's cache its own length per row. A routed layer's cache
lengths differ between rows anyway (each row's tokens decide for themselves), so one
mechanism covers both; padding never enters attention and positions need no shifting. Rows
that finish are dropped from the batch, so they cost nothing afterwards.

``routing="topk"`` is the training routing, which looks at the whole sequence: every step
recomputes each sequence from scratch (no cache). It is the slow reference, not a mode to
serve with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from modmoe.inference.flops import trace_flops, trace_of_sequences
from modmoe.inference.loading import InferenceError, LoadedModel
from modmoe.inference.sampling import SamplingConfig, next_tokens
from modmoe.inference.text import StopTextStream
from modmoe.model.kv_cache import RaggedKVCache
from modmoe.model.trace import Trace

Routing = Literal["causal", "topk"]
FinishReason = Literal["eos", "stop", "length", "context"]


@dataclass
class GenerationEvent:
    index: int  # which prompt
    token: int  # the token just generated
    text: str  # text released by it (may be empty: held back until settled)
    finish_reason: FinishReason | None = None  # set on the sequence's last event


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason


@dataclass
class GenerationStats:
    """Timings and executed work of the last call. ``decode_*`` covers the steps after the
    prefill; FLOPs come from the routing decisions actually made."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    prefill_flops: float = 0.0
    decode_tokens: int = 0  # tokens fed through the model after the prefill
    decode_s: float = 0.0
    decode_flops: float = 0.0
    decode_flops_by_component: dict[str, float] = field(default_factory=dict)
    entered: dict[int, int] = field(default_factory=dict)  # routed layer -> decode tokens that entered it

    def entry_fraction(self) -> dict[int, float]:
        return {i: n / max(self.decode_tokens, 1) for i, n in sorted(self.entered.items())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    def __init__(
        self,
        loaded: LoadedModel,
        routing: Routing = "causal",
        causal_router: str | None = None,
        count_flops: bool = True,
    ) -> None:
        if routing not in ("causal", "topk"):
            raise InferenceError(f"--routing {routing!r}: allowed causal, topk")
        try:
            loaded.model.causal_rule(causal_router)
        except ValueError as err:
            raise InferenceError(f"--causal-router: {err}") from None
        self.loaded, self.model, self.routing, self.causal_router = loaded, loaded.model, routing, causal_router
        self.count_flops = count_flops
        self.stats = GenerationStats()
        self._finished: set[int] = set()  # prompt indices the consumer ended (see finish)

    # ------------------------------------------------------------------ token level
    def encode(self, prompt: str) -> list[int]:
        if self.loaded.tokenizer is None:
            raise InferenceError(f"{self.loaded.dir}: no tokenizer.json, so text prompts cannot be encoded")
        return self.loaded.tokenizer.encode(prompt, add_special_tokens=False).ids

    def check_prompts(self, prompts: Sequence[list[int]]) -> None:
        limit = self.loaded.config.max_seq_len
        for i, ids in enumerate(prompts):
            if not ids:
                raise InferenceError(f"prompt {i}: empty (give at least one token of text)")
            if len(ids) > limit:
                raise InferenceError(
                    f"prompt {i}: {len(ids)} tokens, longer than the context (model.max_seq_len = {limit})"
                )

    @torch.no_grad()
    def _forward_causal(self, cache: RaggedKVCache, rows: list[list[int]], decode: bool) -> torch.Tensor:
        """Appends ``rows`` (token lists, one per cached sequence) and returns (n, V) logits
        at each row's last token."""
        device = self.loaded.device
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            valid[i, : len(r)] = True
        trace = Trace() if self.count_flops else None
        logits = self.model.run_tokens(
            tokens.to(device), cache, valid.to(device), causal_router=self.causal_router, last_only=True, trace=trace
        )
        if trace is not None:
            self._account(trace, decode)
        return logits[:, -1]

    @torch.no_grad()
    def _forward_topk(self, sequences: list[list[int]], decode: bool) -> torch.Tensor:
        outs = []
        rule = self.model.causal_rule(self.causal_router)
        for seq in sequences:  # sequences differ in length; top-k is per whole sequence
            tokens = torch.tensor([seq], device=self.loaded.device)
            output = self.model(tokens, routing="topk")
            outs.append(output.logits[0, -1])
            if self.count_flops:
                self._account(trace_of_sequences(self.model, output, len(seq), rule), decode)
        return torch.stack(outs)

    def _account(self, trace: Trace, decode: bool) -> None:
        flops = trace_flops(trace, self.loaded.config)
        total = sum(flops.values())
        if not decode:
            self.stats.prefill_flops += total
            return
        self.stats.decode_flops += total
        for k, v in flops.items():
            self.stats.decode_flops_by_component[k] = self.stats.decode_flops_by_component.get(k, 0.0) + v
        for lt in trace.layers:
            if lt.enter is not None and self.routing == "causal":
                self.stats.entered[lt.layer] = self.stats.entered.get(lt.layer, 0) + int(lt.enter.sum())

    def stream_ids(self, prompts: Sequence[list[int]], params: SamplingConfig) -> Iterator[tuple[int, int, bool]]:
        """Yields ``(prompt index, token, context_full)`` per generated token; the consumer
        ends a sequence by calling :meth:`finish` with its index (``context_full`` marks the
        last token that fits the context)."""
        self.check_prompts(prompts)
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
        device = self.loaded.device
        gen = torch.Generator().manual_seed(params.seed)
        limit = self.loaded.config.max_seq_len
        active = list(range(len(prompts)))  # prompt index of each batch row
        seqs = [list(p) for p in prompts]
        self._finished = set()
        cache = self.model.new_cache(len(prompts)) if self.routing == "causal" else None

        t0 = time.perf_counter()
        if cache is not None:
            logits = self._forward_causal(cache, seqs, decode=False)
        else:
            logits = self._forward_topk(seqs, decode=False)
        _sync(device)
        self.stats.prefill_s = time.perf_counter() - t0
        produced = [0] * len(prompts)
        while active:
            tokens = next_tokens(logits, params, gen).tolist()
            for row, idx in enumerate(active):
                seqs[idx].append(tokens[row])
                produced[idx] += 1
                yield idx, tokens[row], len(seqs[idx]) >= limit
                if produced[idx] >= params.max_new_tokens or len(seqs[idx]) >= limit:
                    self._finished.add(idx)
            keep = [row for row, idx in enumerate(active) if idx not in self._finished]
            if not keep:
                break
            if cache is not None and len(keep) < len(active):
                cache.select(torch.tensor(keep, device=device))
            active = [active[row] for row in keep]
            t0 = time.perf_counter()
            if cache is not None:
                logits = self._forward_causal(cache, [[seqs[idx][-1]] for idx in active], decode=True)
            else:
                logits = self._forward_topk([seqs[idx] for idx in active], decode=True)
            _sync(device)
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.decode_tokens += len(active)

    def finish(self, index: int) -> None:
        self._finished.add(index)

    def generate_ids(self, prompts: Sequence[list[int]], params: SamplingConfig) -> list[list[int]]:
        """Generated token ids per prompt (stops at EOS when ``stop_at_eos``; no text stops)."""
        out: list[list[int]] = [[] for _ in prompts]
        for idx, token, _ in self.stream_ids(prompts, params):
            if params.stop_at_eos and token == self.loaded.eos_id:
                self.finish(idx)
                continue
            out[idx].append(token)
        return out

    # ------------------------------------------------------------------ text level
    def stream(self, prompts: Sequence[str], params: SamplingConfig) -> Iterator[GenerationEvent]:
        """Generated text as it settles, per prompt; each sequence's last event carries its
        finish reason."""
        ids = [self.encode(p) for p in prompts]
        tok = self.loaded.tokenizer
        texts = [StopTextStream(tok.decode, params.stop) for _ in prompts]
        produced = [0] * len(prompts)
        for idx, token, context_full in self.stream_ids(ids, params):
            produced[idx] += 1
            reason: FinishReason | None = None
            if params.stop_at_eos and token == self.loaded.eos_id:
                reason, delta = "eos", texts[idx].flush()
            else:
                delta = texts[idx].feed(token)
                if texts[idx].stopped:
                    reason = "stop"
                elif context_full or produced[idx] >= params.max_new_tokens:
                    reason = "context" if context_full and produced[idx] < params.max_new_tokens else "length"
                    delta += texts[idx].flush()
            if reason is not None:
                self.finish(idx)
            yield GenerationEvent(idx, token, delta, reason)

    def complete(self, prompts: Sequence[str], params: SamplingConfig) -> list[Completion]:
        texts = ["" for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        reasons: list[FinishReason] = ["length" for _ in prompts]
        for ev in self.stream(prompts, params):
            texts[ev.index] += ev.text
            tokens[ev.index].append(ev.token)
            if ev.finish_reason is not None:
                reasons[ev.index] = ev.finish_reason
        return [Completion(p, t, ids, r) for p, t, ids, r in zip(prompts, texts, tokens, reasons)]
