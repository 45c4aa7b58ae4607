"""Gated feed-forward blocks: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import dispatch, recording
from ..ops import geglu, quantized_matmul, swiglu
from ..ops._common import check_int
from ..ops.gated import APPROXIMATIONS
from .quantized import QuantizedLinear

# Up to this many rows (decoding) a SwiGLU block of three quantized or three float layers runs
# as one compiled call: its three projections and gate, with the variants the dispatch chose
# for them, built as one graph node instead of four.
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
        gate, up, down = self["gate_proj"], self["up_proj"], self["down_proj"]
        if (
            x.__class__ is mx.array
            and x.size <= FUSED_MAX_ROWS * x.shape[-1]
            and not recording.active()  # each projection's call counted
        ):
            # The compiled call for these layers, kept until a layer or a decision changes.
            generation, fused = dispatch._generation, self.__dict__.get("_fused")
            if (
                fused is None
                or fused[3] != generation
                or fused[0] is not gate
                or fused[1] is not up
                or fused[2] is not down
            ):
                fused = self.__dict__["_fused"] = (gate, up, down, generation,
                                                   *_fused(gate, up, down, generation))  # fmt: skip
            fn, names = fused[4], fused[5]
            if fn is not None:
                return fn(x, *[layer[name] for layer in (gate, up, down) for name in names])
        return down(swiglu(gate(x), up(x)))


# The compiled blocks by the kind of their layers, for one generation of the dispatch's
# decisions (a compiled block keeps the variants it traced).
_compiled: dict[tuple, Callable] = {}
_generation = [-1]


def _fused(gate: nn.Module, up: nn.Module, down: nn.Module, generation: int) -> tuple:
    """The compiled call serving a block of these layers while the dispatch's decisions are of
    ``generation``, and the names of the arrays it takes from each layer after the input; no
    call where the layers are not three of one kind."""
    kinds = {_kind(gate), _kind(up), _kind(down)}
    if len(kinds) != 1 or None in kinds:
        return None, ()
    (kind,) = kinds
    if _generation[0] != generation:
        _compiled.clear()
        _generation[0] = generation
    fn = _compiled.get(kind)
    if fn is None:
        fn = _compiled[kind] = mx.compile(_block(kind))
    names = ("weight", "scales", "biases") if kind[0] == "quantized" else ("weight",)
    return fn, names + ("bias",) * kind[-1]


def _kind(layer: nn.Module) -> tuple | None:
    """What a compiled block needs to know of ``layer``: its kind, quantization and bias."""
    bias = "bias" in layer
    if type(layer) is nn.Linear:
        return ("linear", bias)
    if type(layer) in (QuantizedLinear, nn.QuantizedLinear) and layer.mode == "affine":
        return ("quantized", layer.group_size, layer.bits, bias)
    return None


def _block(kind: tuple) -> Callable:
    """The block's forward as a function of its arrays, for layers of ``kind``; each
    projection as its layer computes it."""
    if kind[0] == "linear":

        def project(x, weight, bias=None):
            return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)

        width = 2
    else:
        _, group_size, bits, _ = kind

        def project(x, weight, scales, biases, bias=None):
            y = quantized_matmul(x, weight, scales, biases, True, group_size, bits, "affine")
            return y if bias is None else y + bias

        width = 4
    width -= not kind[-1]

    def forward(x, *arrays):
        gate, up, down = (arrays[i : i + width] for i in range(0, 3 * width, width))
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
