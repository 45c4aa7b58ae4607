"""Prefix scans of an associative operation along an axis: add, mul, max, min, logaddexp, in the
input's dtype, accumulated in float32."""

from __future__ import annotations

import math

import mlx.core as mx

from ..problem import EXACT, Dim, bucket
from ..registry import Example, Op, Variant, register
from ._common import accumulator, check_array, check_bool, check_choice, random
from ._scan import check_axis, doubling, from_front, to_front

NAME = "associative_scan"
DIMS = (
    Dim("rows"),
    Dim("length"),
    Dim("op", EXACT),
    Dim("reverse", EXACT),
    Dim("inclusive", EXACT),
)
# Each operation: MLX's scan, the binary function, and its identity (an exclusive scan's
# first element).
OPS = {
    "add": (mx.cumsum, mx.add, 0.0),
    "mul": (mx.cumprod, mx.multiply, 1.0),
    "max": (mx.cummax, mx.maximum, -math.inf),
    "min": (mx.cummin, mx.minimum, math.inf),
    "logaddexp": (mx.logcumsumexp, mx.logaddexp, -math.inf),
}


def _problem(x, op, axis, reverse, inclusive):
    dtype, shape = check_array(NAME, "x", x)
    check_choice(NAME, "op", op, tuple(OPS))
    axis = check_axis(NAME, axis, len(shape))
    check_bool(NAME, "reverse", reverse)
    check_bool(NAME, "inclusive", inclusive)
    length = shape[axis]
    return dtype, (bucket(x.size // length), bucket(length), op, reverse, inclusive)


def _builtin(x, op, axis, reverse, inclusive):
    """MLX's scan (``mx.cumsum``, ...), on float32 copies of 16-bit inputs."""
    acc = accumulator(x.dtype)
    scan = OPS[op][0]
    return scan(x.astype(acc), axis=axis, reverse=reverse, inclusive=inclusive).astype(x.dtype)


def _doubling(x, op, axis, reverse, inclusive):
    """The doubling (Hillis-Steele) scan of the operation in float32, shifted by its identity
    for an exclusive scan."""
    _, combine, identity = OPS[op]
    front = to_front(x.astype(accumulator(x.dtype)), axis, reverse)
    if not inclusive:
        first = mx.full((1, *front.shape[1:]), identity, front.dtype)
        front = mx.concatenate([first, front[:-1]])
    (out,) = doubling((front,), lambda e, later: (combine(e[0], later[0]),))
    return from_front(out, axis, reverse).astype(x.dtype)


def reference(x, op, axis, reverse, inclusive):
    """MLX's scan in float32 (float64 for float64 inputs)."""
    return _builtin(x, op, axis, reverse, inclusive)


def _default(problem, backend):
    return "builtin", {}


def _example(shapes, dtype, key, op="add", axis=-1, reverse=False, inclusive=True):
    x = random(tuple(shapes[0]), dtype, key)
    if op == "mul":  # products of values near 1 stay finite over long axes
        x = (1 + 0.01 * x.astype(mx.float32)).astype(dtype)
    return x, op, axis, reverse, inclusive


def _case(p):
    options = {k: p[k] for k in ("op", "reverse", "inclusive")}
    return ((p["rows"], p["length"]),), options


def associative_scan(
    x: mx.array,
    op: str = "add",
    *,
    axis: int = -1,
    reverse: bool = False,
    inclusive: bool = True,
    stream: mx.Stream | None = None,
) -> mx.array:
    """The prefix scan of ``op`` along ``axis``: position ``t`` combines positions ``0..t``
    (``0..t-1`` when not ``inclusive``; from the end when ``reverse``), like ``mx.cumsum`` and
    its kin, in ``x``'s dtype, accumulated in float32.

    Args:
        x: the input.
        op: ``"add"``, ``"mul"``, ``"max"``, ``"min"`` or ``"logaddexp"``.
        axis: the axis to scan.
        reverse: scan from the last position to the first.
        inclusive: include each position's own value.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(x, op, axis, reverse, inclusive, stream)


def _presets() -> dict:
    def ex(rows, length, dtype, **options):
        return Example(((rows, length),), dtype, tuple(options.items()))

    default = [ex(r, n, t, op=o) for r, n in ((4096, 512), (256, 8192))
               for t in ("float16", "bfloat16") for o in ("add", "logaddexp")]  # fmt: skip
    quick = [ex(64, 256, "float32"), ex(16, 1000, "float32", op="max", reverse=True)]
    full = default + [ex(1024, 2048, "float32", op=o) for o in OPS]
    return {"quick": quick, "default": default, "full": full}


OP = register(
    Op(
        NAME,
        signature=associative_scan,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            Variant("builtin", lambda: _builtin, description="mx.cumsum and its kin"),
            Variant("doubling", lambda: _doubling, description="log2(length) doubling steps"),
        ],
        presets=_presets(),
    )
)
