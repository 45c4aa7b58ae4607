"""Gated feed-forward blocks: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import recording
from ..ops import geglu, quantized_matmul, swiglu
from ..ops._common import check_int
from ..ops.gated import APPROXIMATIONS
from . import _fused
from .quantized import QuantizedLinear

# Up to this many rows (decoding) a SwiGLU block of three quantized or three float layers runs
# as one compiled call: its three projections and gate, with the variants the dispatch chose
# for them (nn/_fused.py).
FUSED_MAX_ROWS = 64


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
        if (
            x.__class__ is mx.array
            and x.size <= FUSED_MAX_ROWS * x.shape[-1]
            and not recording.active()  # each projection's call counted
        ):
            fused = _fused.serving(self, _kind, _block)
            if fused is not None:
                return fused[0](x, *fused[1])
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _kind(layer: nn.Module) -> tuple | None:
    return _fused.layer_kind(layer, nn.Linear, (QuantizedLinear, nn.QuantizedLinear))


def _block(kind: tuple) -> Callable:
    """The block's forward as a function of its arrays, for layers of ``kind``; each
    projection as its layer computes it."""
    if kind[0] == "linear":

        def project(x, weight, bias=None):
            return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)

    else:
        _, group_size, bits, _ = kind

        def project(x, weight, scales, biases, bias=None):
            y = quantized_matmul(x, weight, scales, biases, True, group_size, bits, "affine")
            return y if bias is None else y + bias

    def forward(x, *arrays):
        gate, up, down = _fused.per_layer(kind, arrays)
        return project(swiglu(project(x, *gate), project(x, *up)), *down)

    return forward


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
