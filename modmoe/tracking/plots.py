"""Routing plots the trainer logs as artifacts (PNG, Agg; no pyplot global state).

Figure sizes grow with the data, so a cell or a token column keeps a readable size: the
PNG is ``figure_size(...) * DPI`` pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def new_figure(size: tuple[float, float]) -> Figure:
    # matplotlib is imported here, at the first plot: most processes that import the tracking
    # package never draw one.
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _check_names(names: list[str], rows: int, what: str) -> None:
    if len(names) != rows:
        raise ValueError(f"layer_names has {len(names)} entries but {what} has {rows} rows")


def save_png(fig: Figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI, format="png")  # no bbox="tight": the pixel size stays predictable
    return out


def heatmap_size(layers: int, experts: int) -> tuple[float, float]:
    """Inches (width, height): ~0.55 in per expert column, ~0.4 in per layer row, plus margins."""
    return 2.8 + 0.55 * experts, 1.4 + 0.4 * layers


def expert_load_heatmap(loads: np.ndarray, layer_names: list[str], path: str | Path) -> Path:
    """Heatmap of per-layer expert load, ``loads`` of shape (layers, experts) (e.g. the fraction
    of routed tokens each expert got; 1/E everywhere is perfect balance). Cells carry their
    value when the grid is small enough to read."""
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2 or 0 in loads.shape:
        raise ValueError(f"loads must be a non-empty (layers, experts) array, got shape {loads.shape}")
    layers, experts = loads.shape
    _check_names(layer_names, layers, "loads")
    fig = new_figure(heatmap_size(layers, experts))
    ax = fig.add_subplot()
    image = ax.imshow(loads, aspect="auto", cmap="viridis", interpolation="nearest")  # (L, E)
    ax.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=8)
    ax.set_yticks(range(layers), layer_names, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title("expert load per layer", fontsize=10)
    fig.colorbar(image, ax=ax, label="load")
    if layers * experts <= 512:
        mid = (np.nanmax(loads) + np.nanmin(loads)) / 2
        for (i, j), value in np.ndenumerate(loads):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > mid else "white"
            )
    return save_png(fig, path)


def _token_label(token: str, limit: int = 10) -> str:
    # Make whitespace visible and keep '$' from switching matplotlib into mathtext.
    shown = token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or "∅"
    shown = shown if len(shown) <= limit else shown[: limit - 1] + "…"
    return shown.replace("$", r"\$")


def routing_map_size(routed_layers: int, tokens: int) -> tuple[float, float]:
    """Inches (width, height): ~0.22 in per token column, ~0.35 in per routed layer, plus room
    for the vertical token labels."""
    return 2.6 + 0.22 * tokens, 2.2 + 0.35 * routed_layers


def depth_routing_map(tokens: list[str], chosen: np.ndarray, layer_names: list[str], path: str | Path) -> Path:
    """Which tokens each routed layer let into its block: ``chosen`` (routed_layers, T) bool
    over the ``tokens`` of a sample text. Each row is annotated with the fraction chosen (the
    layer's effective capacity)."""
    chosen = np.asarray(chosen)
    if chosen.ndim != 2 or 0 in chosen.shape:
        raise ValueError(f"chosen must be a non-empty (routed_layers, T) array, got shape {chosen.shape}")
    routed, seq = chosen.shape
    if len(tokens) != seq:
        raise ValueError(f"tokens has {len(tokens)} entries but chosen has {seq} columns")
    _check_names(layer_names, routed, "chosen")
    chosen = chosen.astype(bool)
    fig = new_figure(routing_map_size(routed, seq))
    ax = fig.add_subplot()
    ax.imshow(chosen, aspect="auto", cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")  # (R, T)
    ax.set_xticks(range(seq), [_token_label(t) for t in tokens], rotation=90, fontsize=7, fontfamily="monospace")
    ax.set_yticks(range(routed), layer_names, fontsize=8)
    ax.set_xticks(np.arange(-0.5, seq), minor=True)
    ax.set_yticks(np.arange(-0.5, routed), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(routed), [f"{f:.0%}" for f in chosen.mean(axis=1)], fontsize=7)
    right.set_ylabel("fraction chosen", fontsize=8)
    ax.set_title("tokens chosen by each routed block (dark = enters the block)", fontsize=9)
    return save_png(fig, path)
