"""Rotary positional encoding (RoPE), as ``mx.fast.rope`` plus a choice of layout.

With ``layout="BHSD"`` (the default, and ``mx.fast.rope``'s convention) positions run along
the second-to-last axis of an input of shape ``(B, *, S, D)``; with ``layout="BSHD"`` the input
is ``(B, S, H, D)`` and positions run along axis 1, so attention code that keeps BSHD needs no
transposes.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from ..dsl.kernel import GpuKernel, float_bits, itemsize, with_reference_transforms
from ..problem import EXACT, Dim, bucket
from ..registry import GPU_BACKENDS, Example, Op, Variant, register
from ._common import (
    accumulator,
    check_array,
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_vector,
    mlx_variants,
    random,
)

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
            raise TypeError(f"[{NAME}] offset must have an integer dtype, got {offset.dtype}")
        if offset.ndim > 1 or offset.size not in (1, batch):
            raise ValueError(
                f"[{NAME}] offset must be a scalar or a vector of {batch} elements, "
                f"got shape {offset.shape}"
            )
    else:
        check_int(NAME, "offset", offset)


def _problem(
    x, dims, *, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"
):
    check_choice(NAME, "layout", layout, LAYOUTS)
    check_array(NAME, "x", x, min_ndim=3)
    if layout == "BSHD" and x.ndim != 4:
        raise ValueError(
            f"[{NAME}] x must be (batch, seq, heads, head_dim) for BSHD, got {x.shape}"
        )
    head_dim = x.shape[-1]
    check_int(NAME, "dims", dims, minimum=2)
    if dims % 2 or dims > head_dim:
        raise ValueError(f"[{NAME}] dims must be even and at most {head_dim}, got {dims}")
    check_bool(NAME, "traditional", traditional)
    check_real(NAME, "scale", scale)
    if (base is None) == (freqs is None):
        raise ValueError(f"[{NAME}] give exactly one of base and freqs")
    if base is not None:
        check_real(NAME, "base", base, positive=True)
    check_vector(NAME, "freqs", freqs, dims // 2)
    _check_offset(offset, x.shape[0])
    if layout == "BHSD":
        seq, heads = x.shape[-2], math.prod(x.shape[1:-2])
    else:
        seq, heads = x.shape[1], x.shape[2]
    values = (
        bucket(x.shape[0]),
        bucket(heads),
        bucket(seq),
        head_dim,
        dims,
        traditional,
        layout,
        freqs is not None,
        isinstance(offset, mx.array) and offset.size > 1,
    )
    return x.dtype, values


def reference(
    x, dims, *, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"
):
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


def _builtin(
    x, dims, *, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"
):
    if layout == "BSHD":
        x = x.swapaxes(1, 2)
    out = mx.fast.rope(
        x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
    )
    return out.swapaxes(1, 2) if layout == "BSHD" else out


_ROTATE = GpuKernel(
    "rope/rotate.k",
    ["x", "offset", "table"],
    ["y"],
    headers=("_dialect/trig.{backend}.h",),
    aligned=("x", "y"),
)
# Where the kernel's angles come from (its ANGLES template constant).
ANGLES = {"computed": 0, "table": 1, "cached": 2}


@functools.lru_cache(maxsize=32)
def _inv_freq(dims: int, base: float) -> mx.array:
    # base ** (-2i / dims) computed in float64, then rounded once to float32.
    half = dims // 2
    return mx.array([base ** (-2.0 * i / dims) for i in range(half)], dtype=mx.float32)


def _kernel_forward(vec: int, heads_per_thread: int, threads: int, angles: str, fast_math: bool):
    def forward(x, dims, traditional, base, scale, offset, freqs, layout):
        bshd = layout == "BSHD"
        shape = x.shape
        # Explicit sizes make this a no-op for 4-D x (a -1 always adds a graph node).
        x4 = x if bshd else x.reshape(shape[0], math.prod(shape[1:-2]), *shape[-2:])
        b, d = x4.shape[0], x4.shape[-1]
        s, h = (x4.shape[1], x4.shape[2]) if bshd else (x4.shape[2], x4.shape[1])
        off = mx.array([offset], mx.int32) if not isinstance(offset, mx.array) else offset
        off = off.astype(mx.int32).reshape(off.size)
        if angles == "computed":
            table = off  # a placeholder the kernel never reads
        else:
            inv = _inv_freq(dims, base) if freqs is None else 1.0 / freqs.astype(mx.float32)
            table = inv
            if angles == "cached":
                pos = (mx.arange(s, dtype=mx.float32) + off.astype(mx.float32)[:, None]) * scale
                theta = pos[..., None] * inv
                table = mx.stack([mx.cos(theta), mx.sin(theta)])
        step = vec // 2 if traditional else vec
        chunks = dims // 2 // step + (d - dims) // vec
        total = b * s * -(-h // heads_per_thread) * chunks
        template = {
            "T": x.dtype,
            "D": d,
            "H": h,
            "DIMS": dims,
            "TRAD": traditional,
            "BSHD": bshd,
            "VEC": vec,
            "HPT": heads_per_thread,
            "ANGLES": ANGLES[angles],
            "FAST": fast_math,
            "PER_BATCH": off.size > 1,
            "BASE_BITS": float_bits(base or 1.0),
            "SCALE_BITS": float_bits(scale),
        }
        (y,) = _ROTATE(
            [x4, off, table],
            template=template,
            grid=(-(-total // threads) * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[x4.shape],
            output_dtypes=[x.dtype],
        )
        return y.reshape(shape)

    fn = with_reference_transforms(forward, _positional(reference))

    def call(
        x, dims, *, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"
    ):
        return fn(x, dims, traditional, base, scale, offset, freqs, layout)

    return call


def _positional(f):
    def g(x, dims, traditional, base, scale, offset, freqs, layout):
        return f(
            x,
            dims,
            traditional=traditional,
            base=base,
            scale=scale,
            offset=offset,
            freqs=freqs,
            layout=layout,
        )

    return g


def _kernel_supports(p: dict, params: dict) -> bool:
    vec, size = params["vec"], itemsize(p["dtype"])
    if size is None or vec * size > 16:
        return False
    if (p["head_dim"] - p["dims"]) % vec:
        return False
    # A chunk is VEC elements of the rotated part: pairs in place, or one of each half.
    rotated = p["dims"] if p["traditional"] else p["dims"] // 2
    fits = rotated % vec == 0 and (vec % 2 == 0 or not p["traditional"])
    # A thread holds its heads' loads at once: past 64 KB per group of them, a 512-thread
    # group asks for more registers than an SM has and fails to launch.
    held = params["heads_per_thread"] * vec * size * (1 if p["traditional"] else 2)
    return (
        fits
        and params["heads_per_thread"] <= p["heads"]
        and held * params["threads"] <= 65536
        and not (p["freqs"] and params["angles"] == "computed")
        # Cached angles come from MLX's cos and sin: fast_math would change nothing.
        and not (params["fast_math"] and params["angles"] == "cached")
    )


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
    kwargs = {
        "traditional": traditional,
        "scale": 1.0,
        "offset": offset,
        "layout": layout,
        "base": 10000.0,
        "freqs": None,
    }
    if freqs:
        # Frequencies like a long-context rescaling: positive, spread over decades.
        kwargs["base"] = None
        kwargs["freqs"] = mx.exp(mx.random.uniform(0.0, 9.0, (dims // 2,), key=k2))
    return (x, dims), kwargs


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


OP = register(
    Op(
        NAME,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            *mlx_variants(reference, _builtin, "mx.fast.rope", dynamic=("offset",)),
            Variant(
                "rotate",
                _kernel_forward,
                backends=GPU_BACKENDS,
                space={
                    "vec": (8, 2, 4),
                    "heads_per_thread": (2, 1, 4, 8),
                    "threads": (128, 256, 512),
                    "angles": ("computed", "table", "cached"),
                    "fast_math": (True, False),
                },
                supports=_kernel_supports,
                sources=_ROTATE.files,
                description="custom kernel: cos/sin shared by the heads at a position",
            ),
        ],
        presets=_presets(),
        # Float32 angles are off from float64 ones by about position * 2**-24 radians, and
        # mx.fast.rope's CPU path rounds cos/sin to the input dtype: both err by |x| times
        # that, more than rounding the output alone.
        tolerances={"float32": (2e-4, 2e-4), "float16": (4e-3, 5e-3), "bfloat16": (3e-2, 3e-2)},
    )
)


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
    """
    return OP(
        x,
        dims,
        traditional=traditional,
        base=base,
        scale=scale,
        offset=offset,
        freqs=freqs,
        layout=layout,
    )
