"""mlx-primitives: fast MLX building blocks served through an autotuning kernel registry."""

__version__ = "0.1.0"

from . import registry
from .dispatch import explain
from .nn import GeGLU, LayerNorm, RMSNorm, RoPE, SwiGLU
from .ops import geglu, layer_norm, rms_norm, rope, swiglu

__all__ = [
    "GeGLU",
    "LayerNorm",
    "RMSNorm",
    "RoPE",
    "SwiGLU",
    "explain",
    "geglu",
    "layer_norm",
    "registry",
    "rms_norm",
    "rope",
    "swiglu",
]
