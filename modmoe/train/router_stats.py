"""Router health: depth-routing and expert-load statistics over a step, on the global batch.

Raw sums are accumulated per micro-batch as tensors, summed over ranks with one all-reduce,
and only then turned into ratios, so every layout reports the same numbers for the same data.
"""

from __future__ import annotations

import math

import torch

from modmoe.model.transformer import ModelOutput


class RouterStats:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double().reshape(-1)
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def add(self, out: ModelOutput) -> None:
        for i, aux in enumerate(out.layers):
            if aux.moe is not None:
                self._add(f"moe{i}.load", aux.moe.tokens_per_expert)
                self._add(f"moe{i}.slots", aux.moe.total_slots)
                self._add(f"moe{i}.dropped", aux.moe.dropped_slots)
            if aux.depth is not None:
                d = aux.depth
                entered = torch.zeros_like(d.topk_mask).scatter_(
                    1, d.index, d.valid if d.valid is not None else torch.ones_like(d.index, dtype=torch.bool)
                )  # (B, T) tokens that actually entered (either routing mode)
                w = d.weight if d.valid is None else d.weight[d.valid]
                self._add(f"mod{i}.tokens", torch.tensor(float(d.topk_mask.numel())))
                self._add(f"mod{i}.entered", entered.sum())
                self._add(f"mod{i}.causal_enter", d.causal_enter.sum())
                self._add(f"mod{i}.agree", (d.causal_enter == d.topk_mask).sum())
                self._add(f"mod{i}.w", torch.stack([w.sum(), (w.float() ** 2).sum(), torch.tensor(float(w.numel()))]))
                self._add(f"mod{i}.by_position", entered.sum(0))  # (T,)

    def reduce(self, reducer) -> None:
        """Sums every statistic over ranks with one collective (``reducer`` sums a tensor)."""
        if not self.sums:
            return
        keys = sorted(self.sums)
        flat = reducer(torch.cat([self.sums[k] for k in keys]))
        offset = 0
        for k in keys:
            n = self.sums[k].numel()
            self.sums[k], offset = flat[offset : offset + n], offset + n

    def expert_loads(self) -> tuple[list[str], torch.Tensor | None]:
        """Layer names and their normalized expert loads (layers, experts), for the heatmap."""
        names = sorted((k for k in self.sums if k.endswith(".load")), key=lambda k: int(k[3:-5]))
        if not names:
            return [], None
        loads = torch.stack([self.sums[k] / self.sums[k].sum().clamp_min(1) for k in names])
        return [f"layer {k[3:-5]}" for k in names], loads

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        moe_layers = sorted({k.split(".")[0] for k in self.sums if k.startswith("moe")})
        mod_layers = sorted({k.split(".")[0] for k in self.sums if k.startswith("mod")})
        agg: dict[str, list[float]] = {}

        def put(layer: str, name: str, value: float) -> None:
            out[f"{layer[:3]}/layer{layer[3:]}/{name}"] = value
            agg.setdefault(f"{layer[:3]}/{name}", []).append(value)

        for layer in moe_layers:
            load = self.sums[f"{layer}.load"]
            share = load / load.sum().clamp_min(1)
            put(layer, "max_over_mean_load", float(share.max() * share.numel()))
            put(layer, "dead_experts", float((share < 0.01).sum()))
            put(layer, "dropped_fraction", float(self.sums[f"{layer}.dropped"] / self.sums[f"{layer}.slots"].clamp_min(1)))
        for layer in mod_layers:
            tokens = float(self.sums[f"{layer}.tokens"])
            put(layer, "entry_fraction", float(self.sums[f"{layer}.entered"]) / tokens)
            put(layer, "causal_entry_fraction", float(self.sums[f"{layer}.causal_enter"]) / tokens)
            put(layer, "causal_agreement", float(self.sums[f"{layer}.agree"]) / tokens)
            s, s2, n = (float(v) for v in self.sums[f"{layer}.w"])
            mean = s / max(n, 1)
            put(layer, "router_weight_mean", mean)
            put(layer, "router_weight_std", math.sqrt(max(s2 / max(n, 1) - mean**2, 0.0)))
            by_pos = self.sums[f"{layer}.by_position"]
            rate = by_pos / by_pos.sum().clamp_min(1)
            nz = rate[rate > 0]
            # 1.0 = selections spread evenly over positions; low = the same positions always win.
            put(layer, "selection_entropy", float(-(nz * nz.log()).sum() / math.log(rate.numel())) if rate.numel() > 1 else 1.0)
            decile = max(1, rate.numel() // 10)
            put(layer, "first_decile_share", float(rate[:decile].sum()))
        for key, values in agg.items():
            reducer = sum if key.endswith("dead_experts") else (lambda v: sum(v) / len(v))
            out[key] = float(reducer(values))
        return out
