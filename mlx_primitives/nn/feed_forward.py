"""Gated feed-forward blocks: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops import geglu, swiglu
from ..ops._common import check_int
from ..ops.gated import APPROXIMATIONS


class _GatedFeedForward(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, bias: bool = False):
        super().__init__()
        for name, value in (("dims", dims), ("hidden_dims", hidden_dims)):
            check_int(type(self).__name__, name, value, minimum=1)
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=bias)


class SwiGLU(_GatedFeedForward):
    """SwiGLU feed-forward block (as in LLaMA): ``down(silu(gate(x)) * up(x))``.

    Args:
        dims: input and output features.
        hidden_dims: features of the gate and up projections.
        bias: whether the projections have biases.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class GeGLU(_GatedFeedForward):
    """GeGLU feed-forward block: ``down(gelu(gate(x)) * up(x))``.

    Args:
        dims: input and output features.
        hidden_dims: features of the gate and up projections.
        bias: whether the projections have biases.
        approximate: the GELU form, see :func:`mlx_primitives.geglu`.
    """

    def __init__(self, dims: int, hidden_dims: int, bias: bool = False, approximate: str = "none"):
        super().__init__(dims, hidden_dims, bias)
        if approximate not in APPROXIMATIONS:
            raise ValueError(
                f"[GeGLU] approximate must be one of {list(APPROXIMATIONS)}, got {approximate!r}"
            )
        self.approximate = approximate

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), self.approximate))
