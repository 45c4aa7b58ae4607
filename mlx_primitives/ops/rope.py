"""Rotary positional encoding (RoPE), as ``mx.fast.rope`` plus a choice of layout.

With ``layout="BHSD"`` (the default, and ``mx.fast.rope``'s convention) positions run along
the second-to-last axis of an input of shape ``(B, *, S, D)``; with ``layout="BSHD"`` the input
is ``(B, S, H, D)`` and positions run along axis 1, so attention code that keeps BSHD needs no
transposes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import mlx.core as mx

from ..dsl.kernel import SHARED, GpuKernel, float_bits, itemsize, with_reference_transforms
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
        offset = check_int(NAME, "offset", offset)
        # Positions are int32 on every path (mx.fast.rope's offset too).
        if not -(2**31) <= offset < 2**31:
            raise ValueError(f"[{NAME}] offset must fit in int32, got {offset}")


def _problem(
    x, dims, *, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"
):
    check_choice(NAME, "layout", layout, LAYOUTS)
    kind, shape = check_array(NAME, "x", x, min_ndim=3)
    if layout == "BSHD" and len(shape) != 4:
        raise ValueError(f"[{NAME}] x must be (batch, seq, heads, head_dim) for BSHD, got {shape}")
    head_dim = shape[-1]
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
    _check_offset(offset, shape[0])
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
    return kind, values


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
_TILED = GpuKernel(
    "rope/tiled.k",
    ["x", "offset", "table"],
    ["y"],
    headers=("_dialect/trig.{backend}.h",),
    aligned=("x", "y"),
)
# Where the kernels' angles come from (their ANGLES template constant).
ANGLES = {"computed": 0, "table": 1, "cached": 2}


@functools.lru_cache(maxsize=32)
def _inv_freq(dims: int, base: float) -> mx.array:
    # base ** (-2i / dims) computed in float64, then rounded once to float32.
    half = dims // 2
    return mx.array([base ** (-2.0 * i / dims) for i in range(half)], dtype=mx.float32)


def _inverse(dims: int, base: float | None, freqs: mx.array | None) -> mx.array:
    """The float32 inverse frequencies a kernel reads as its table."""
    return _inv_freq(dims, base) if freqs is None else 1.0 / freqs.astype(mx.float32)


@functools.lru_cache(maxsize=64)
def _offset_array(offset: int) -> mx.array:
    """A Python offset as the int32 vector the kernels read (element 0), made once per value.

    Four elements, as MLX's CUDA back-end keeps arrays of 8 bytes or less in host memory that
    every warp then reads over the bus (DEVELOPERS.md, "Where rope's offset lives").
    """
    return mx.array([offset] * 4, mx.int32)


def _kernel_call(launch: Callable, angles: str) -> Callable:
    """A kernel variant's callable, with the op's signature and gradients.

    Args:
        launch: ``launch(x4, off, table, scale, template)`` runs a kernel on ``x4`` (the
            input as 4-D) and returns its output; ``off`` holds the int32 position offsets
            (B of them, or one in element 0: template ``PER_BATCH`` says which), ``table``
            the float32 inverse frequencies (``off`` again, unread, for computed angles) and
            ``template`` the constants every rope kernel takes.
        angles: the variant's ``angles`` parameter.
    """

    def forward(x, dims, traditional, base, scale, offset, freqs, layout):
        bshd = layout == "BSHD"
        shape = x.shape
        # Explicit sizes make this a no-op for 4-D x (a -1 always adds a graph node).
        x4 = x if bshd else x.reshape(shape[0], math.prod(shape[1:-2]), *shape[-2:])
        if isinstance(offset, mx.array):
            off = offset.astype(mx.int32).reshape(offset.size)
            per_batch = off.size > 1
        else:
            off, per_batch = _offset_array(int(offset)), False
        table = off if angles == "computed" else _inverse(dims, base, freqs)
        template = {
            "T": x.dtype,
            "D": x4.shape[-1],
            "H": x4.shape[2] if bshd else x4.shape[1],
            "DIMS": dims,
            "TRAD": traditional,
            "BSHD": bshd,
            "PER_BATCH": per_batch,
            "BASE_BITS": float_bits(base or 1.0),
            "SCALE_BITS": float_bits(scale),
        }
        return launch(x4, off, table, scale, template).reshape(shape)

    fn = with_reference_transforms(forward, _positional(reference))

    def call(
        x, dims, *, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"
    ):
        return fn(x, dims, traditional, base, scale, offset, freqs, layout)

    return call


def _run(kernel: GpuKernel, x4, off, table, template: dict, threads: int, total: int):
    """Launch a rope kernel on ``total`` threads (rounded up to whole groups)."""
    (y,) = kernel(
        [x4, off, table],
        template=template,
        grid=(-(-total // threads) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[x4.shape],
        output_dtypes=[x4.dtype],
    )
    return y


def _chunks(template: dict, vec: int) -> int:
    """Chunks of a head's row: VEC elements of the rotated part (with their partners of the
    other half unless traditional), then of the part passed through."""
    dims = template["DIMS"]
    rotated = dims // vec if template["TRAD"] else dims // 2 // vec
    return rotated + (template["D"] - dims) // vec


def _rotate_forward(vec: int, heads_per_thread: int, threads: int, angles: str, fast_math: bool):
    def launch(x4, off, table, scale, template):
        b, s = x4.shape[0], x4.shape[1 if template["BSHD"] else 2]
        if angles == "cached":
            # One table row unless per batch (an int offset comes as four equal elements).
            off = off if template["PER_BATCH"] else off[:1]
            pos = (mx.arange(s, dtype=mx.float32) + off.astype(mx.float32)[:, None]) * scale
            theta = pos[..., None] * table
            table = mx.stack([mx.cos(theta), mx.sin(theta)])
        total = b * s * -(-template["H"] // heads_per_thread) * _chunks(template, vec)
        consts = {"VEC": vec, "HPT": heads_per_thread, "ANGLES": ANGLES[angles], "FAST": fast_math}
        return _run(_ROTATE, x4, off, table, template | consts, threads, total)

    return _kernel_call(launch, angles)


def _tiled_forward(
    vec: int, positions: int, unroll: int, threads: int, angles: str, fast_math: bool
):
    """The ``tiled`` kernel (``kernel_variants/rope/tiled.k``) with the op's signature."""

    def launch(x4, off, table, scale, template):
        b, s = x4.shape[0], x4.shape[1 if template["BSHD"] else 2]
        consts = {
            "VEC": vec,
            "P": positions,
            "UNROLL": unroll,
            "ANGLES": ANGLES[angles],
            "FAST": fast_math,
        }
        # One group per tile of positions of a sequence.
        total = b * -(-s // positions) * threads
        return _run(_TILED, x4, off, table, template | consts, threads, total)

    return _kernel_call(launch, angles)


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


def _chunks_fit(p: dict, vec: int) -> bool:
    """Whether rows split into chunks of ``vec`` elements (16 bytes at most): the rotated
    part's pairs in place, or one of each half, then the part passed through."""
    size = itemsize(p["dtype"])
    if size is None or vec * size > 16 or (p["head_dim"] - p["dims"]) % vec:
        return False
    rotated = p["dims"] if p["traditional"] else p["dims"] // 2
    return rotated % vec == 0 and (vec % 2 == 0 or not p["traditional"])


def _angles_fit(p: dict, params: dict) -> bool:
    return not (p["freqs"] and params["angles"] == "computed") and not (
        # Cached angles come from MLX's cos and sin: fast_math would change nothing.
        params["fast_math"] and params["angles"] == "cached"
    )


def _loads_fit(p: dict, vec: int, chunks: int, threads: int) -> bool:
    """Whether a group of ``threads`` threads, each holding the loads of ``chunks`` chunks at
    once, fits the registers: past 64 KB of them a 512-thread group asks for more registers
    than an SM has and fails to launch."""
    held = chunks * vec * itemsize(p["dtype"]) * (2 - p["traditional"])
    return held * threads <= 65536


def _rotate_supports(p: dict, params: dict) -> bool:
    vec, heads = params["vec"], params["heads_per_thread"]
    return (
        _chunks_fit(p, vec)
        and _angles_fit(p, params)
        and heads <= p["heads"]
        and _loads_fit(p, vec, heads, params["threads"])
    )


def _tiled_supports(p: dict, params: dict) -> bool:
    vec, positions = params["vec"], params["positions"]
    if not (_chunks_fit(p, vec) and _angles_fit(p, params)):
        return False
    # A tile's cos and sin (float32, each position's row padded by one word per rotated
    # chunk), declared twice in the CUDA body.
    half = p["dims"] // 2
    angles = 2 * positions * (half + half // (vec // 2 if p["traditional"] else vec)) * 4
    return (
        positions <= p["seq"]  # a tile longer than the (bucketed) sequence only idles
        and 2 * angles <= SHARED["cuda"]
        and angles <= SHARED["metal"]
        and _loads_fit(p, vec, params["unroll"], params["threads"])
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
                _rotate_forward,
                backends=GPU_BACKENDS,
                space={
                    "vec": (8, 2, 4),
                    "heads_per_thread": (2, 1, 4, 8),
                    "threads": (128, 256, 512),
                    "angles": ("computed", "table", "cached"),
                    "fast_math": (True, False),
                },
                supports=_rotate_supports,
                sources=_ROTATE.files,
                description="custom kernel: cos/sin shared by the heads at a position",
            ),
            Variant(
                "tiled",
                _tiled_forward,
                backends=GPU_BACKENDS,
                space={
                    "vec": (8, 2, 4),
                    "positions": (8, 1, 2, 4, 16, 32),
                    "unroll": (2, 1, 4),
                    "threads": (256, 128, 512),
                    "angles": ("computed", "table"),
                    "fast_math": (True, False),
                },
                supports=_tiled_supports,
                sources=_TILED.files,
                description="custom kernel: a group's positions' cos/sin in threadgroup "
                "memory, shared by every head",
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
