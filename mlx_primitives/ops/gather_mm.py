"""Matrix products with a gather of the matrices, like ``mx.gather_mm``: the mixture-of-experts
product of unquantized experts."""

from __future__ import annotations

import math

import mlx.core as mx

from ..patch import mlx_own
from ..problem import EXACT, Dim, Unmodelled
from ..registry import Example, Op, Variant, register
from ._common import accumulator, check_array, check_bool, random
from ._gather import (
    by_matrix,
    check_indices,
    check_slices,
    pair_count,
    pair_shape,
    pairs,
    take_fits,
    unsort,
)

NAME = "gather_mm"

MLX_GATHER_MM = mlx_own(mx, "gather_mm")

DIMS = (
    Dim("pairs"),
    Dim("experts", EXACT),
    Dim("in_features", EXACT),
    Dim("out_features", EXACT),
    Dim("sorted", EXACT),
)

_ARRAY = mx.array


def _problem(a, b, lhs_indices, rhs_indices, sorted_indices):
    if not (
        _ARRAY is a.__class__ is b.__class__
        and a.ndim >= 2
        and a.shape[-2] == 1
        and b.ndim == 3
        and a.dtype == b.dtype
        and (lhs_indices is not None or rhs_indices is not None)
    ):
        raise Unmodelled(
            f"[{NAME}] the variants model one row per pair (a.shape[-2] == 1), b of shape "
            "(experts, in, out) and a's dtype, and calls with lhs_indices or rhs_indices"
        )
    dtype, shape = check_array(NAME, "a", a, min_ndim=2)
    _, b_shape = check_array(NAME, "b", b, min_ndim=3)
    check_bool(NAME, "sorted_indices", sorted_indices)
    experts, in_features, out_features = b_shape
    if shape[-1] != in_features:
        raise ValueError(f"[{NAME}] a has {shape[-1]} features, expected {in_features} from b")
    lhs = check_indices(NAME, "lhs_indices", lhs_indices)
    rhs = check_indices(NAME, "rhs_indices", rhs_indices)
    batch = pair_shape(NAME, shape[:-2], lhs, rhs, experts)
    return dtype, (pair_count(batch), experts, in_features, out_features, sorted_indices)


def _take_then_matmul(a, b, lhs_indices, rhs_indices, sorted_indices):
    """Each pair's matrix taken, then one batched matmul in float32 (float64 for float64):
    every dtype on every device, for small calls (it copies a matrix per pair)."""
    acc = accumulator(a.dtype)
    rows, experts, shape = pairs(a, lhs_indices, rhs_indices, b.shape[0])
    a2 = a.reshape(-1, 1, a.shape[-1]).astype(acc)
    y = (a2[rows] @ b[experts].astype(acc)).reshape(*shape, 1, b.shape[-1])
    return y.astype(a.dtype)


def _upcast(a, b, lhs_indices, rhs_indices, sorted_indices):
    """MLX's ``gather_mm`` on float32 copies (its CPU kernel takes float32 only)."""
    f32 = mx.float32
    y = MLX_GATHER_MM(
        a.astype(f32), b.astype(f32), lhs_indices, rhs_indices, sorted_indices=sorted_indices
    )
    return y.astype(a.dtype)


def reference(a, b, lhs_indices, rhs_indices, sorted_indices):
    """MLX's ``gather_mm`` in float32; in float64 (which it does not take), each pair's
    matrix taken and one batched matmul."""
    if a.dtype == mx.float64:
        return _take_then_matmul(a, b, lhs_indices, rhs_indices, sorted_indices)
    return _upcast(a, b, lhs_indices, rhs_indices, sorted_indices)


def _builtin(a, b, lhs_indices, rhs_indices, sorted_indices):
    return MLX_GATHER_MM(a, b, lhs_indices, rhs_indices, sorted_indices=sorted_indices)


def _sort_then_gather(a, b, lhs_indices, rhs_indices, sorted_indices):
    """The pairs sorted by expert, MLX's op told they are, and the rows put back in order."""
    rows, experts, shape = pairs(a, lhs_indices, rhs_indices, b.shape[0])
    rows, experts, order = by_matrix(rows, experts, sorted_indices)
    a_sorted = a.reshape(-1, 1, a.shape[-1])[rows]
    y = MLX_GATHER_MM(a_sorted, b, None, experts, sorted_indices=True)
    return unsort(y, order).reshape(*shape, 1, b.shape[-1])


def _check_slices(args):
    a, b, lhs, rhs, sorted_indices = args

    def call(rows, used, cols, indices):
        return rows, b[used][..., cols], None, indices, sorted_indices

    return check_slices(a, lhs, rhs, b.shape[0], b.shape[-1], call)


def _default(problem, backend):
    if problem["dtype"] == "float64":
        return "take", {}
    # MLX's CPU gather_mm takes float32 only.
    return ("upcast" if backend == "cpu" and problem["dtype"] != "float32" else "builtin"), {}


def _example(shapes, dtype, key, top_k=1, sorted_indices=False):
    """``shapes``: a's ``(tokens, in_features)``, then b's ``(experts, in, out)``; called as
    mlx-lm's SwitchLinear calls it (b a transposed view of the ``(experts, out, in)``
    weights)."""
    k1, k2, k3 = mx.random.split(key, 3)
    tokens, k = shapes[0]
    experts, _, out = shapes[1]
    weight = (mx.random.normal((experts, out, k), key=k2) / math.sqrt(k)).astype(dtype)
    routes = mx.argsort(mx.random.uniform(shape=(tokens, experts), key=k3), axis=-1)
    routes = routes[:, :top_k].astype(mx.uint32)
    if sorted_indices:
        flat = routes.reshape(-1)
        a = random((tokens * top_k, 1, k), dtype, k1)
        return a, weight.swapaxes(-1, -2), None, flat[mx.argsort(flat)], True
    return random((tokens, 1, 1, k), dtype, k1), weight.swapaxes(-1, -2), None, routes, False


def _case(p):
    shapes = ((p["pairs"], p["in_features"]), (p["experts"], p["in_features"], p["out_features"]))
    return shapes, {"sorted_indices": p["sorted"]}


def _ex(tokens, experts, top_k, k, n, dtype="bfloat16", sorted_indices=False) -> Example:
    options = (("top_k", top_k),) + ((("sorted_indices", True),) if sorted_indices else ())
    return Example(((tokens, k), (experts, k, n)), dtype, options)


def _presets() -> dict:
    from .gather_qmm import MODELS

    default = [_ex(t, e, k, i, o) for t in (1, 8) for e, k, i, o in MODELS]
    default += [_ex(512 * k, e, k, i, o, sorted_indices=True) for e, k, i, o in MODELS]
    full = default + [
        _ex(t, e, k, i, o, "float16") for t in (1, 2, 4, 8) for e, k, i, o in MODELS
    ]  # fmt: skip
    quick = [
        _ex(1, 8, 2, 256, 128, "float32"),
        _ex(64, 8, 2, 256, 128, "float32", sorted_indices=True),
    ]
    return {"quick": quick, "default": default, "full": list(dict.fromkeys(full))}


def gather_mm(
    a: mx.array,
    b: mx.array,
    /,
    lhs_indices: mx.array | None = None,
    rhs_indices: mx.array | None = None,
    *,
    sorted_indices: bool = False,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Matrix products with a gather of both operands, like ``mx.gather_mm``: block
    ``lhs_indices[i]`` of ``a`` (its batch dims flattened) times matrix ``rhs_indices[i]`` of
    ``b``, for each ``i`` of the two indices broadcast (an absent index takes every batch entry
    in order).

    Args:
        a: input, ``(..., M, K)``.
        b: the matrices, ``(..., K, N)``.
        lhs_indices: integer indices into the batch entries of ``a``.
        rhs_indices: integer indices into the batch entries of ``b``.
        sorted_indices: the indices are in ascending order (a promise some variants use).
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(a, b, lhs_indices, rhs_indices, sorted_indices, stream)


def _served_by_mlx(a, b, lhs_indices, rhs_indices, sorted_indices):
    """MLX's own op, for the calls the variants do not model, with its own errors."""
    return MLX_GATHER_MM(a, b, lhs_indices, rhs_indices, sorted_indices=sorted_indices)


OP = register(
    Op(
        NAME,
        signature=gather_mm,
        dims=DIMS,
        problem=_problem,
        outside=_served_by_mlx,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            Variant("builtin", lambda: _builtin, description="mx.gather_mm"),
            Variant(
                "sort",
                lambda: _sort_then_gather,
                description="pairs sorted by expert, then mx.gather_mm told so",
            ),
            Variant(
                "upcast",
                lambda: _upcast,
                description="mx.gather_mm on float32 copies",
            ),
            Variant(
                "take",
                lambda: _take_then_matmul,
                supports=take_fits,
                description="each pair's matrix taken, then a batched matmul",
            ),
        ],
        presets=_presets(),
        differentiable=(0, 1),
        check_slices=_check_slices,
        # The output is not shaped like a (top-k pairs per token).
        feed=None,
    )
)
