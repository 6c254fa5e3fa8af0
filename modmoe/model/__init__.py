"""The native MoDE model: plain nn.Modules, free of parallelism."""

from modmoe.model.config import DepthRoutingConfig, ModelConfig, MoEConfig
from modmoe.model.depth_router import RoutingMode
from modmoe.model.transformer import ModelOutput, MoDETransformer

__all__ = ["DepthRoutingConfig", "ModelConfig", "MoEConfig", "ModelOutput", "MoDETransformer", "RoutingMode"]
