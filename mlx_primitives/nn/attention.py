"""Attention layers over given queries, keys and values (projections stay the model's)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops import chunked_cross_attention, flash_attention, sliding_window_attention
from ..ops._attention import LAYOUTS
from ..ops._common import check_choice, check_int


class _Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, layout: str, scale: float | None):
        super().__init__()
        name = type(self).__name__
        check_int(name, "num_heads", num_heads, minimum=1)
        check_int(name, "head_dim", head_dim, minimum=1)
        check_choice(name, "layout", layout, LAYOUTS)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.layout = layout
        self.scale = scale

    def _check(self, q: mx.array) -> None:
        heads = q.shape[1] if self.layout == "BHSD" else q.shape[2]
        if q.ndim != 4 or heads != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"[{type(self).__name__}] q has shape {q.shape}, expected {self.num_heads} heads "
                f"of {self.head_dim} in layout {self.layout}"
            )

    def _extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, layout={self.layout}"


class FlashAttention(_Attention):
    """Scaled dot-product attention (see :func:`mlx_primitives.flash_attention`).

    Args:
        num_heads: query heads.
        head_dim: features per head.
        causal: mask future keys.
        layout: ``"BHSD"`` or ``"BSHD"``.
        scale: default ``1 / sqrt(head_dim)``.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        causal: bool = False,
        layout: str = "BHSD",
        scale: float | None = None,
    ):
        super().__init__(num_heads, head_dim, layout, scale)
        self.causal = causal

    def __call__(self, q, k, v, mask: mx.array | None = None) -> mx.array:
        self._check(q)
        return flash_attention(
            q, k, v, causal=self.causal, scale=self.scale, layout=self.layout, mask=mask
        )


class SlidingWindowAttention(_Attention):
    """Causal attention within a window of ``window_size`` keys per query.

    Args:
        num_heads: query heads.
        head_dim: features per head.
        window_size: keys each query sees, itself included.
        layout: ``"BHSD"`` or ``"BSHD"``.
        scale: default ``1 / sqrt(head_dim)``.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        window_size: int,
        layout: str = "BHSD",
        scale: float | None = None,
    ):
        super().__init__(num_heads, head_dim, layout, scale)
        self.window_size = check_int(
            "SlidingWindowAttention", "window_size", window_size, minimum=1
        )

    def __call__(self, q, k, v) -> mx.array:
        self._check(q)
        return sliding_window_attention(
            q, k, v, self.window_size, scale=self.scale, layout=self.layout
        )


class ChunkedCrossAttention(_Attention):
    """Cross-attention over long key/value sequences, chunk by chunk.

    Args:
        num_heads: query heads.
        head_dim: features per head.
        chunk_size: keys per chunk, or None for the tuned choice.
        layout: ``"BHSD"`` or ``"BSHD"``.
        scale: default ``1 / sqrt(head_dim)``.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        chunk_size: int | None = None,
        layout: str = "BHSD",
        scale: float | None = None,
    ):
        super().__init__(num_heads, head_dim, layout, scale)
        self.chunk_size = chunk_size

    def __call__(self, q, k, v) -> mx.array:
        self._check(q)
        return chunked_cross_attention(
            q, k, v, chunk_size=self.chunk_size, scale=self.scale, layout=self.layout
        )
