"""Modules built on the dispatched ops; drop-ins for their ``mlx.nn`` namesakes."""

from .attention import ChunkedCrossAttention, FlashAttention, SlidingWindowAttention
from .feed_forward import GeGLU, SwiGLU
from .normalization import LayerNorm, RMSNorm
from .positional_encoding import RoPE
from .quantized import QuantizedLinear
from .switch import QuantizedSwitchLinear, SparseMoE, SwitchGLU, SwitchLinear, SwitchMLP

__all__ = [
    "ChunkedCrossAttention",
    "FlashAttention",
    "GeGLU",
    "LayerNorm",
    "QuantizedLinear",
    "QuantizedSwitchLinear",
    "RMSNorm",
    "RoPE",
    "SlidingWindowAttention",
    "SparseMoE",
    "SwiGLU",
    "SwitchGLU",
    "SwitchLinear",
    "SwitchMLP",
]
