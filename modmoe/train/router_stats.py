"""Router health: depth-routing and expert-load statistics over a step, on the global batch.

Raw sums are accumulated per micro-batch as tensors on the model's device, summed over ranks
with one all-reduce, brought to the CPU once, and only then turned into ratios, so every
layout reports the same numbers for the same data. Metric names are listed in docs/tracking.md.
"""

from __future__ import annotations

import math

import torch

from modmoe.model.transformer import ModelOutput

POSITION_BINS = 10  # entry rate is reported per tenth of the sequence


def _layer(key: str) -> int:
    """``"moe12.load"`` -> 12."""
    return int(key.split(".")[0][3:])


class RouterStats:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double().reshape(-1)
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def add(self, out: ModelOutput) -> None:
        one = torch.ones(1, dtype=torch.float64, device=out.logits.device)
        self._add("micro_batches", one)  # the per-layer losses are means over micro-batches
        for i, aux in enumerate(out.layers):
            if aux.moe is not None:
                m = aux.moe
                self._add(f"moe{i}.load", m.tokens_per_expert)
                self._add(f"moe{i}.slots", m.total_slots)
                self._add(f"moe{i}.dropped", m.dropped_slots)
                self._add(f"moe{i}.losses", torch.stack([m.aux_loss, m.seq_aux_loss, m.z_loss]))
            if aux.depth is not None:
                d = aux.depth
                entered = torch.zeros_like(d.topk_mask).scatter_(
                    1, d.index, d.valid if d.valid is not None else torch.ones_like(d.index, dtype=torch.bool)
                )  # (B, T) tokens that actually entered (either routing mode)
                w = d.weight if d.valid is None else d.weight[d.valid]
                self._add(f"mod{i}.tokens", one * d.topk_mask.numel())
                self._add(f"mod{i}.topk", d.topk_mask.sum())
                self._add(f"mod{i}.entered", entered.sum())
                self._add(f"mod{i}.causal_enter", d.causal_enter.sum())
                self._add(f"mod{i}.agree", (d.causal_enter == d.topk_mask).sum())
                self._add(f"mod{i}.both", (d.causal_enter & d.topk_mask).sum())  # enters under both rules
                self._add(f"mod{i}.w", torch.stack([w.sum(), (w.float() ** 2).sum(), one[0] * w.numel()]))
                self._add(f"mod{i}.by_position", entered.sum(0))  # (T,)
                self._add(f"mod{i}.bce", d.bce_loss)
                if d.predictor_loss is not None:
                    self._add(f"mod{i}.predictor", d.predictor_loss)
                if d.quantile_sums is not None:
                    self._add(f"mod{i}.quantiles", d.quantile_sums)

    def reduce(self, reducer) -> None:
        """Sums every statistic over ranks with one collective (``reducer`` sums a tensor), then
        moves the sums to the CPU in one copy (the summary reads them element by element)."""
        if not self.sums:
            return
        keys = sorted(self.sums)
        flat = reducer(torch.cat([self.sums[k] for k in keys])).cpu()
        offset = 0
        for k in keys:
            n = self.sums[k].numel()
            self.sums[k], offset = flat[offset : offset + n], offset + n

    def expert_loads(self) -> tuple[list[str], torch.Tensor | None]:
        """Layer names and their normalized expert loads (layers, experts), for the heatmap."""
        names = sorted((k for k in self.sums if k.startswith("moe") and k.endswith(".load")), key=_layer)
        if not names:
            return [], None
        loads = torch.stack([self.sums[k] / self.sums[k].sum().clamp_min(1) for k in names])
        return [f"layer {_layer(k)}" for k in names], loads

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        moe_layers = sorted({_layer(k) for k in self.sums if k.startswith("moe")})
        mod_layers = sorted({_layer(k) for k in self.sums if k.startswith("mod")})
        micro = float(self.sums["micro_batches"]) if "micro_batches" in self.sums else 1.0
        agg: dict[str, list[float]] = {}

        def put(kind: str, layer: int, name: str, value: float, aggregate: bool = True) -> None:
            out[f"{kind}/layer{layer}/{name}"] = value
            if aggregate:
                agg.setdefault(f"{kind}/{name}", []).append(value)

        for i in moe_layers:
            load = self.sums[f"moe{i}.load"]
            share = load / load.sum().clamp_min(1)  # (E,) fraction of routed slots per expert
            put("moe", i, "max_over_mean_load", float(share.max() * share.numel()))
            put("moe", i, "dead_experts", float((share < 0.01).sum()))
            put(
                "moe",
                i,
                "dropped_fraction",
                float(self.sums[f"moe{i}.dropped"] / self.sums[f"moe{i}.slots"].clamp_min(1)),
            )
            for e, value in enumerate(share.tolist()):
                put("moe", i, f"expert_load/{e}", value, aggregate=False)
            # Each layer's loss; their sum over layers is the top-level moe_aux_loss etc.
            for name, value in zip(("aux_loss", "seq_aux_loss", "z_loss"), self.sums[f"moe{i}.losses"].tolist()):
                put("moe", i, name, value / micro, aggregate=False)
        for i in mod_layers:
            tokens = float(self.sums[f"mod{i}.tokens"])
            put("mod", i, "entry_fraction", float(self.sums[f"mod{i}.entered"]) / tokens)
            put("mod", i, "causal_entry_fraction", float(self.sums[f"mod{i}.causal_enter"]) / tokens)
            put("mod", i, "causal_agreement", float(self.sums[f"mod{i}.agree"]) / tokens)
            # At capacity c, never entering already agrees 1 - c: precision and recall of "enters" say more.
            both = float(self.sums[f"mod{i}.both"])
            put("mod", i, "causal_precision", both / max(float(self.sums[f"mod{i}.causal_enter"]), 1.0))
            put("mod", i, "causal_recall", both / max(float(self.sums[f"mod{i}.topk"]), 1.0))
            s, s2, n = (float(v) for v in self.sums[f"mod{i}.w"])
            mean = s / max(n, 1)
            put("mod", i, "router_weight_mean", mean)
            put("mod", i, "router_weight_std", math.sqrt(max(s2 / max(n, 1) - mean**2, 0.0)))
            by_pos = self.sums[f"mod{i}.by_position"]  # (T,) entries per position
            rate = by_pos / by_pos.sum().clamp_min(1)
            nz = rate[rate > 0]
            # 1.0 = selections spread evenly over positions; low = the same positions always win.
            put(
                "mod",
                i,
                "selection_entropy",
                float(-(nz * nz.log()).sum() / math.log(rate.numel())) if rate.numel() > 1 else 1.0,
            )
            decile = max(1, rate.numel() // 10)
            put("mod", i, "first_decile_share", float(rate[:decile].sum()))
            sequences = tokens / by_pos.numel()
            for b, chunk in enumerate(torch.tensor_split(by_pos, min(POSITION_BINS, by_pos.numel()))):
                # Fraction of the tokens at these positions that entered; capacity everywhere = no bias.
                put("mod", i, f"entry_rate_by_position/{b}", float(chunk.mean()) / sequences)
            put("mod", i, "bce_loss", float(self.sums[f"mod{i}.bce"]) / micro, aggregate=False)
            if f"mod{i}.predictor" in self.sums:
                put("mod", i, "predictor_loss", float(self.sums[f"mod{i}.predictor"]) / micro, aggregate=False)
        for key, values in agg.items():
            out[key] = float(sum(values) if key.endswith("dead_experts") else sum(values) / len(values))
        return out


def expert_bias_summary(biases: dict[int, torch.Tensor]) -> dict[str, float]:
    """L2 norm and range (max - min) of each MoE layer's aux-loss-free selection bias
    ``{layer: (E,)}``, and their means over layers; empty without biases."""
    if not biases:
        return {}
    rows = torch.stack([torch.stack([b.float().norm(), b.max() - b.min()]) for b in biases.values()])  # (L, 2)
    out: dict[str, float] = {}
    for layer, (norm, spread) in zip(biases, rows.cpu().tolist()):
        out[f"moe/layer{layer}/expert_bias_norm"] = norm
        out[f"moe/layer{layer}/expert_bias_range"] = spread
    out["moe/expert_bias_norm"], out["moe/expert_bias_range"] = rows.mean(0).cpu().tolist()
    return out
