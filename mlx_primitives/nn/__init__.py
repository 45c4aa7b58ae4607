"""Modules built on the dispatched ops; drop-ins for their ``mlx.nn`` namesakes."""

from .attention import ChunkedCrossAttention, FlashAttention, SlidingWindowAttention
from .feed_forward import GeGLU, SwiGLU
from .normalization import LayerNorm, RMSNorm
from .positional_encoding import RoPE

__all__ = [
    "ChunkedCrossAttention",
    "FlashAttention",
    "GeGLU",
    "LayerNorm",
    "RMSNorm",
    "RoPE",
    "SlidingWindowAttention",
    "SwiGLU",
]
