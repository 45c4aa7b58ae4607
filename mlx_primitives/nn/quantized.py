"""Quantized linear layers, a drop-in for ``mlx.nn.QuantizedLinear``."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..dispatch import Routes
from ..ops.quantized_matmul import MLX_QUANTIZED_MATMUL, MODES, OP, quantized_matmul

# The layers' calls routed, shared: a route depends on the problem alone (MLX's op where no
# record could route the dtype's calls elsewhere).
_ROUTES = Routes(MLX_QUANTIZED_MATMUL)


class QuantizedLinear(nn.QuantizedLinear):
    """An affine map with a quantized weight matrix, ``x @ W.T + bias``, ``W`` packed as by
    ``mx.quantize``. Its parameters have the names and shapes of ``mlx.nn.QuantizedLinear``'s
    (``weight``, ``scales``, ``biases``, ``bias``), so that weights saved from one load into
    the other; like it, the layer is frozen. A subclass of it, so that code that asks whether
    a layer is quantized (mlx-lm's LoRA) finds it is.

    Args:
        input_dims: the input's features.
        output_dims: the output's features.
        bias: learn an additive bias.
        group_size: values per scale (and bias) of the quantized weight (default: the mode's).
        bits: bits per quantized value (default: the mode's).
        mode: the quantization mode (see ``mx.quantize``).
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ):
        nn.Module.__init__(self)  # the parameters as nn.QuantizedLinear makes them, our errors
        if mode not in MODES:
            raise ValueError(f"[QuantizedLinear] mode must be one of {list(MODES)}, got {mode!r}")
        default_group_size, default_bits = MODES[mode]
        self.group_size = group_size or default_group_size
        self.bits = bits or default_bits
        self.mode = mode
        scale = math.sqrt(1 / input_dims)
        weight = mx.random.uniform(low=-scale, high=scale, shape=(output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        self.biases = biases[0] if biases else None
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def _extra_repr(self) -> str:
        out_dims, in_dims = self.weight.shape
        return (
            f"input_dims={in_dims * 32 // self.bits}, output_dims={out_dims}, "
            f"bias={'bias' in self}, group_size={self.group_size}, bits={self.bits}, "
            f"mode={self.mode}"
        )

    def __call__(self, x: mx.array) -> mx.array:
        weight, scales, biases = self["weight"], self["scales"], self.get("biases")
        args = (x, weight, scales, biases, True, self.group_size, self.bits, self.mode)
        if x.__class__ is mx.array:
            # What changes between a layer's calls (the input) and between layers: the
            # routes are shared, and a route is checked for one layer's dtypes and shapes.
            key = (
                x.shape,
                x.dtype,
                weight.shape,
                scales.shape,
                scales.dtype,
                None if biases is None else biases.dtype,
                self.group_size,
                self.bits,
                self.mode,
            )
            y = _ROUTES.serving(key, OP, args)(*args)
        else:
            y = quantized_matmul(*args)  # the op's own error
        return y + self["bias"] if "bias" in self else y

    @classmethod
    def from_linear(
        cls,
        linear_layer: nn.Module,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ) -> QuantizedLinear:
        """The layer quantizing ``linear_layer`` (an ``nn.Linear``: its weight and bias)."""
        output_dims, input_dims = linear_layer.weight.shape
        layer = cls(input_dims, output_dims, False, group_size, bits, mode)
        layer.weight, layer.scales, *biases = mx.quantize(
            linear_layer.weight, group_size, bits, mode=mode
        )
        layer.biases = biases[0] if biases else None
        if "bias" in linear_layer:
            layer.bias = linear_layer.bias
        return layer
