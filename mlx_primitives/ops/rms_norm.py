"""RMS normalization over the last axis: ``x / sqrt(mean(x**2) + eps) * weight``."""

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

NAME = "rms_norm"
DIMS = (Dim("rows"), Dim("dims", EXACT), Dim("weight", EXACT))


def _problem(x, weight, eps):
    dtype, shape = check_array(NAME, "x", x)
    n = shape[-1]
    weight_dtype = check_vector(NAME, "weight", weight, n, mlx_takes_any=True)
    mlx_only(NAME, weight_dtype, check_real(NAME, "eps", eps, mlx_takes_any=True))
    return dtype, (bucket(x.size // n), n, weight_dtype)


def reference(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """The composition: statistics and scaling in float32 (float64 for float64 inputs)."""
    out_dtype = norm_dtype(x, weight)
    acc = accumulator(out_dtype)
    xf = x.astype(acc)
    y = xf * mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(acc)
    return y.astype(out_dtype)


def _example(shapes, dtype, key, weight=None):
    k1, k2 = mx.random.split(key)
    x_shape = tuple(shapes[0])
    w_shape = tuple(shapes[1]) if len(shapes) > 1 else x_shape[-1:]
    w = vector_example(weight, w_shape, dtype, k2, 0.1, 1.0)
    return random(x_shape, dtype, k1), w, 1e-5


def _case(p):
    return ((p["rows"], p["dims"]),), {"weight": p["weight"]}


def _default(problem, backend):
    return "builtin", {}


def rms_norm(
    x: mx.array, weight: mx.array | None, eps: float = 1e-5, *, stream: mx.Stream | None = None
) -> mx.array:
    """Root mean square normalization over the last axis, like ``mx.fast.rms_norm``.

    .. math:: y = \\frac{x}{\\sqrt{\\mathrm{mean}(x^2) + \\epsilon}} \\cdot w

    Args:
        x: input of any shape; normalized over its last axis.
        weight: scale of shape ``(x.shape[-1],)``, or None for no scaling.
        eps: added to the mean square for numerical stability.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(x, weight, eps, stream)


OP = register(
    Op(
        NAME,
        signature=rms_norm,
        dims=DIMS,
        problem=_problem,
        # What the variants do not model (an integer weight, a negative eps): MLX's op.
        outside=MLX_FAST["rms_norm"],
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            # MLX's function takes the op's arguments in their order: no wrapper to call.
            *mlx_variants(reference, MLX_FAST["rms_norm"], "mx.fast.rms_norm"),
            *norm_variants(NAME, reference, ("w",)),
        ],
        presets=row_presets(
            4096, (1, 64, 1024, 16384), ((64, 512), (512, 1024)), (768, 1024, 2048, 5120, 8192)
        ),
        differentiable=(0, 1),
    )
)
