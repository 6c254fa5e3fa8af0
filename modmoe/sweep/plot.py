"""The isoFLOP plot: final validation loss against training FLOPs, one curve per variant."""

from __future__ import annotations

from pathlib import Path

from modmoe.tracking.plots import new_figure, save_png


def isoflop_plot(
    curves: dict[str, dict[str, list[tuple[float, float]]]],
    points: dict[str, list[tuple[float, float]]],
    title: str,
    path: str | Path,
) -> Path:
    """``curves[variant]["topk" | "causal"]``: (budget, best loss) per budget, drawn solid for
    top-k and dashed for causal routing in the variant's colour; ``points[variant]``: (executed
    FLOPs, top-k loss) of every finished run, drawn faintly, so the spread over sizes and
    learning rates stays visible."""
    fig = new_figure((7.5, 4.8))
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    for i, (variant, series) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        if points.get(variant):
            xs, ys = zip(*points[variant])
            ax.scatter(xs, ys, color=colour, alpha=0.25, s=14, linewidths=0)
        for routing, style, marker in (("topk", "-", "o"), ("causal", "--", "x")):
            data = sorted(series.get(routing, []))
            if data:
                xs, ys = zip(*data)
                label = f"{variant} ({'top-k' if routing == 'topk' else 'causal'})"
                ax.plot(xs, ys, style, marker=marker, color=colour, label=label, markersize=5)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (executed)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return save_png(fig, path)
