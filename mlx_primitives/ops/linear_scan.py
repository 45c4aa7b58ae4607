"""The linear recurrence ``h_t = a_t * h_{t-1} + b_t`` along an axis, which state-space models
reduce to: every state ``h``, in the inputs' dtype, accumulated in float32."""

from __future__ import annotations

import math

import mlx.core as mx

from ..problem import EXACT, Dim, bucket
from ..registry import Example, Op, Variant, register
from ._common import accumulator, check_array, check_bool, check_same, random
from ._scan import check_axis, doubling, from_front, to_front
from ._scan_kernels import serial_variant

NAME = "linear_scan"
DIMS = (Dim("rows"), Dim("length"), Dim("reverse", EXACT), Dim("h0", EXACT))
# The sequential variant builds one graph node per step: past this length it declines.
SEQUENTIAL_MAX = 256


def _problem(a, b, h0, axis, reverse):
    dtype, shape = check_same(NAME, "a", a, "b", b)
    axis = check_axis(NAME, axis, len(shape))
    check_bool(NAME, "reverse", reverse)
    state = shape[:axis] + shape[axis + 1 :]
    rows = math.prod(state)
    given = "none"
    if h0 is not None:
        given, h_shape = check_array(NAME, "h0", h0, min_ndim=0)
        if h_shape != state:
            raise ValueError(f"[{NAME}] h0 has shape {h_shape}, expected {state}")
    return dtype, (bucket(rows), bucket(shape[axis]), reverse, given)


def _front(a, b, h0, axis, reverse):
    """a and b in the accumulator's dtype with the scan axis first, h0 folded into b's first
    step."""
    acc = accumulator(b.dtype)
    a, b = (to_front(x.astype(acc), axis, reverse) for x in (a, b))
    if h0 is not None:
        b = mx.concatenate([a[:1] * h0.astype(acc)[None] + b[:1], b[1:]])
    return a, b


def _combine(earlier, later):
    (a1, b1), (a2, b2) = earlier, later
    return a2 * a1, a2 * b1 + b2


def _doubling(a, b, h0, axis, reverse):
    """The doubling scan: log2(length) steps, each joining every position with the one ``d``
    before it."""
    out = b.dtype
    fa, fb = _front(a, b, h0, axis, reverse)
    _, h = doubling((fa, fb), _combine)
    return from_front(h, axis, reverse).astype(out)


def _sequential(a, b, h0, axis, reverse):
    """One step per position (short scans: a node per step)."""
    out = b.dtype
    fa, fb = _front(a, b, h0, axis, reverse)
    h, states = fb[0], [fb[0]]
    for t in range(1, fb.shape[0]):
        h = fa[t] * h + fb[t]
        states.append(h)
    return from_front(mx.stack(states), axis, reverse).astype(out)


def _blocked(block):
    def blocked(a, b, h0, axis, reverse):
        """Doubling inside blocks of ``block`` positions, then across the blocks' ends, then
        each block's states corrected by the state before it: less work than doubling over
        the whole length."""
        out = b.dtype
        fa, fb = _front(a, b, h0, axis, reverse)
        length, rest = fa.shape[0], fa.shape[1:]
        blocks = -(-length // block)
        pad = blocks * block - length
        if pad:  # a = 1, b = 0 carries the state through
            fa = mx.concatenate([fa, mx.ones((pad, *rest), fa.dtype)])
            fb = mx.concatenate([fb, mx.zeros((pad, *rest), fb.dtype)])
        fa, fb = (x.reshape(blocks, block, *rest).swapaxes(0, 1) for x in (fa, fb))
        pa, pb = doubling((fa, fb), _combine)  # along the block: (block, blocks, ...)
        _, ends = doubling((pa[-1], pb[-1]), _combine)  # each block's end state
        before = mx.concatenate([mx.zeros_like(ends[:1]), ends[:-1]])
        h = pb + pa * before[None]
        h = h.swapaxes(0, 1).reshape(blocks * block, *rest)[:length]
        return from_front(h, axis, reverse).astype(out)

    return blocked


def reference(a, b, h0, axis, reverse):
    """The doubling scan in float32 (float64 for float64 inputs)."""
    return _doubling(a, b, h0, axis, reverse)


def _default(problem, backend):
    return "doubling", {}


def _example(shapes, dtype, key, h0=None, axis=-1, reverse=False):
    """``shapes``: a's and b's shape. Decays in (0.5, 1), as a state-space model's."""
    k1, k2, k3 = mx.random.split(key, 3)
    shape = tuple(shapes[0])
    axis_ = axis % len(shape)
    a = (0.5 + 0.5 * mx.random.uniform(shape=shape, key=k1)).astype(dtype)
    state = shape[:axis_] + shape[axis_ + 1 :]
    given = None if h0 in (None, "none") else random(state, dtype, k3)
    return a, random(shape, dtype, k2), given, axis, reverse


def _case(p):
    options = {"reverse": p["reverse"], "h0": p["h0"]}
    return ((p["rows"], p["length"]),), options


def linear_scan(
    a: mx.array,
    b: mx.array,
    h0: mx.array | None = None,
    *,
    axis: int = -1,
    reverse: bool = False,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Every state of ``h_t = a_t * h_{t-1} + b_t`` along ``axis`` (``h_{-1}`` is ``h0``, or
    0), in the inputs' dtype, accumulated in float32.

    Args:
        a: the decays.
        b: the inputs, like ``a``.
        h0: the state before the first step, ``b``'s shape without ``axis`` (default zeros).
        axis: the axis to scan.
        reverse: scan from the last position to the first.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(a, b, h0, axis, reverse, stream)


def _presets() -> dict:
    def ex(rows, length, dtype, **options):
        return Example(((rows, length),), dtype, tuple(options.items()))

    # Mamba-style channels x states per sequence, decoding chunks and prefills.
    default = [ex(r, n, t) for r, n in ((5120, 512), (5120, 4096), (16384, 1024))
               for t in ("float16", "bfloat16", "float32")]  # fmt: skip
    quick = [ex(64, 256, "float32"), ex(16, 1000, "float32", reverse=True)]
    full = default + [ex(r, n, "float32") for r in (256, 4096) for n in (64, 8192)]
    return {"quick": quick, "default": default, "full": full}


OP = register(
    Op(
        NAME,
        signature=linear_scan,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            Variant("doubling", lambda: _doubling, description="log2(length) doubling steps"),
            Variant(
                "sequential",
                lambda: _sequential,
                supports=lambda p, q: p["length"] <= SEQUENTIAL_MAX,
                description="one step per position",
            ),
            Variant(
                "blocked",
                _blocked,
                space={"block": (32, 64, 16, 128)},
                supports=lambda p, q: q["block"] < p["length"],
                description="doubling in blocks, then across the blocks' ends",
            ),
            serial_variant(reference),
        ],
        presets=_presets(),
        differentiable=(0, 1, 2),
    )
)
