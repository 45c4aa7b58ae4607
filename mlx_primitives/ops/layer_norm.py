"""Layer normalization over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

from __future__ import annotations

import mlx.core as mx

from ..patch import MLX_FAST
from ..problem import EXACT, Dim, bucket
from ..registry import Op, register
from ._common import (
    accumulator,
    check_array,
    check_real,
    check_vector,
    mlx_only,
    mlx_variants,
    norm_dtype,
    random,
    row_presets,
    vector_example,
)
from ._norm_kernels import norm_variants

NAME = "layer_norm"
DIMS = (Dim("rows"), Dim("dims", EXACT), Dim("weight", EXACT), Dim("bias", EXACT))


def _problem(x, weight, bias, eps):
    dtype, shape = check_array(NAME, "x", x)
    n = shape[-1]
    weight_dtype = check_vector(NAME, "weight", weight, n, mlx_takes_any=True)
    bias_dtype = check_vector(NAME, "bias", bias, n, mlx_takes_any=True)
    mlx_only(NAME, weight_dtype, bias_dtype, check_real(NAME, "eps", eps, mlx_takes_any=True))
    return dtype, (bucket(x.size // n), n, weight_dtype, bias_dtype)


def reference(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """The composition: mean and variance in float32 (float64 for float64 inputs)."""
    out_dtype = norm_dtype(x, weight, bias)
    acc = accumulator(out_dtype)
    xf = x.astype(acc)
    mean = mx.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    y = centered * mx.rsqrt(mx.mean(mx.square(centered), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(acc)
    if bias is not None:
        y = y + bias.astype(acc)
    return y.astype(out_dtype)


def _example(shapes, dtype, key, weight=None, bias=None):
    k1, k2, k3 = mx.random.split(key, 3)
    x_shape = tuple(shapes[0])
    d = x_shape[-1:]
    w_shape = tuple(shapes[1]) if len(shapes) > 1 else d
    b_shape = tuple(shapes[2]) if len(shapes) > 2 else d
    # A non-zero mean makes one-pass variance formulas show their cancellation error.
    x = random(x_shape, dtype, k1, 1.0, 0.5)
    w = vector_example(weight, w_shape, dtype, k2, 0.1, 1.0)
    b = vector_example(bias, b_shape, dtype, k3, 0.1, 0.0)
    return x, w, b, 1e-5


def _case(p):
    return ((p["rows"], p["dims"]),), {"weight": p["weight"], "bias": p["bias"]}


def _default(problem, backend):
    return "builtin", {}


def layer_norm(
    x: mx.array,
    weight: mx.array | None,
    bias: mx.array | None,
    eps: float = 1e-5,
    *,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Layer normalization over the last axis, like ``mx.fast.layer_norm``.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\cdot w + b

    Args:
        x: input of any shape; normalized over its last axis.
        weight: scale of shape ``(x.shape[-1],)``, or None.
        bias: shift of shape ``(x.shape[-1],)``, or None.
        eps: added to the variance for numerical stability.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(x, weight, bias, eps, stream)


OP = register(
    Op(
        NAME,
        signature=layer_norm,
        dims=DIMS,
        problem=_problem,
        # What the variants do not model (an integer weight, a negative eps): MLX's op.
        outside=MLX_FAST["layer_norm"],
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            # MLX's function takes the op's arguments in their order: no wrapper to call.
            *mlx_variants(reference, MLX_FAST["layer_norm"], "mx.fast.layer_norm"),
            *norm_variants(NAME, reference, ("w", "b")),
        ],
        presets=row_presets(
            4096, (1, 64, 1024, 16384), ((64, 512), (512, 1024)), (768, 1024, 2048, 5120, 8192)
        ),
        differentiable=(0, 1, 2),
    )
)
