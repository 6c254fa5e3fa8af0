"""Experiment tracking with MLflow: a non-blocking run logger for the trainer, its config,
spool replay, config flattening, run tags and routing plots."""

from modmoe.tracking.cli import tracking_app
from modmoe.tracking.config import TrackingConfig, resolve_tracking_uri
from modmoe.tracking.flatten import flatten_config
from modmoe.tracking.plots import depth_routing_map, expert_load_heatmap
from modmoe.tracking.spool import SPOOL_NAME, replay_spool
from modmoe.tracking.tags import default_tags
from modmoe.tracking.tracker import MlflowTracker

__all__ = [
    "SPOOL_NAME",
    "MlflowTracker",
    "TrackingConfig",
    "default_tags",
    "depth_routing_map",
    "expert_load_heatmap",
    "flatten_config",
    "replay_spool",
    "resolve_tracking_uri",
    "tracking_app",
]
