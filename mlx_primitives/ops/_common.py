"""Argument checks and helpers that every op shares.

Errors name the op in brackets and the offending argument, e.g.
``ValueError: [rms_norm] weight has shape (5,), expected (4096,)``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import mlx.core as mx

from ..problem import DTYPES, Unmodelled

# The floating dtypes, by the name a problem key gives them.
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def norm_dtype(x: mx.array, weight: mx.array | None, bias: mx.array | None = None) -> mx.Dtype:
    """The output dtype of MLX's norms: x's, promoted with the weight's and, where a weight
    is given, the bias's (without a weight MLX keeps x's dtype whatever the bias's)."""
    if weight is None:
        return x.dtype
    return mx.result_type(x, weight, *(() if bias is None else (bias,)))


def check_array(op: str, name: str, x, *, min_ndim: int = 1) -> tuple[str, tuple]:
    """``x`` is a non-empty floating mx.array with at least ``min_ndim`` dims; returns the
    name of its dtype and its shape (each attribute of an mx.array is fetched once, here and
    in the ops' problem functions: this is the dispatch's hot path)."""
    if not isinstance(x, mx.array):
        raise TypeError(f"[{op}] {name} must be an mlx.core.array, got {type(x).__name__}")
    dtype = _NAMES.get(x.dtype)
    if dtype is None:  # a ValueError, as MLX's own ops raise for a dtype they do not take
        raise ValueError(f"[{op}] {name} must have a floating dtype, got {x.dtype}")
    shape = x.shape
    if len(shape) < min_ndim:
        raise ValueError(f"[{op}] {name} must have at least {min_ndim} dims, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"[{op}] {name} has a zero-size dim: shape {shape}")
    return dtype, shape


# What check_vector and check_real return for a value MLX's op takes and the variants do not
# model: the problem function then raises Unmodelled, once every argument passed its checks.
MLX_ONLY = "mlx only"


def check_vector(op: str, name: str, v, size: int, *, mlx_takes_any: bool = False) -> str:
    """``v`` is None or a floating vector of ``size`` elements; returns its dtype's name, or
    "none": a problem value where kernels are built per dtype of each argument and per
    argument present (selective_scan keeps only whether it is present). With
    ``mlx_takes_any``, a vector of another dtype gives :data:`MLX_ONLY`."""
    if v is None:
        return "none"
    if mlx_takes_any and isinstance(v, mx.array) and v.dtype not in _NAMES:
        if v.shape != (size,):
            raise ValueError(f"[{op}] {name} has shape {v.shape}, expected ({size},)")
        return MLX_ONLY
    dtype, shape = check_array(op, name, v)
    if shape != (size,):
        raise ValueError(f"[{op}] {name} has shape {shape}, expected ({size},)")
    return dtype


def check_same(op: str, a_name: str, a, b_name: str, b) -> tuple[str, tuple]:
    """Two arrays of one shape and dtype (a linear scan's); returns the dtype's name and
    the shape."""
    dtype, shape = check_array(op, a_name, a)
    b_dtype, b_shape = check_array(op, b_name, b)
    if b_shape != shape:
        raise ValueError(f"[{op}] {b_name} has shape {b_shape}, expected {shape} like {a_name}")
    if b_dtype != dtype:
        raise TypeError(f"[{op}] {b_name} has dtype {b.dtype}, expected {a.dtype} like {a_name}")
    return dtype, shape


def check_real(
    op: str, name: str, value, *, positive: bool = False, mlx_takes_any: bool = False
) -> float | str:
    """A finite real number (not a bool), >= 0 (or > 0 when ``positive``). With
    ``mlx_takes_any``, another real number (a bool too) gives :data:`MLX_ONLY`."""
    # float and int first: the ABC check below costs more than the rest of a call's checks.
    if type(value) is float and 0 <= value < math.inf and (value > 0 or not positive):
        return value
    if not isinstance(value, Real) or (isinstance(value, bool) and not mlx_takes_any):
        raise TypeError(f"[{op}] {name} must be a real number, got {type(value).__name__}")
    if isinstance(value, bool):  # MLX takes it as a number
        return MLX_ONLY
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        if mlx_takes_any:
            return MLX_ONLY
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"[{op}] {name} must be a finite {kind} number, got {value}")
    return value


def mlx_only(op: str, *checked) -> None:
    """Raise :class:`Unmodelled` where a check gave :data:`MLX_ONLY` (MLX's op serves the
    call)."""
    if MLX_ONLY in checked:
        raise Unmodelled(f"[{op}] a value the variants do not model: MLX's op serves it")


def check_int(op: str, name: str, value, *, minimum: int | None = None) -> int:
    """An integer (not a bool), at least ``minimum``."""
    # int first, as in check_real: the Integral ABC check is slow for a per-call check.
    if type(value) is int and (minimum is None or value >= minimum):
        return value
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"[{op}] {name} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"[{op}] {name} must be at least {minimum}, got {value}")
    return int(value)


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"[{op}] {name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(op: str, name: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"[{op}] {name} must be one of {list(choices)}, got {value!r}")


def vector_example(given: str | None, shape, dtype: mx.Dtype, key, scale: float, shift: float):
    """A random optional vector for examples: of ``dtype`` when ``given`` is None, absent for
    "none", else of the dtype ``given`` names."""
    if given == "none":
        return None
    return random(shape, dtype if given is None else getattr(mx, given), key, scale, shift)


def accumulator(dtype: mx.Dtype) -> mx.Dtype:
    """float32, or float64 for float64 inputs (the reference then runs in float64)."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def random(shape, dtype: mx.Dtype, key: mx.array, scale: float = 1.0, shift: float = 0.0):
    """Normal random values ``shift + scale * N(0, 1)`` of ``shape`` in ``dtype``."""
    return (mx.random.normal(tuple(shape), key=key) * scale + shift).astype(dtype)


def row_presets(
    hidden: int, rows: tuple[int, ...], quick: tuple, full_dims: tuple, options: tuple = ()
) -> dict:
    """Tuning presets of an op over rows of a last axis.

    Args:
        hidden: the row length of ``default``, a common model size.
        rows: the row counts of ``default`` (decode, small and large batches).
        quick: (rows, length) pairs of ``quick``, small, in float32 and float16.
        full_dims: more row lengths for ``full``, in every dtype.
        options: the op's flags, the same in every example.
    """
    from ..registry import Example

    quick_ = [Example(((r, d),), t, options) for r, d in quick for t in ("float32", "float16")]
    # Largest first: a run cut short by --time-budget has tuned the shapes where kernels win,
    # and the small ones it left keep their defaults (no record is near enough to serve them).
    default = [
        Example(((r, hidden),), t, options)
        for r in sorted(rows, reverse=True)
        for t in ("float16", "bfloat16")
    ]
    full = default + [
        Example(((r, d),), t, options)
        for r in (8, 256, 4096)
        for d in full_dims
        for t in ("float32", "float16", "bfloat16")
    ]
    return {"quick": quick_, "default": default, "full": full}


def mlx_variants(composition, builtin=None, builtin_name: str = "", dynamic: tuple = ()) -> list:
    """The variants every op has on every back-end: the MLX built-in where one exists, the
    composition of MLX ops run eagerly, and the same composition under ``mx.compile``.

    Args:
        composition: the op as MLX ops, taking the op's arguments (usually its reference).
        builtin: MLX's own implementation, taking the op's arguments.
        dynamic: positions of arguments that vary from call to call (a position offset):
            passed to the compiled composition as arrays, since mx.compile traces anew for
            every new Python scalar.
    """
    from ..registry import Variant

    def compiled():
        fn = mx.compile(composition)
        if not dynamic:
            return fn

        def call(*args):
            args = list(args)
            for i in dynamic:
                if not isinstance(args[i], mx.array):
                    args[i] = mx.array(args[i])
            return fn(*args)

        return call

    out = []
    if builtin is not None:
        out.append(Variant("builtin", lambda: builtin, description=builtin_name))
    out.append(Variant("eager", lambda: composition, description="composition of MLX ops"))
    out.append(Variant("compiled", compiled, description="mx.compile'd composition"))
    return out
