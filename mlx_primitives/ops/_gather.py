"""What gather_mm and gather_qmm share: a call's pairs of a row of ``x`` and a matrix.

MLX's gather products index the batch dims of both operands (``lhs_indices`` into ``x``'s,
``rhs_indices`` into the matrices'), default each index to every batch entry in order, and
broadcast the two; each pair multiplies one ``(M, K)`` block by one matrix. The variants model
the mixture-of-experts case, one row per block (``M == 1``): the pairs are then rows.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..problem import bucket

# A candidate is checked on CHECK_PAIRS pairs at a time and CHECK_COLUMNS output features,
# with the matrices those pairs use: a float64 copy of every matrix (or one per pair) of a
# prefill takes gigabytes. Calls within both limits are checked whole.
CHECK_PAIRS = 16
CHECK_COLUMNS = 256
CHECK_VALUES = 2**22

_INTEGER = (mx.uint32, mx.int32, mx.uint16, mx.int16, mx.uint8, mx.int8, mx.uint64, mx.int64)


def check_indices(op: str, name: str, indices) -> tuple | None:
    """``indices`` is None or an integer mx.array; returns its shape (None for None)."""
    if indices is None:
        return None
    if not isinstance(indices, mx.array):
        raise TypeError(f"[{op}] {name} must be an mlx.core.array, got {type(indices).__name__}")
    if indices.dtype not in _INTEGER:
        raise ValueError(f"[{op}] {name} must have an integer dtype, got {indices.dtype}")
    return indices.shape


def pair_shape(op: str, x_batch: tuple, lhs_shape, rhs_shape, matrices: int) -> tuple:
    """The batch shape of a call's output: the two index shapes broadcast (an absent index
    takes its operand's batch shape, ``(matrices,)`` for the matrices)."""
    left = x_batch if lhs_shape is None else lhs_shape
    right = (matrices,) if rhs_shape is None else rhs_shape
    try:
        return mx.broadcast_shapes(left, right)
    except ValueError:
        raise ValueError(
            f"[{op}] lhs_indices of shape {left} and rhs_indices of shape {right} do not broadcast"
        ) from None


def pairs(x: mx.array, lhs: mx.array | None, rhs: mx.array | None, matrices: int):
    """The flat row of ``x`` (as ``(rows, K)``) and the matrix of each pair, both uint32, and
    the pairs' batch shape."""
    x_batch = x.shape[:-2]
    if lhs is None:
        lhs = mx.arange(math.prod(x_batch), dtype=mx.uint32).reshape(x_batch)
    if rhs is None:
        rhs = mx.arange(matrices, dtype=mx.uint32)
    shape = mx.broadcast_shapes(lhs.shape, rhs.shape)
    flat = (math.prod(shape),)
    return (
        mx.broadcast_to(lhs, shape).reshape(flat).astype(mx.uint32),
        mx.broadcast_to(rhs, shape).reshape(flat).astype(mx.uint32),
        shape,
    )


def by_matrix(rows: mx.array, matrices: mx.array, sorted_indices: bool):
    """The pairs in the order of their matrices: ``(rows, matrices, order)``, ``order`` the
    pairs' positions in that order (None where they already are, as ``sorted_indices``
    promises)."""
    if sorted_indices:
        return rows, matrices, None
    order = mx.argsort(matrices)
    return rows[order], matrices[order], order


# Below this many pairs a permutation is inverted by sorting it (one small kernel, as mlx-lm
# does); above, by a scatter (three kernels, but linear in the pairs where a sort is not).
SORT_INVERSE_MAX = 2048


def inverse(order: mx.array) -> mx.array:
    """The inverse of the permutation ``order`` (``order[inverse(order)] == arange``)."""
    if order.size < SORT_INVERSE_MAX:
        return mx.argsort(order)
    return mx.zeros_like(order).at[order].add(mx.arange(order.size, dtype=order.dtype))


def unsort(y: mx.array, order: mx.array | None) -> mx.array:
    """Rows of ``y`` in the pairs' order, from their matrices' order."""
    return y if order is None else y[inverse(order)]


# The most elements the ``take`` variants may copy (a matrix per pair): 2^26 float32 values,
# 256 MiB. Past it they decline, as a prefill would take tens of gigabytes.
TAKE_MAX = 2**26


def take_fits(problem: dict, params: dict) -> bool:
    """Whether a ``take`` variant's copy of one matrix per pair stays under TAKE_MAX."""
    return problem["pairs"] * problem["in_features"] * problem["out_features"] <= TAKE_MAX


def check_slices(x, lhs, rhs, matrices: int, out: int, call) -> list | None:
    """The ``(args, select)`` slices of a large call that candidates are checked on: the
    first, middle and last CHECK_PAIRS pairs, each on a window of CHECK_COLUMNS output
    features, with only the matrices they use; None for a call small enough to check whole.

    Args:
        x, lhs, rhs: the call's input and indices.
        matrices: the matrices' count; out: their output features.
        call: ``call(rows, used, columns, indices)`` gives the smaller call's arguments: x's
            rows ``(n, 1, K)``, the matrices used, the output window (a slice) and each
            pair's matrix among them.
    """
    import numpy as np  # the tuner's checks only: off the import path

    rows, chosen, _ = pairs(x, lhs, rhs, matrices)
    total = rows.size
    if total <= CHECK_PAIRS and matrices * out * x.shape[-1] <= CHECK_VALUES:
        return None
    rows, chosen = np.array(rows), np.array(chosen)
    x2 = x.reshape(-1, 1, x.shape[-1])
    width = min(out, CHECK_COLUMNS)
    slices = []
    for i, start in enumerate((0, (total - CHECK_PAIRS) // 2, total - CHECK_PAIRS)):
        start = max(start, 0)
        part = np.arange(start, min(start + CHECK_PAIRS, total))
        used, local = np.unique(chosen[part], return_inverse=True)
        cols = slice((out - width) * i // 2, (out - width) * i // 2 + width)
        args = call(
            x2[mx.array(rows[part])], mx.array(used), cols, mx.array(local.astype(np.uint32))
        )
        select = (lambda p, c: lambda outs: [o.reshape(-1, 1, out)[p][..., c] for o in outs])(
            mx.array(part), cols
        )
        slices.append((args, select))
    return slices


def pair_count(shape: tuple) -> int:
    """A problem's pairs dim: the pairs bucketed to a power of two."""
    return bucket(math.prod(shape))
