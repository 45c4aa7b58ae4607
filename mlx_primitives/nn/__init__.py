"""Modules built on the dispatched ops; drop-ins for their ``mlx.nn`` namesakes."""

from .attention import ChunkedCrossAttention, FlashAttention, SlidingWindowAttention
from .feed_forward import GeGLU, SwiGLU
from .normalization import LayerNorm, RMSNorm
from .positional_encoding import RoPE
from .quantized import QuantizedLinear

__all__ = [
    "ChunkedCrossAttention",
    "FlashAttention",
    "GeGLU",
    "LayerNorm",
    "QuantizedLinear",
    "RMSNorm",
    "RoPE",
    "SlidingWindowAttention",
    "SwiGLU",
]
