"""The isoFLOP plot: final validation loss against training FLOPs, one curve per variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modmoe.tracking.plots import new_figure, save_png


@dataclass
class VariantCurve:
    """One variant's best point per budget."""

    topk: list[tuple[float, float, float, float]] = field(default_factory=list)  # budget, seed mean, min, max
    causal: list[tuple[float, float]] = field(default_factory=list)  # budget, best causal-routing loss


def isoflop_plot(
    curves: dict[str, VariantCurve],
    points: dict[str, list[tuple[float, float]]],
    title: str,
    path: str | Path,
) -> Path:
    """``curves[variant]``: drawn solid (top-k: the seed mean, with a bar from the lowest to the
    highest seed) and dashed (causal routing) in the variant's colour; ``points[variant]``:
    (executed FLOPs, top-k loss) of every finished run, drawn faintly, so the spread over sizes,
    learning rates and seeds stays visible."""
    fig = new_figure((7.5, 4.8))
    ax = fig.add_subplot()
    for i, (variant, curve) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        if points.get(variant):
            xs, ys = zip(*points[variant])
            ax.scatter(xs, ys, color=colour, alpha=0.25, s=14, linewidths=0)
        if curve.topk:
            xs, means, lows, highs = zip(*sorted(curve.topk))
            bars = [[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]]
            ax.errorbar(
                xs, means, yerr=bars, fmt="-o", color=colour, label=f"{variant} (top-k)", markersize=5, capsize=3
            )
        if curve.causal:
            xs, ys = zip(*sorted(curve.causal))
            ax.plot(xs, ys, "--", marker="x", color=colour, label=f"{variant} (causal)", markersize=5)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (executed)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return save_png(fig, path)
