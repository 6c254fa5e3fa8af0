"""Rank 0's link from the training loop to MLflow: params, per-step metrics, eval plots.

Other ranks never log: their numbers reach rank 0 through the collective reductions in the
trainer (losses, router statistics), so what MLflow shows is the global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modmoe.tracking import MlflowTracker, default_tags, depth_routing_map, expert_load_heatmap, flatten_config
from modmoe.train.backends.base import PlotData


class RunReporter:
    def __init__(self, cfg, run_dir: Path, layout: str, run_id: str | None = None) -> None:
        """Opens the MLflow run, or continues ``run_id`` (taken from the checkpoint) on resume:
        then params and the config artifact stay those of the run's first start."""
        self.run_dir = run_dir
        self.tracker = MlflowTracker(
            cfg.logging.mlflow,
            run_dir,
            run_id=run_id,
            params=None if run_id else flatten_config(cfg.model_dump(mode="json")),
            tags=default_tags(cfg.engine, layout),
        )
        if run_id is None:
            self.tracker.log_artifact(run_dir / "config.yaml")

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def log_step(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({k: float(v) for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def log_plots(self, step: int, data: PlotData) -> None:
        plots = self.run_dir / "plots"
        plots.mkdir(exist_ok=True)
        if data.expert_loads is not None:
            path = expert_load_heatmap(data.expert_loads, data.expert_layers, plots / f"expert_load_step{step:07d}.png")
            self.tracker.log_artifact(path, "plots")
        if data.routing is not None:
            tokens, chosen, layer_names = data.routing
            path = depth_routing_map(tokens, chosen, layer_names, plots / f"depth_routing_step{step:07d}.png")
            self.tracker.log_artifact(path, "plots")

    def close(self, exc: BaseException | None = None) -> None:
        self.tracker.close(exc)


@torch.no_grad()
def routing_sample(model, tokens: torch.Tensor, decode) -> tuple[list[str], np.ndarray, list[str]] | None:
    """Which of the first 64 tokens of a validation sequence each routed block chose."""
    sample = tokens[:1, :64]
    out = model(sample, routing="topk")
    rows = [(i, a.depth.topk_mask[0].cpu().numpy()) for i, a in enumerate(out.layers) if a.depth is not None]
    if not rows:
        return None
    texts = [decode([int(t)]) for t in sample[0]]
    return texts, np.stack([r for _, r in rows]), [f"layer {i}" for i, _ in rows]
