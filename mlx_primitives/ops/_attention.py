"""What the attention ops share: argument checks, layouts, the dense reference and the blocked
online-softmax composition.

Layouts: ``BHSD`` is (batch, heads, seq, head_dim), as ``mx.fast.scaled_dot_product_attention``
takes it; ``BSHD`` is (batch, seq, heads, head_dim). Grouped-query attention (fewer key/value
heads than query heads) is computed without repeating keys and values: queries are viewed as
(batch, kv_heads, group, seq, head_dim) and broadcast against (batch, kv_heads, 1, seq, dim).

Masks mean what they mean to ``mx.fast.scaled_dot_product_attention``: a causal mask or a
window is aligned bottom-right (query i is at position i + kv_len - q_len), and with more
queries than keys the first rows see no key; a boolean mask (True attends), a causal mask and
a window set the scores they hide to a large finite negative, so a row that may attend to no
key averages every value; an additive mask is added, so a row of -inf gives NaN (with an
additive mask, what a causal mask or a window hides is -inf, as if folded into it). Attention
sinks are one logit per query head, a column of the softmax whose weight is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..problem import EXACT, Dim, bucket
from ..registry import Variant
from ._common import accumulator, check_array, check_choice, check_real

LAYOUTS = ("BHSD", "BSHD")
DIMS = (
    Dim("batch"),
    Dim("q_heads"),
    Dim("group", EXACT),
    Dim("q_len"),
    Dim("kv_len"),
    Dim("head_dim", EXACT),
    Dim("layout", EXACT),
)


# What a hidden score becomes: finite, as MLX's attention makes it for boolean masks.
MASKED = -1e30


def check_qkv(op: str, q, k, v, layout: str, scale) -> tuple[str, tuple[int, ...]]:
    """Validate q, k, v and return the name of their dtype and ``(batch, q_heads, kv_heads,
    q_len, kv_len, head_dim)``."""
    check_choice(op, "layout", layout, LAYOUTS)
    dtypes, shapes = [], []
    for name, a in (("q", q), ("k", k), ("v", v)):
        dtype, shape = check_array(op, name, a, min_ndim=4)
        if len(shape) != 4:
            raise ValueError(f"[{op}] {name} must be 4-D ({layout}), got shape {shape}")
        dtypes.append(dtype)
        shapes.append(shape)
    if not dtypes[0] == dtypes[1] == dtypes[2]:
        raise TypeError(
            f"[{op}] q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    q_shape, k_shape, v_shape = shapes
    if k_shape != v_shape:
        raise ValueError(f"[{op}] v has shape {v_shape}, expected {k_shape} like k")
    if layout == "BHSD":
        (b, hq, lq, d), (bk, hkv, lk, dk) = q_shape, k_shape
    else:
        (b, lq, hq, d), (bk, lk, hkv, dk) = q_shape, k_shape
    if bk != b:
        raise ValueError(f"[{op}] k has batch {bk}, expected {b} like q")
    if dk != d:
        raise ValueError(f"[{op}] k has head_dim {dk}, expected {d} like q")
    if hq % hkv:
        raise ValueError(f"[{op}] q has {hq} heads, not a multiple of k's {hkv}")
    if scale is not None:
        check_real(op, "scale", scale, positive=True)
    return dtypes[0], (b, hq, hkv, lq, lk, d)


def check_mask(op: str, mask, shape: tuple[int, int, int, int], dtype: str) -> str:
    """``mask`` is None or an array of at most 4 dims broadcastable to ``shape`` (B, Hq, Lq,
    Lk), boolean or of a dtype that promotes to the inputs' ``dtype`` (as MLX requires);
    returns its kind: ``"none"``, ``"bool"`` or ``"additive"``."""
    if mask is None:
        return "none"
    if not isinstance(mask, mx.array):
        raise TypeError(f"[{op}] mask must be an mlx.core.array or None, got {type(mask).__name__}")
    if mask.ndim > 4:
        raise ValueError(f"[{op}] mask must have at most 4 dims, got shape {mask.shape}")
    full = (1,) * (4 - mask.ndim) + mask.shape
    if any(m not in (1, s) for m, s in zip(full, shape)):
        raise ValueError(f"[{op}] mask of shape {mask.shape} does not broadcast to {shape}")
    if mask.dtype == mx.bool_:
        return "bool"
    if mx.result_type(mask.dtype, getattr(mx, dtype)) != getattr(mx, dtype):
        raise ValueError(f"[{op}] mask has dtype {mask.dtype}, which does not promote to {dtype}")
    return "additive"


def check_sinks(op: str, sinks, heads: int, dtype: str) -> bool:
    """``sinks`` is None or a floating vector of one logit per query head, of a dtype that
    promotes to the inputs' ``dtype`` (as MLX requires)."""
    if sinks is None:
        return False
    if not isinstance(sinks, mx.array) or not mx.issubdtype(sinks.dtype, mx.floating):
        raise TypeError(f"[{op}] sinks must be a floating mlx.core.array or None")
    if sinks.shape != (heads,):
        raise ValueError(f"[{op}] sinks has shape {sinks.shape}, expected ({heads},)")
    if mx.result_type(sinks.dtype, getattr(mx, dtype)) != getattr(mx, dtype):
        raise ValueError(f"[{op}] sinks has dtype {sinks.dtype}, which does not promote to {dtype}")
    return True


def problem_values(b, hq, hkv, lq, lk, d, layout) -> tuple:
    return (bucket(b), bucket(hq), hq // hkv, bucket(lq), bucket(lk), d, layout)


def qkv_shapes(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, layout: str) -> tuple:
    """The shapes of q and of k (and v) in ``layout``."""
    if layout == "BHSD":
        return (b, hq, lq, d), (b, hkv, lk, d)
    return (b, lq, hq, d), (b, lk, hkv, d)


def to_bhsd(x: mx.array, layout: str) -> mx.array:
    return x.swapaxes(1, 2) if layout == "BSHD" else x


def grouped(q: mx.array, k: mx.array, v: mx.array):
    """BHSD q, k, v as (B, Hkv, G, L, D) queries and (B, Hkv, 1, L, D) keys and values."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    return q.reshape(b, hkv, hq // hkv, lq, d), k[:, :, None], v[:, :, None]


def grouped_mask(mask: mx.array, hq: int, hkv: int) -> mx.array:
    """A mask broadcastable to (B, Hq, Lq, Lk) as one broadcastable to (B, Hkv, G, Lq, Lk)."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], hkv, hq // hkv, *mask.shape[2:])


def visible(
    lq: int, lk: int, rows: tuple[int, int], cols: tuple[int, int], causal: bool, window: int | None
) -> mx.array | None:
    """Which (row, col) pairs of a block may attend (None when all may)."""
    if not causal and window is None:
        return None
    off = lk - lq
    i = mx.arange(rows[0], rows[1])[:, None] + off
    j = mx.arange(cols[0], cols[1])[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    return keep


def fold(mask, keep: mx.array, dtype: mx.Dtype):
    """One mask array for MLX's fused attention out of ``mask`` and the causal mask or window
    ``keep``: a boolean mask and ``keep`` both, or the additive mask with -inf where ``keep``
    hides (the meaning :func:`reference` gives them)."""
    if mask is None or mask.dtype == mx.bool_:
        return keep if mask is None else mask & keep
    return mx.where(keep, mask.astype(dtype), -math.inf)


def _masks(mask, hq: int, hkv: int, dtype: mx.Dtype):
    """A mask as ``(keep, bias)`` broadcastable to grouped scores: boolean masks keep, additive
    ones add (in ``dtype``)."""
    if mask is None:
        return None, None
    grouped = grouped_mask(mask, hq, hkv)
    return (grouped, None) if mask.dtype == mx.bool_ else (None, grouped.astype(dtype))


def _sink_logits(sinks, hq: int, hkv: int, dtype: mx.Dtype) -> mx.array:
    """One logit per query head as (1, Hkv, G, 1, 1)."""
    return sinks.astype(dtype).reshape(1, hkv, hq // hkv, 1, 1)


def reference(
    q, k, v, *, scale=None, causal=False, window=None, mask=None, sinks=None, layout="BHSD"
):
    """Dense attention with MLX's mask semantics (module docstring): scores, softmax and the
    weighted sum in float32 (float64 for float64 inputs)."""
    dtype, acc = q.dtype, accumulator(q.dtype)
    q, k, v = (to_bhsd(a, layout).astype(acc) for a in (q, k, v))
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg, kg, vg = grouped(q, k, v)
    scores = (qg * scale) @ kg.swapaxes(-1, -2)
    keep, bias = _masks(mask, hq, hkv, acc)
    edge = visible(lq, lk, (0, lq), (0, lk), causal, window)
    if bias is not None:  # the causal mask or window folded into the additive one
        scores = scores + (bias if edge is None else mx.where(edge, bias, -math.inf))
    else:
        if edge is not None:
            keep = edge if keep is None else keep & edge
        if keep is not None:
            scores = mx.where(keep, scores, MASKED)
    if sinks is not None:
        sink = mx.broadcast_to(_sink_logits(sinks, hq, hkv, acc), (*scores.shape[:-1], 1))
        scores = mx.concatenate([sink, scores], axis=-1)
    weights = mx.softmax(scores, axis=-1, precise=True)
    if sinks is not None:
        weights = weights[..., 1:]
    out = (weights @ vg).reshape(b, hq, lq, v.shape[-1]).astype(dtype)
    return out.swapaxes(1, 2) if layout == "BSHD" else out


def key_range(i0: int, i1: int, lq: int, lk: int, causal: bool, window: int | None) -> tuple:
    """``(lo, hi)``: the keys that query rows ``i0 .. i1 - 1`` may see, a contiguous range
    (causal mask and window aligned bottom-right)."""
    off = lk - lq
    hi = min(lk, i1 + off) if causal or window is not None else lk
    lo = max(0, i0 + off - window + 1) if window is not None else 0
    return lo, hi


def blocked(
    q,
    k,
    v,
    *,
    scale=None,
    causal=False,
    window=None,
    mask=None,
    sinks=None,
    layout="BHSD",
    block_q: int,
    block_k: int,
):
    """Attention by online softmax over blocks of keys, never forming a q_len x kv_len
    tensor: memory O(block_q x block_k) beyond the inputs and output. Blocks of keys that no
    query of a block may see (above the causal diagonal, outside the window) are skipped, so
    a window costs O(seq x window) work. Masks and sinks mean what they mean to
    :func:`reference`."""
    dtype = q.dtype
    q, k, v = (to_bhsd(a, layout) for a in (q, k, v))
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg, kg, vg = grouped(q, k, v)
    keep_mask, bias_mask = _masks(mask, hq, hkv, mx.float32)
    # With an additive mask, what the causal mask or window hides is -inf (folded into it).
    hidden = MASKED if bias_mask is None else -math.inf
    off = lk - lq
    # Each block of queries is written into one output, in its final dtype (assembling blocks
    # by concatenation would hold the output twice).
    out = mx.zeros((*qg.shape[:-1], dv), dtype)
    # What a row that may attend to no key gives (without sinks): every value's mean.
    mean_v = mx.mean(vg.astype(mx.float32), axis=-2, keepdims=True)
    for i0 in range(0, lq, block_q):
        i1 = min(i0 + block_q, lq)
        lo, hi = key_range(i0, i1, lq, lk, causal, window)
        # MLX would compute independent blocks' scores all before using any of them: each
        # block waits for the previous one (mx.depends), so one block's scores live at a time.
        qb = mx.depends(qg[..., i0:i1, :], out).astype(mx.float32) * scale
        rows = (*qb.shape[:-1], 1)
        if sinks is None:
            top, total = mx.full(rows, -math.inf), mx.zeros(rows)
        else:  # the sink is the softmax's first column: its weight is dropped
            top = mx.broadcast_to(_sink_logits(sinks, hq, hkv, mx.float32), rows)
            total = mx.ones(rows)
        acc = mx.depends(mx.zeros(qb.shape[:-1] + (dv,)), qb)
        for j0 in range(lo, hi, block_k):
            j1 = min(j0 + block_k, hi)
            # The dependency comes before any work on the block, its float32 copies included.
            # It names the sum too: left off the chain, every block's sum would run last and
            # hold each block's probabilities until then.
            kb, vb = mx.depends([kg[..., j0:j1, :], vg[..., j0:j1, :]], [acc, total])
            keep = None if keep_mask is None else _block(keep_mask, (i0, i1), (j0, j1))
            bias = None if bias_mask is None else _block(bias_mask, (i0, i1), (j0, j1))
            # Only blocks that cross the diagonal or the window's edge need an element mask.
            if (causal or window is not None) and not _inside(i0, i1, j0, j1, off, window):
                edge = visible(lq, lk, (i0, i1), (j0, j1), causal, window)
                keep = edge if keep is None else keep & edge
            top, total, acc = _step(
                qb,
                kb.astype(mx.float32),
                vb.astype(mx.float32),
                top,
                total,
                acc,
                keep,
                bias,
                hidden,
            )
        # 0 / 0 where every score was -inf (an additive mask): NaN, as MLX gives.
        block = acc / total
        if sinks is None and bias_mask is None:
            # Every key this row visited was hidden, so are the ones it skipped.
            block = mx.where((top > -math.inf) & (top < MASKED / 2), mean_v, block)
        out[..., i0:i1, :] = block.astype(dtype)
    if causal and lq > lk and sinks is None and bias_mask is None:
        # The first rows see no key (their blocks visit none): every value's mean.
        dead = (mx.arange(lq) < lq - lk)[:, None]
        out = mx.where(dead, mean_v, out).astype(dtype)
    out = out.reshape(b, hq, lq, dv)
    return out.swapaxes(1, 2) if layout == "BSHD" else out


# Past this many scores a candidate is checked on slices of query rows: the float64 reference
# of a 16384-long call on the CPU takes many minutes.
CHECK_SCORES = 2**26
CHECK_ROWS = 16


def check_slices(
    q, k, v, layout: str, call: Callable, *, causal=False, window=None, mask=None
) -> list | None:
    """Check slices (:class:`~mlx_primitives.registry.Op`) of a large attention call: the
    first, middle and last ``CHECK_ROWS`` query rows, each with the keys those rows may see
    (under a causal mask or a window a contiguous range, so the slice's own bottom-right
    alignment gives the same positions). ``call(q, k, v, mask)`` makes a slice's arguments;
    None where the whole call is cheap to check."""
    ax = 2 if layout == "BHSD" else 1
    b, lq, lk = q.shape[0], q.shape[ax], k.shape[ax]
    # Rows that see no key average every value: no slice of the keys gives that.
    if b * q.shape[3 - ax] * lq * lk <= CHECK_SCORES or (causal and lq > lk):
        return None
    out = []
    for a in sorted({0, max(0, (lq - CHECK_ROWS) // 2), max(0, lq - CHECK_ROWS)}):
        rows = slice(a, min(lq, a + CHECK_ROWS))
        keys = slice(*key_range(a, rows.stop, lq, lk, causal, window))
        part = [x[(slice(None),) * ax + (s,)] for x, s in ((q, rows), (k, keys), (v, keys))]
        block = None
        if mask is not None:
            full = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            block = full[
                ...,
                rows if full.shape[2] > 1 else slice(None),
                keys if full.shape[3] > 1 else slice(None),
            ]
        out.append((call(*part, block), _row_selector(rows, ax)))
    return out


def _row_selector(rows: slice, axis: int) -> Callable:
    return lambda outs: [o[(slice(None),) * axis + (rows,)] for o in outs]


# What a candidate's check allows: an output's rounding error scales with the values it averages,
# not with the output (MLX's float16 CPU attention missed the elementwise atol near zero).
TOLERANCES = {"float32": (2e-5, 1e-4), "float16": (4e-3, 1e-2), "bfloat16": (3e-2, 4e-2)}

# Scores the dense composition may form (float32: 4 GiB); past it, it is left out.
MAX_DENSE_SCORES = 2**30


# From this many scores on (float32: 512 MiB; sizes as bucketed in the problem key), MLX's CPU
# attention would form them all: the blocked composition serves instead, within LONG_MAX_BLOCKS.
LONG_SCORES = 2**27
LONG_BLOCKS = {"block_q": 128, "block_k": 128}
# Wider blocks peak higher (docs/notes/2026-11-26-blocked-attention-memory.md).
LONG_MAX_BLOCKS = {"block_q": 512, "block_k": 128}


def mlx_default(dtype: str, backend: str) -> bool:
    """Whether MLX's attention is the default of every problem on ``backend`` (not on the CPU,
    where :func:`untuned` serves long calls with the blocked composition)."""
    return backend != "cpu"


def untuned(problem: dict, backend: str, builtin: str) -> tuple[str, dict]:
    """An attention op's default: ``builtin``, or on the CPU from LONG_SCORES scores on the
    blocked composition."""
    if backend == "cpu" and scores(problem) >= LONG_SCORES:
        return "blocked", dict(LONG_BLOCKS)
    return builtin, {}


def scores(p: dict) -> int:
    """How many scores a dense call on problem ``p`` forms."""
    return p["batch"] * p["q_heads"] * p["q_len"] * p["kv_len"]


def dense_variant(reference: Callable) -> Variant:
    """The op's dense reference as a variant, where its (batch, heads, q_len, kv_len) scores
    fit."""
    return Variant(
        "dense",
        lambda: reference,
        supports=lambda p, _: scores(p) <= MAX_DENSE_SCORES,
        description="composition: full score matrix",
    )


def block_steps(
    lq: int, lk: int, block_q: int, block_k: int, causal: bool, window: int | None
) -> int:
    """How many (query block, key block) steps :func:`blocked` takes."""
    steps = 0
    for i0 in range(0, lq, block_q):
        lo, hi = key_range(i0, min(i0 + block_q, lq), lq, lk, causal, window)
        steps += max(0, -(-(hi - lo) // block_k))
    return steps


def _step(qb, kb, vb, top, total, acc, keep, bias, hidden):
    """One block of keys of the online softmax: the running maximum, sum and weighted sum;
    ``hidden`` is what a score ``keep`` hides becomes."""
    s = qb @ kb.swapaxes(-1, -2)
    if keep is not None:
        s = mx.where(keep, s, hidden)
    if bias is not None:
        s = s + bias
    new_top = mx.maximum(top, mx.max(s, axis=-1, keepdims=True))
    safe = mx.where(mx.isinf(new_top), 0.0, new_top)  # rows that see nothing yet
    p = mx.exp(s - safe)
    rescale = mx.exp(top - safe)
    return new_top, total * rescale + mx.sum(p, axis=-1, keepdims=True), acc * rescale + p @ vb


def _block(mask: mx.array, rows: tuple[int, int], cols: tuple[int, int]) -> mx.array:
    """The block of a broadcastable mask at ``rows`` x ``cols`` (a size-1 dim stays as it is)."""
    r = slice(*rows) if mask.shape[-2] > 1 else slice(None)
    c = slice(*cols) if mask.shape[-1] > 1 else slice(None)
    return mask[..., r, c]


def _inside(i0: int, i1: int, j0: int, j1: int, off: int, window: int | None) -> bool:
    """Whether every (row, col) of the block is visible (causal, and inside the window)."""
    below_diagonal = j1 - 1 <= i0 + off
    in_window = window is None or j0 > i1 - 1 + off - window
    return below_diagonal and in_window
