"""Rotary positional encoding (RoPE), as ``mx.fast.rope`` plus a choice of layout.

With ``layout="BHSD"`` (the default, and ``mx.fast.rope``'s convention) positions run along
the second-to-last axis of an input of shape ``(B, *, S, D)``; with ``layout="BSHD"`` the input
is ``(B, S, H, D)`` and positions run along axis 1, so attention code that keeps BSHD needs no
transposes.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..patch import MLX_FAST
from ..problem import EXACT, Dim, bucket
from ..registry import Example, Op, register
from ._common import (
    accumulator,
    check_array,
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_vector,
    mlx_only,
    mlx_variants,
    random,
)
from ._rope_kernels import rope_variants

NAME = "rope"
LAYOUTS = ("BHSD", "BSHD")
DIMS = (
    Dim("batch"),
    Dim("heads"),
    Dim("seq"),
    Dim("head_dim", EXACT),
    Dim("dims", EXACT),
    Dim("traditional", EXACT),
    Dim("layout", EXACT),
    Dim("freqs", EXACT),
    Dim("per_batch", EXACT),
)


def _check_offset(offset, batch: int) -> None:
    if isinstance(offset, mx.array):
        if not mx.issubdtype(offset.dtype, mx.integer):
            raise ValueError(f"[{NAME}] offset must have an integer dtype, got {offset.dtype}")
        if offset.ndim > 1 or offset.size not in (1, batch):
            raise ValueError(
                f"[{NAME}] offset must be a scalar or a vector of {batch} elements, "
                f"got shape {offset.shape}"
            )
    else:
        if isinstance(offset, float):  # MLX takes it as an array and refuses its dtype
            raise ValueError(f"[{NAME}] offset must be an integer, got {offset!r}")
        _offset_fits(check_int(NAME, "offset", offset))


def _offset_fits(offset):
    """Positions are int32 on every path (mx.fast.rope's offset too). Dispatch checks each new
    int offset of a call it has served with this alone (``Op(volatile=...)``); anything else
    it returns, to be keyed by value and checked by the problem function."""
    if offset.__class__ is not int:
        return offset
    if not -(2**31) <= offset < 2**31:
        raise ValueError(f"[{NAME}] offset must fit in int32, got {offset}")
    return None


def _problem(x, dims, traditional, base, scale, offset, freqs, layout):
    check_choice(NAME, "layout", layout, LAYOUTS)
    dtype, shape = check_array(NAME, "x", x, min_ndim=3)
    if layout == "BSHD" and len(shape) != 4:
        raise ValueError(f"[{NAME}] x must be (batch, seq, heads, head_dim) for BSHD, got {shape}")
    head_dim = shape[-1]
    check_int(NAME, "dims", dims, minimum=2)
    if dims % 2 or dims > head_dim:
        raise ValueError(f"[{NAME}] dims must be even and at most {head_dim}, got {dims}")
    check_bool(NAME, "traditional", traditional)
    checked = [check_real(NAME, "scale", scale, mlx_takes_any=True)]
    if (base is None) == (freqs is None):
        raise ValueError(f"[{NAME}] give exactly one of base and freqs")
    if base is not None:
        checked.append(check_real(NAME, "base", base, positive=True, mlx_takes_any=True))
    checked.append(check_vector(NAME, "freqs", freqs, dims // 2, mlx_takes_any=True))
    _check_offset(offset, shape[0])
    mlx_only(NAME, *checked)
    if layout == "BHSD":
        seq, heads = shape[-2], math.prod(shape[1:-2])
    else:
        seq, heads = shape[1], shape[2]
    values = (
        bucket(shape[0]),
        bucket(heads),
        bucket(seq),
        head_dim,
        dims,
        traditional,
        layout,
        freqs is not None,
        isinstance(offset, mx.array) and offset.size > 1,
    )
    return dtype, values


def reference(x, dims, traditional, base, scale, offset, freqs, layout):
    """The composition: angles and rotation in float32 (float64 for float64 inputs)."""
    if layout == "BSHD":
        x = x.swapaxes(1, 2)
    shape = x.shape
    acc = accumulator(x.dtype)
    x4 = x.reshape(shape[0], -1, shape[-2], shape[-1])
    half = dims // 2
    positions = mx.arange(shape[-2], dtype=acc)
    if isinstance(offset, mx.array) and offset.size > 1:
        positions = positions + offset.astype(acc).reshape(-1, 1, 1)
    else:
        positions = positions + (offset.astype(acc) if isinstance(offset, mx.array) else offset)
    if freqs is None:
        inv = mx.exp(mx.arange(half, dtype=acc) * (-math.log(base) / half))
    else:
        inv = 1.0 / freqs.astype(acc)
    theta = (positions * scale)[..., None] * inv
    cos, sin = mx.cos(theta), mx.sin(theta)
    if theta.ndim == 3:  # per-batch offsets: (B, S, half) -> (B, 1, S, half)
        cos, sin = cos[:, None], sin[:, None]
    xr = x4[..., :dims].astype(acc)
    if traditional:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        rot = rot.reshape(*rot.shape[:-2], dims)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    out = mx.concatenate([rot.astype(x.dtype), x4[..., dims:]], axis=-1).reshape(shape)
    return out.swapaxes(1, 2) if layout == "BSHD" else out


def _builtin(x, dims, traditional, base, scale, offset, freqs, layout):
    if layout == "BSHD":
        x = x.swapaxes(1, 2)
    out = MLX_FAST["rope"](
        x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
    )
    return out.swapaxes(1, 2) if layout == "BSHD" else out


def _example(
    shapes,
    dtype,
    key,
    traditional=False,
    layout="BHSD",
    freqs=False,
    dims=None,
    offset=3,
    per_batch=False,
):
    k1, k2 = mx.random.split(key)
    x = random(shapes[0], dtype, k1)
    dims = dims or x.shape[-1]
    if per_batch and x.shape[0] > 1:  # one position offset per sequence of the batch
        offset = mx.arange(x.shape[0], dtype=mx.int32) * 7 + offset
    base, table = 10000.0, None
    if freqs:
        # Frequencies like a long-context rescaling: positive, spread over decades.
        base, table = None, mx.exp(mx.random.uniform(0.0, 9.0, (dims // 2,), key=k2))
    return x, dims, traditional, base, 1.0, offset, table, layout


def _case(p):
    b, h, s, d = p["batch"], p["heads"], p["seq"], p["head_dim"]
    shape = (b, h, s, d) if p["layout"] == "BHSD" else (b, s, h, d)
    return (shape,), {
        "traditional": p["traditional"],
        "layout": p["layout"],
        "freqs": p["freqs"],
        "dims": p["dims"],
        "per_batch": p["per_batch"],
    }


def _default(problem, backend):
    return "builtin", {}


def _presets():
    def ex(shape, dtype, **options):
        return Example((shape,), dtype, tuple(sorted(options.items())))

    quick = [ex((1, 8, 128, 64), t, layout=lay) for t in ("float32", "float16") for lay in LAYOUTS]
    default = [
        ex(shape, t, layout=lay)
        for shape, lay in (
            ((4, 32, 2048, 128), "BHSD"),
            ((4, 2048, 32, 128), "BSHD"),
            ((1, 32, 1024, 128), "BHSD"),
            ((8, 32, 1, 128), "BHSD"),
        )
        for t in ("float16", "bfloat16")
    ] + [ex((4, 32, 2048, 128), "float16", layout="BHSD", traditional=True)]
    full = default + [
        ex(shape, t, layout=lay, traditional=trad)
        for shape in ((2, 16, 512, 64), (1, 8, 4096, 128), (16, 8, 1, 64))
        for t in ("float32", "float16", "bfloat16")
        for lay in LAYOUTS
        for trad in (False, True)
    ]
    return {"quick": quick, "default": default, "full": full}


def rope(
    x: mx.array,
    dims: int,
    *,
    traditional: bool = False,
    base: float | None = 10000.0,
    scale: float = 1.0,
    offset: int | mx.array = 0,
    freqs: mx.array | None = None,
    layout: str = "BHSD",
    stream: mx.Stream | None = None,
) -> mx.array:
    """Rotary positional encoding, like ``mx.fast.rope``.

    Args:
        x: ``(B, *, S, D)`` for ``layout="BHSD"`` or ``(B, S, H, D)`` for ``"BSHD"``.
        dims: how many leading features of ``D`` are rotated (even); the rest pass through.
        traditional: rotate consecutive pairs ``(x[2i], x[2i+1])`` instead of the halves
            ``(x[i], x[i + dims/2])``.
        base: frequency base, ``theta_i = base ** (-2i / dims)``; None when ``freqs`` is given.
        scale: positions are multiplied by this.
        offset: position of the first element: an int, or an integer array (scalar or one
            per batch entry).
        freqs: ``(dims // 2,)`` frequencies (inverse of ``theta_i``) instead of ``base``.
        layout: ``"BHSD"`` or ``"BSHD"``.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(x, dims, traditional, base, scale, offset, freqs, layout, stream)


OP = register(
    Op(
        NAME,
        signature=rope,
        dims=DIMS,
        problem=_problem,
        # What the variants do not model (a negative base or scale, integer freqs): MLX's op.
        outside=_builtin,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            *mlx_variants(reference, _builtin, "mx.fast.rope", dynamic=(5,)),  # offset
            *rope_variants(reference),
        ],
        presets=_presets(),
        # Float32 angles are off from float64 ones by about position * 2**-24 radians, and
        # mx.fast.rope's CPU path rounds cos/sin to the input dtype: both err by |x| times
        # that, more than rounding the output alone.
        tolerances={"float32": (2e-4, 2e-4), "float16": (4e-3, 5e-3), "bfloat16": (3e-2, 3e-2)},
        volatile={5: _offset_fits},  # the offset moves with every decoding step
    )
)
