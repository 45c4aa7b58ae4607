"""What the scans share: moving the scan axis first and back, and the doubling (Hillis-Steele)
scan of an associative combine, in log2(length) steps of whole-array operations."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx


def check_axis(op: str, axis, ndim: int) -> int:
    """``axis`` as a non-negative int for an array of ``ndim`` dims."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"[{op}] axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"[{op}] axis {axis} is out of range for {ndim} dims")
    return axis % ndim


def to_front(x: mx.array, axis: int, reverse: bool) -> mx.array:
    """``x`` with the scan axis first, reversed when scanning backwards."""
    x = mx.moveaxis(x, axis, 0)
    return x[::-1] if reverse else x


def from_front(x: mx.array, axis: int, reverse: bool) -> mx.array:
    """The inverse of :func:`to_front`."""
    return mx.moveaxis(x[::-1] if reverse else x, 0, axis)


def doubling(parts: tuple, combine: Callable) -> tuple:
    """The inclusive scan along the first axis of ``parts`` (arrays of one length), where
    ``combine(earlier, later)`` joins two runs: step ``d`` joins each position with the one
    ``d`` before it, ``d = 1, 2, 4, ...``."""
    length = parts[0].shape[0]
    d = 1
    while d < length:
        joined = combine(tuple(p[:-d] for p in parts), tuple(p[d:] for p in parts))
        parts = tuple(mx.concatenate([p[:d], j]) for p, j in zip(parts, joined))
        d *= 2
    return parts
