"""Modules built on the dispatched ops; drop-ins for their ``mlx.nn`` namesakes."""

from .feed_forward import GeGLU, SwiGLU
from .normalization import LayerNorm, RMSNorm
from .positional_encoding import RoPE

__all__ = ["GeGLU", "LayerNorm", "RMSNorm", "RoPE", "SwiGLU"]
