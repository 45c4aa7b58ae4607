"""Quantized matrix products with a gather of the matrices, like ``mx.gather_qmm``: the
mixture-of-experts product, each token's row times the weights of each expert routed to it."""

from __future__ import annotations

import math

import mlx.core as mx

from ..patch import mlx_own
from ..problem import EXACT, Dim, Unmodelled
from ..registry import GPU_BACKENDS, Example, Op, Variant, register
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
from ._quantized_kernels import gather_mma_variant, gather_qmv_variant
from .quantized_matmul import (
    MODES,
    TOLERANCES,
    check_packed,
    mlx_default,
    mlx_serves,
    sizes,
)

NAME = "gather_qmm"

MLX_GATHER_QMM = mlx_own(mx, "gather_qmm")

DIMS = (
    Dim("pairs"),
    Dim("experts", EXACT),
    Dim("in_features", EXACT),
    Dim("out_features", EXACT),
    Dim("bits", EXACT),
    Dim("group_size", EXACT),
    Dim("sorted", EXACT),
)
_ARRAY = mx.array


def _problem(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices,
):  # fmt: skip
    if not (
        _ARRAY is x.__class__ is w.__class__ is scales.__class__ is biases.__class__
        and w.ndim == 3
        and x.ndim >= 2
        and x.dtype == scales.dtype == biases.dtype
    ):
        raise Unmodelled(
            f"[{NAME}] the variants model arrays x, w (3-D), scales and biases of one dtype"
        )
    dtype, shape = check_array(NAME, "x", x, min_ndim=2)
    if mode != "affine" or global_scale is not None:
        raise Unmodelled(f"[{NAME}] the variants model mode='affine' without a global_scale")
    if transpose is not True:
        raise Unmodelled(f"[{NAME}] the variants model transpose=True")
    check_bool(NAME, "sorted_indices", sorted_indices)
    if shape[-2] != 1:
        raise Unmodelled(
            f"[{NAME}] the variants model one row per pair (x.shape[-2] == 1), got {shape}"
        )
    group_size, bits = sizes(group_size, bits, NAME)
    (experts, out_features), in_features = check_packed(
        NAME, w, scales, biases, group_size, bits, ndim=3
    )
    if shape[-1] != in_features:
        raise ValueError(
            f"[{NAME}] x has {shape[-1]} features (its last dim), expected {in_features} from "
            f"w of shape {w.shape} with bits={bits}"
        )
    lhs = check_indices(NAME, "lhs_indices", lhs_indices)
    rhs = check_indices(NAME, "rhs_indices", rhs_indices)
    if lhs is None and rhs is None:
        raise Unmodelled(f"[{NAME}] the variants model calls with lhs_indices or rhs_indices")
    batch = pair_shape(NAME, shape[:-2], lhs, rhs, experts)
    key = (pair_count(batch), experts, in_features, out_features, bits, group_size)
    return dtype, (*key, sorted_indices)


def _dequantized_experts(w, scales, biases, group_size, bits, dtype):
    return mx.dequantize(w, scales.astype(dtype), biases.astype(dtype), group_size, bits)


def reference(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices,
):  # fmt: skip
    """Every expert dequantized in float32, then MLX's ``gather_mm``; in float64 (which
    ``gather_mm`` does not take), :func:`_take_then_matmul`."""
    if x.dtype == mx.float64:
        return _take_then_matmul(
            x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
            global_scale, sorted_indices,
        )  # fmt: skip
    group_size, bits = sizes(group_size, bits)
    wf = _dequantized_experts(w, scales, biases, group_size, bits, mx.float32)
    y = mx.gather_mm(x.astype(mx.float32), wf.swapaxes(-1, -2), lhs_indices, rhs_indices)
    return y.astype(mx.result_type(x, scales, biases))


def _take_then_matmul(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices,
):  # fmt: skip
    """Each pair's expert dequantized (in float32, or float64), then one batched matmul:
    every dtype on every device, for small calls (it makes a matrix per pair)."""
    group_size, bits = sizes(group_size, bits)
    acc = accumulator(x.dtype)
    rows, experts, shape = pairs(x, lhs_indices, rhs_indices, w.shape[0])
    wf = _dequantized_experts(w[experts], scales[experts], biases[experts], group_size, bits, acc)
    x2 = x.reshape(-1, 1, x.shape[-1]).astype(acc)
    y = (x2[rows] @ wf.swapaxes(-1, -2)).reshape(*shape, 1, wf.shape[1])
    return y.astype(mx.result_type(x, scales, biases))


def _builtin(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices,
):  # fmt: skip
    return MLX_GATHER_QMM(
        x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
        global_scale, sorted_indices=sorted_indices,
    )  # fmt: skip


def _sorted_rows(x, w, lhs_indices, rhs_indices, sorted_indices):
    """x's rows in the order of their experts, as ``(pairs, 1, K)``, their experts, the order
    (None: already sorted) and the pairs' batch shape."""
    k = x.shape[-1]
    rows, experts, shape = pairs(x, lhs_indices, rhs_indices, w.shape[0])
    rows, experts, order = by_matrix(rows, experts, sorted_indices)
    return x.reshape(-1, 1, k)[rows], experts, order, shape


def _sort_then_gather(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices,
):  # fmt: skip
    """The pairs sorted by expert, MLX's op told they are (it then reads each expert's weights
    for a run of rows), and the rows put back in order."""
    xs, experts, order, shape = _sorted_rows(x, w, lhs_indices, rhs_indices, sorted_indices)
    y = MLX_GATHER_QMM(
        xs, w, scales, biases, None, experts, True, group_size, bits, sorted_indices=True
    )
    return unsort(y, order).reshape(*shape, 1, y.shape[-1])


def _dequantize_then_gather(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices,
):  # fmt: skip
    """Every expert dequantized into x's dtype, then MLX's ``gather_mm`` on the sorted pairs
    (prefills, where most experts are used and a float matmul is fastest)."""
    group_size, bits = sizes(group_size, bits)
    wf = _dequantized_experts(w, scales, biases, group_size, bits, x.dtype)
    xs, experts, order, shape = _sorted_rows(x, w, lhs_indices, rhs_indices, sorted_indices)
    y = mx.gather_mm(xs, wf.swapaxes(-1, -2), None, experts, sorted_indices=True)
    return unsort(y, order).reshape(*shape, 1, y.shape[-1])


def _kernel_args(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
    global_scale, sorted_indices, *, sort: bool = True,
):  # fmt: skip
    """What the gather_qmv kernel takes: x as rows, the weights, and per pair (in expert order
    with ``sort``) its expert, its row of x and its row of the output; then the output's
    shape."""
    k = x.shape[-1]
    rows, experts, shape = pairs(x, lhs_indices, rhs_indices, w.shape[0])
    rows, experts, order = by_matrix(rows, experts, sorted_indices or not sort)
    if order is None:
        order = mx.arange(experts.size, dtype=mx.uint32)
    x2 = x.reshape(-1, k)
    return x2, w, scales, biases, experts, rows, order, (*shape, 1), *sizes(group_size, bits)


def _default(problem, backend):
    # Where MLX's op cannot serve, a composition: float64 (only on the CPU) by the one that
    # takes it, float32 on CUDA by either.
    if mlx_serves(problem["dtype"], backend, problem["pairs"]):
        return "builtin", {}
    if problem["dtype"] == "float64" or take_fits(problem, {}):
        return "take", {}
    return "dequantize", {}


def _routes(tokens: int, experts: int, top_k: int, key: mx.array) -> mx.array:
    """``top_k`` distinct experts for each token, at random, as a router picks them."""
    scores = mx.random.uniform(shape=(tokens, experts), key=key)
    return mx.argsort(scores, axis=-1)[:, :top_k].astype(mx.uint32)


def _example(shapes, dtype, key, top_k=1, bits=4, group_size=64, sorted_indices=False):
    """``shapes``: x's ``(tokens, in_features)``, then w's packed ``(experts, out, packed)``.

    As mlx-lm's SwitchGLU calls it: unsorted, x ``(tokens, 1, 1, in)`` and the experts
    ``(tokens, top_k)``; sorted, one row per pair in expert order."""
    k1, k2, k3 = mx.random.split(key, 3)
    tokens, k = shapes[0]
    experts, out, _ = shapes[1]
    wf = mx.random.normal((experts, out, k), key=k2) / math.sqrt(k)
    w, scales, biases = mx.quantize(wf, group_size, bits)
    routes = _routes(tokens, experts, top_k, k3)
    if sorted_indices:
        flat = routes.reshape(-1)
        order = mx.argsort(flat)
        x = random((tokens * top_k, 1, k), dtype, k1)
        indices = flat[order]
    else:
        x = random((tokens, 1, 1, k), dtype, k1)
        indices = routes
    return (
        x, w, scales.astype(dtype), biases.astype(dtype), None, indices, True, group_size,
        bits, "affine", None, sorted_indices,
    )  # fmt: skip


def _case(p):
    packed = (p["experts"], p["out_features"], p["in_features"] * p["bits"] // 32)
    options = {"bits": p["bits"], "group_size": p["group_size"], "sorted_indices": p["sorted"]}
    return ((p["pairs"], p["in_features"]), packed), options


def _check_slices(args):
    x, w, scales, biases, lhs, rhs, *rest = args

    def call(rows, used, cols, indices):
        parts = (m[used][:, cols] for m in (w, scales, biases))
        return (rows, *parts, None, indices, *rest)

    return check_slices(x, lhs, rhs, w.shape[0], w.shape[1], call)


def _ex(tokens, experts, top_k, k, n, dtype="bfloat16", sorted_indices=False) -> Example:
    options = (("top_k", top_k), ("bits", 4), ("group_size", 64))
    if sorted_indices:
        options += (("sorted_indices", True),)
    return Example(((tokens, k), (experts, n, k // 8)), dtype, options)


# (experts, top_k, in, out) of the expert projections of Qwen3-30B-A3B, Mixtral-8x7B and
# gpt-oss-20b: gate and up, then down.
MODELS = (
    (128, 8, 2048, 768),
    (128, 8, 768, 2048),
    (8, 2, 4096, 14336),
    (8, 2, 14336, 4096),
    (32, 4, 2880, 2880),
)


def _presets() -> dict:
    # Decoding first (a run cut short by --time-budget has tuned it), then prefills as
    # mlx-lm's SwitchGLU sorts them.
    default = [_ex(t, e, k, i, o) for t in (1, 8) for e, k, i, o in MODELS]
    default += [_ex(t * k, e, k, i, o, sorted_indices=True) for t in (512,)
                for e, k, i, o in MODELS]  # fmt: skip
    full = default + [
        _ex(t, e, k, i, o, dtype) for t in (1, 2, 4, 8) for e, k, i, o in MODELS
        for dtype in ("bfloat16", "float16")
    ]  # fmt: skip
    full += [_ex(t * k, e, k, i, o, sorted_indices=True) for t in (2048, 4096)
             for e, k, i, o in MODELS]  # fmt: skip
    quick = [
        _ex(1, 8, 2, 256, 128, "float32"),
        _ex(16, 8, 2, 256, 128, "float32"),
        _ex(64, 8, 2, 512, 256, "float32", sorted_indices=True),
    ]
    return {"quick": quick, "default": default, "full": list(dict.fromkeys(full))}


def _served_by_mlx(*args):
    """MLX's own op, for the calls the variants do not model, with its own errors; but a
    ``mode`` it does not know is ours."""
    mode = args[9]
    if not isinstance(mode, str):
        raise TypeError(f"[{NAME}] mode must be a str, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"[{NAME}] mode must be one of {list(MODES)}, got {mode!r}")
    *head, sorted_indices = args
    return MLX_GATHER_QMM(*head, sorted_indices=sorted_indices)


def gather_qmm(
    x: mx.array,
    w: mx.array,
    /,
    scales: mx.array,
    biases: mx.array | None = None,
    lhs_indices: mx.array | None = None,
    rhs_indices: mx.array | None = None,
    transpose: bool = True,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    global_scale: mx.array | None = None,
    *,
    sorted_indices: bool = False,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Quantized matrix products with a gather of both operands, like ``mx.gather_qmm``: block
    ``lhs_indices[i]`` of ``x`` (its batch dims flattened) times the dequantized matrix
    ``rhs_indices[i]`` of ``w``, for each ``i`` of the two indices broadcast (an absent index
    takes every batch entry in order). In a mixture of experts, ``x`` holds the tokens and
    ``rhs_indices`` the experts routed to each.

    Args:
        x: input, ``(..., M, in_features)``.
        w: the packed experts, ``(..., out_features, in_features * bits / 32)`` (with
            ``transpose``), from ``mx.quantize``.
        scales: one per group, ``(..., out_features, in_features / group_size)``.
        biases: one per group, like ``scales`` (the affine mode needs them).
        lhs_indices: integer indices into the batch entries of ``x``.
        rhs_indices: integer indices into the batch entries of ``w``.
        transpose: multiply by each matrix transposed (as linear layers do) or not.
        group_size: values per scale and bias (default: the mode's, 64).
        bits: bits per code (default: the mode's, 4).
        mode: ``"affine"``, or MLX's ``"mxfp4"``, ``"mxfp8"``, ``"nvfp4"`` (served by MLX).
        global_scale: the ``nvfp4`` mode's per-input scale (served by MLX).
        sorted_indices: the indices are in ascending order (a promise some variants use).
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(
        x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
        global_scale, sorted_indices, stream,
    )  # fmt: skip


OP = register(
    Op(
        NAME,
        signature=gather_qmm,
        dims=DIMS,
        problem=_problem,
        outside=_served_by_mlx,
        mlx_default=mlx_default,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            Variant("builtin", lambda: _builtin, description="mx.gather_qmm"),
            Variant(
                "sort",
                lambda: _sort_then_gather,
                description="pairs sorted by expert, then mx.gather_qmm told so",
            ),
            Variant(
                "dequantize",
                lambda: _dequantize_then_gather,
                # MLX's CPU gather_mm takes float32 only.
                backends=GPU_BACKENDS,
                description="every expert dequantized, then mx.gather_mm on sorted pairs",
            ),
            Variant(
                "take",
                lambda: _take_then_matmul,
                supports=take_fits,
                description="each pair's expert dequantized, then a batched matmul",
            ),
            gather_qmv_variant(reference, _kernel_args),
            gather_mma_variant(reference, _kernel_args),
        ],
        presets=_presets(),
        tolerances=TOLERANCES,
        check_slices=_check_slices,
        # The output is not shaped like x (top-k pairs per token).
        feed=None,
    )
)
