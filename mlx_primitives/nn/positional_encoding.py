"""Rotary positional encoding layer, a drop-in for ``mlx.nn.RoPE``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops import rope
from ..ops.rope import LAYOUTS


class RoPE(nn.Module):
    """Rotary positional encoding.

    Args:
        dims: how many leading features are rotated.
        traditional: rotate consecutive pairs instead of halves.
        base: frequency base.
        scale: positions are multiplied by this.
        layout: ``"BHSD"`` (like ``mlx.nn.RoPE``) or ``"BSHD"`` for ``(B, S, H, D)`` inputs.
    """

    def __init__(
        self,
        dims: int,
        traditional: bool = False,
        base: float = 10000,
        scale: float = 1.0,
        layout: str = "BHSD",
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"[RoPE] layout must be one of {list(LAYOUTS)}, got {layout!r}")
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 2 or dims % 2:
            raise ValueError(f"[RoPE] dims must be an even int of at least 2, got {dims!r}")
        if not isinstance(traditional, bool):
            raise ValueError(f"[RoPE] traditional must be a bool, got {traditional!r}")
        for name, value in (("base", base), ("scale", scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"[RoPE] {name} must be a positive number, got {value!r}")
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.scale = scale
        self.layout = layout

    def _extra_repr(self) -> str:
        return f"{self.dims}, traditional={self.traditional}, layout={self.layout}"

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
            layout=self.layout,
        )
