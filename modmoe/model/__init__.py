"""The MoDE model: plain nn.Modules over torch alone, free of parallelism and of modmoe's config
system (``modmoe.model_config.ModelConfig`` converts into :class:`ModelArgs`)."""

from .args import ModelArgs
from .depth_router import RoutingMode
from .transformer import ModelOutput, MoDETransformer

__all__ = ["ModelArgs", "ModelOutput", "MoDETransformer", "RoutingMode"]
