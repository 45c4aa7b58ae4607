"""Scaled dot-product attention: ``softmax(q k^T * scale + mask) v``, causal or not, with GQA,
in either layout, served by MLX's fused kernel or a blocked online-softmax composition."""

from __future__ import annotations

import math

import mlx.core as mx

from ..patch import MLX_FAST
from ..problem import EXACT, Dim
from ..registry import Example, Op, Variant, register
from . import _attention as att
from ._attention_kernels import decode_mma_variant, decode_variant, flash_variant
from ._common import check_bool, random

NAME = "flash_attention"
DIMS = (
    *att.DIMS,
    Dim("causal", EXACT),
    Dim("mask", EXACT),
    Dim("sinks", EXACT, default=False),
)
BLOCKS = {"block_q": (256, 64, 128, 512, 1024, 2048), "block_k": (512, 128, 256, 1024, 2048)}


def _problem(q, k, v, causal, scale, layout, mask, sinks):
    dtype, (b, hq, hkv, lq, lk, d) = att.check_qkv(NAME, q, k, v, layout, scale)
    check_bool(NAME, "causal", causal)
    mask_kind = att.check_mask(NAME, mask, (b, hq, lq, lk), dtype)
    has_sinks = att.check_sinks(NAME, sinks, hq, dtype)
    values = att.problem_values(b, hq, hkv, lq, lk, d, layout)
    return dtype, (*values, causal, mask_kind, has_sinks)


def reference(q, k, v, causal, scale, layout, mask, sinks):
    return att.reference(q, k, v, scale=scale, causal=causal, mask=mask, sinks=sinks, layout=layout)


def _check_slices(args):
    q, k, v, causal, scale, layout, mask, sinks = args

    def call(q, k, v, mask):
        return q, k, v, causal, scale, layout, mask, sinks

    return att.check_slices(q, k, v, layout, call, causal=causal, mask=mask)


def _builtin(q, k, v, causal, scale, layout, mask, sinks):
    bshd = layout == "BSHD"  # MLX's op takes BHSD: the other layout is swapped around it
    if bshd:
        q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if causal and mask is not None:  # the fused kernel takes one mask
        keep = att.visible(q.shape[2], k.shape[2], (0, q.shape[2]), (0, k.shape[2]), True, None)
        mask = att.fold(mask, keep, q.dtype)
    elif causal:
        mask = "causal"
    out = MLX_FAST["scaled_dot_product_attention"](q, k, v, scale=scale, mask=mask, sinks=sinks)
    return out.swapaxes(1, 2) if bshd else out


def _blocked(block_q: int, block_k: int):
    def fn(q, k, v, causal, scale, layout, mask, sinks):
        return att.blocked(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            mask=mask,
            sinks=sinks,
            layout=layout,
            block_q=block_q,
            block_k=block_k,
        )

    return fn


# Each block step is a handful of MLX ops built in Python: past this many steps building the
# graph costs more than larger blocks lose.
MAX_BLOCK_STEPS = 2048


def _blocked_supports(p: dict, params: dict) -> bool:
    bq, bk = params["block_q"], params["block_k"]
    if att.scores(p) >= att.LONG_SCORES:
        # The CPU's default serves there whatever its steps (their graph is a small cost).
        if params == att.LONG_BLOCKS:
            return True
        if any(params[n] > most for n, most in att.LONG_MAX_BLOCKS.items()):
            return False
    # One block of queries covers a short sequence: bigger blocks only repeat the same plan.
    if bq > max(p["q_len"], 64) or bk > max(p["kv_len"], 128):
        return False
    window = p.get("window")
    causal = p.get("causal", False) or window is not None
    return att.block_steps(p["q_len"], p["kv_len"], bq, bk, causal, window) <= MAX_BLOCK_STEPS


def _kernel_args(fn):
    """A kernel launcher ``fn(q, k, v, causal, scale, layout, window)`` taking the op's
    arguments."""

    def call(q, k, v, causal, scale, layout, mask, sinks):
        if mask is not None or sinks is not None:
            raise ValueError(f"[{NAME}] the custom kernels take no mask array and no sinks")
        ax = 2 if layout == "BHSD" else 1
        if causal and q.shape[ax] > k.shape[ax]:
            # Rows that see no key: rare, and the kernels do not average every value there.
            return reference(q, k, v, causal, scale, layout, mask, sinks)
        return fn(q, k, v, causal, scale, layout, 0)

    return call


def _example(
    shapes, dtype, key, causal=False, layout="BHSD", mask="none", kv_heads=None, sinks=False
):
    kq, kk, kv_, km = mx.random.split(key, 4)
    q_shape = tuple(shapes[0])
    b, h, lq, d = q_shape if layout == "BHSD" else (q_shape[0], q_shape[2], q_shape[1], q_shape[3])
    if len(shapes) > 1:
        k_shape = tuple(shapes[1])
    else:
        k_shape = att.qkv_shapes(b, h, kv_heads or h, lq, lq, d, layout)[1]
    lk = k_shape[2] if layout == "BHSD" else k_shape[1]
    array = None
    if mask == "bool":
        array = mx.random.uniform(shape=(lq, lk), key=km) > 0.2
    elif mask == "additive":
        array = mx.random.normal((1, h, lq, lk), key=km).astype(dtype)
    q, k, v = (random(q_shape, dtype, kq), random(k_shape, dtype, kk), random(k_shape, dtype, kv_))
    logits = random((h,), dtype, km) if sinks else None
    return q, k, v, causal, None, layout, array, logits


def _case(p):
    b, h, lq, lk, d = p["batch"], p["q_heads"], p["q_len"], p["kv_len"], p["head_dim"]
    shapes = att.qkv_shapes(b, h, h // p["group"], lq, lk, d, p["layout"])
    options = {"causal": p["causal"], "layout": p["layout"], "mask": p["mask"]}
    return shapes, {**options, "sinks": p.get("sinks", False)}


def _presets():
    def ex(b, h, hkv, lq, lk, d, dtype, **options):
        shapes = att.qkv_shapes(b, h, hkv, lq, lk, d, options.get("layout", "BHSD"))
        return Example(shapes, dtype, tuple(sorted(options.items())))

    quick = [
        ex(1, 4, 2, 128, 128, 64, t, causal=c)
        for t in ("float32", "float16")
        for c in (False, True)
    ]
    default = [
        *(
            ex(b, 32, 8, s, s, 128, "float16", causal=True, layout=lay)
            for b, s in ((1, 2048), (1, 8192))
            for lay in ("BHSD", "BSHD")
        ),
        # Decoding a batch and a single sequence: 3 powers of two apart in size, so neither
        # record serves the other (dispatch.NEAREST_MAX_DISTANCE).
        *(
            ex(b, 32, 8, 1, 8192, 128, "float16", causal=True, layout=lay)
            for b in (8, 1)
            for lay in ("BHSD", "BSHD")
        ),
        ex(4, 16, 16, 1024, 1024, 64, "bfloat16", causal=False),
    ]
    full = default + [
        ex(b, h, hkv, s, s, d, t, causal=c)
        for b, h, hkv, s, d in ((2, 8, 8, 512, 64), (1, 16, 4, 4096, 128), (4, 32, 32, 256, 96))
        for t in ("float16", "bfloat16")
        for c in (False, True)
    ]
    return {"quick": quick, "default": default, "full": full}


def flash_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "BHSD",
    mask: mx.array | None = None,
    sinks: mx.array | None = None,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, with the masks of
    ``mx.fast.scaled_dot_product_attention`` (a row that may attend to no key: the mean of
    the values under a boolean or causal mask, NaN under an additive -inf).

    Args:
        q: queries, (B, Hq, Lq, D) for ``layout="BHSD"`` or (B, Lq, Hq, D) for ``"BSHD"``.
        k: keys with Hkv heads (Hq a multiple of Hkv: GQA and MQA) and Lk positions.
        v: values, the shape of ``k``.
        causal: query i attends to keys up to i + Lk - Lq (aligned bottom-right; with more
            queries than keys the first rows see none).
        scale: scores are multiplied by this; default ``1 / sqrt(D)``.
        layout: ``"BHSD"`` or ``"BSHD"``; the output has the layout of ``q``.
        mask: boolean (True attends) or additive, of at most 4 dims broadcastable to
            (B, Hq, Lq, Lk); with ``causal`` both apply.
        sinks: one logit per query head, (Hq,): a softmax column whose weight is dropped.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(q, k, v, causal, scale, layout, mask, sinks, stream)


OP = register(
    Op(
        NAME,
        signature=flash_attention,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_example,
        case=_case,
        default=lambda problem, backend: att.untuned(problem, backend, "builtin"),
        mlx_default=att.mlx_default,
        variants=[
            Variant(
                "builtin", lambda: _builtin, description="mx.fast.scaled_dot_product_attention"
            ),
            att.dense_variant(reference),
            Variant(
                "blocked",
                _blocked,
                space=BLOCKS,
                supports=_blocked_supports,
                description="composition: online softmax over key blocks, O(n) memory",
            ),
            decode_variant(_kernel_args),
            decode_mma_variant(_kernel_args),
            flash_variant(_kernel_args),
        ],
        presets=_presets(),
        differentiable=(0, 1, 2),
        tolerances=att.TOLERANCES,
        check_slices=_check_slices,
    )
)
