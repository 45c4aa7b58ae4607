"""Rotary positional encoding layer, a drop-in for ``mlx.nn.RoPE``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops import rope
from ..ops._common import check_bool, check_choice, check_int, check_real
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
        check_choice("RoPE", "layout", layout, LAYOUTS)
        if check_int("RoPE", "dims", dims, minimum=2) % 2:
            raise ValueError(f"[RoPE] dims must be even, got {dims}")
        check_bool("RoPE", "traditional", traditional)
        for name, value in (("base", base), ("scale", scale)):
            check_real("RoPE", name, value, positive=True)
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
