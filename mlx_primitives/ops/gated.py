"""Gated activations of feed-forward blocks: ``swiglu = silu(gate) * up`` and
``geglu = gelu(gate) * up``."""

from __future__ import annotations

import math

import mlx.core as mx

from ..dialect.kernel import with_reference_transforms
from ..problem import EXACT, Dim, Unmodelled, bucket
from ..registry import Op, register
from ._common import accumulator, check_array, check_choice, mlx_variants, random, row_presets
from ._gated_kernels import gated_variants

APPROXIMATIONS = ("none", "tanh", "fast")
DIMS = (Dim("rows"), Dim("dims", EXACT))
GELU_DIMS = (*DIMS, Dim("approximate", EXACT))


def _rows(name: str, gate, up) -> tuple[str, tuple]:
    dtype, shape = check_array(name, "gate", gate)
    up_dtype, up_shape = check_array(name, "up", up)
    if up_shape != shape or up_dtype != dtype:
        try:
            mx.broadcast_shapes(shape, up_shape)
        except ValueError:
            raise ValueError(
                f"[{name}] up has shape {up_shape}, which does not broadcast with gate's {shape}"
            ) from None
        raise Unmodelled(f"[{name}] the variants model a gate and up of one shape and dtype")
    return dtype, (bucket(gate.size // shape[-1]), shape[-1])


def _swiglu_outside(gate, up):
    """Gates and ups that broadcast or differ in dtype: MLX's arithmetic, as mlx-lm's swiglu
    computes them."""
    return gate * mx.sigmoid(gate) * up


def _geglu_outside(gate, up, approximate):
    return gelu(gate, approximate) * up


def _swiglu_problem(gate, up):
    return _rows("swiglu", gate, up)


def _geglu_problem(gate, up, approximate):
    check_choice("geglu", "approximate", approximate, APPROXIMATIONS)
    dtype, values = _rows("geglu", gate, up)
    return dtype, (*values, approximate)


def swiglu_reference(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` computed in float32 (float64 for float64 inputs)."""
    acc = accumulator(gate.dtype)
    g = gate.astype(acc)
    return (g * mx.sigmoid(g) * up.astype(acc)).astype(gate.dtype)


def gelu(g: mx.array, approximate: str) -> mx.array:
    """GELU of ``g`` in ``g``'s dtype: exact (erf), ``tanh`` or the ``fast`` sigmoid form."""
    if approximate == "tanh":
        return 0.5 * g * (1 + mx.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    if approximate == "fast":
        return g * mx.sigmoid(1.702 * g)
    return 0.5 * g * (1 + mx.erf(g / math.sqrt(2)))


def geglu_reference(gate: mx.array, up: mx.array, approximate: str) -> mx.array:
    """``gelu(gate) * up`` computed in float32 (float64 for float64 inputs)."""
    acc = accumulator(gate.dtype)
    return (gelu(gate.astype(acc), approximate) * up.astype(acc)).astype(gate.dtype)


def _swiglu_kernel(forward):
    fn = with_reference_transforms(forward, lambda gate, up, act: swiglu_reference(gate, up))
    return lambda gate, up: fn(gate, up, "silu")


def _geglu_kernel(forward):
    return with_reference_transforms(forward, geglu_reference)


def _example(shapes, dtype, key, **options):
    k1, k2 = mx.random.split(key)
    shape = tuple(shapes[0])
    return (random(shape, dtype, k1, 2.0), random(shape, dtype, k2), *options.values())


def _case(p):
    options = {"approximate": p["approximate"]} if "approximate" in p else {}
    return ((p["rows"], p["dims"]),), options


def _default(problem, backend):
    return "compiled", {}


def _presets(**options):
    return row_presets(
        14336,
        (1, 64, 16384),
        ((64, 1024), (512, 2048)),
        (2048, 4096, 5632, 8192, 11008),
        tuple(options.items()),
    )


def swiglu(gate: mx.array, up: mx.array, *, stream: mx.Stream | None = None) -> mx.array:
    """``silu(gate) * up``, the gate of SwiGLU feed-forward blocks.

    Args:
        gate: the gate projection's output.
        up: the up projection's output: ``gate``'s shape and dtype, or else any that
            broadcasts with it (then computed as MLX multiplies, promoting the dtypes).
        stream: the stream or device to run on (default: the default stream).
    """
    return SWIGLU.serve(gate, up, stream)


def geglu(
    gate: mx.array,
    up: mx.array,
    approximate: str = "none",
    *,
    stream: mx.Stream | None = None,
) -> mx.array:
    """``gelu(gate) * up``, the gate of GeGLU feed-forward blocks.

    Args:
        gate: the gate projection's output.
        up: the up projection's output: ``gate``'s shape and dtype, or else any that
            broadcasts with it (then computed as MLX multiplies, promoting the dtypes).
        approximate: ``"none"`` for the exact erf GELU (like ``mlx.nn.gelu``), ``"tanh"``
            (like ``mlx.nn.gelu_approx``) or ``"fast"`` (like ``mlx.nn.gelu_fast_approx``).
        stream: the stream or device to run on (default: the default stream).
    """
    return GEGLU.serve(gate, up, approximate, stream)


# Outputs fed back as the next gate grow to inf in float16 within a timing chain, and the
# kernels' division then takes its slow path for special values; fed back as `up` they are
# only multiplied, so timing feeds that argument.
SWIGLU = register(
    Op(
        "swiglu",
        signature=swiglu,
        dims=DIMS,
        problem=_swiglu_problem,
        outside=_swiglu_outside,
        reference=swiglu_reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[*mlx_variants(swiglu_reference), *gated_variants(_swiglu_kernel)],
        presets=_presets(),
        differentiable=(0, 1),
        feed=1,
    )
)

GEGLU = register(
    Op(
        "geglu",
        signature=geglu,
        dims=GELU_DIMS,
        problem=_geglu_problem,
        outside=_geglu_outside,
        reference=geglu_reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[*mlx_variants(geglu_reference), *gated_variants(_geglu_kernel)],
        presets=_presets(approximate="none"),
        differentiable=(0, 1),
        feed=1,
    )
)
