"""The custom-kernel variants of rope (``kernel_variants/rope/``).

- ``rotate``: each thread rotates a chunk of a row for a few heads at one position, sharing
  that position's cos/sin between the heads;
- ``tiled``: a tile of positions' cos/sin computed once into threadgroup memory, every head
  streamed through it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import mlx.core as mx

from ..dialect.kernel import SHARED, GpuKernel, float_bits, itemsize, with_reference_transforms
from ..registry import GPU_BACKENDS, Variant

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
@functools.lru_cache(maxsize=64)
def _inv_freq(dims: int, base: float) -> mx.array:
    # base ** (-2i / dims) computed in float64, then rounded once to float32; made once per
    # dims and base (as data: no op, and no Python loop per call).
    half = dims // 2
    return mx.array([base ** (-2.0 * i / dims) for i in range(half)], dtype=mx.float32)


def _inverse(dims: int, base: float | None, freqs: mx.array | None) -> mx.array:
    """The float32 inverse frequencies a kernel reads as its table."""
    return _inv_freq(dims, base) if freqs is None else 1.0 / freqs.astype(mx.float32)


@functools.lru_cache(maxsize=64)
def _offset_array(offset: int) -> mx.array:
    """A Python offset as the int32 vector the kernels read (element 0), made once per value.

    Four elements, as MLX's CUDA back-end keeps arrays of 8 bytes or less in host memory that
    every warp then reads over the bus (docs/notes/2026-11-27-rope-offset-scalar-pool.md).
    """
    return mx.array([offset] * 4, mx.int32)


def _kernel_call(launch: Callable, angles: str, reference: Callable) -> Callable:
    """A kernel variant's callable, with the op's signature and gradients.

    Args:
        launch: ``launch(x4, off, table, scale, template)`` runs a kernel on ``x4`` (the
            input as 4-D) and returns its output; ``off`` holds the int32 position offsets
            (B of them, or one in element 0: template ``PER_BATCH`` says which), ``table``
            the float32 inverse frequencies (``off`` again, unread, for computed angles) and
            ``template`` the constants every rope kernel takes.
        angles: the variant's ``angles`` parameter.
        reference: the op's reference, for gradients and transformations.
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

    return with_reference_transforms(forward, reference)


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


def _rotate_forward(reference, vec, heads_per_thread, threads, angles, fast_math):
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

    return _kernel_call(launch, angles, reference)


def _tiled_forward(reference, vec, positions, unroll, threads, angles, fast_math):
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

    return _kernel_call(launch, angles, reference)


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


def rope_variants(reference: Callable) -> list[Variant]:
    """The kernel variants of rope; ``reference`` gives them gradients."""
    return [
        Variant(
            "rotate",
            functools.partial(_rotate_forward, reference),
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
            functools.partial(_tiled_forward, reference),
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
    ]
