"""Causal sliding-window attention: query i attends to keys i - window + 1 .. i (positions
aligned bottom-right when there are fewer queries than keys)."""

from __future__ import annotations

import math

import mlx.core as mx

from ..patch import MLX_FAST
from ..problem import EXACT, Dim, bucket
from ..registry import Example, Op, Variant, register
from . import _attention as att
from ._attention_kernels import decode_mma_variant, decode_variant, flash_variant
from ._common import check_int
from .flash_attention import BLOCKS, _blocked_supports, _case, _example

NAME = "sliding_window_attention"
DIMS = (
    *att.DIMS,
    Dim("window"),
    Dim("mask", EXACT, default="none"),
    Dim("sinks", EXACT, default=False),
)


def _problem(q, k, v, window_size, scale, layout, mask, sinks):
    dtype, (b, hq, hkv, lq, lk, d) = att.check_qkv(NAME, q, k, v, layout, scale)
    check_int(NAME, "window_size", window_size, minimum=1)
    if lq > lk:
        raise ValueError(f"[{NAME}] needs q_len <= kv_len, got {lq} > {lk}")
    mask_kind = att.check_mask(NAME, mask, (b, hq, lq, lk), dtype)
    has_sinks = att.check_sinks(NAME, sinks, hq, dtype)
    window = min(window_size, lk)  # a window past the start is the causal mask
    values = att.problem_values(b, hq, hkv, lq, lk, d, layout)
    return dtype, (*values, bucket(window), mask_kind, has_sinks)


def reference(q, k, v, window_size, scale, layout, mask, sinks):
    return att.reference(
        q,
        k,
        v,
        scale=scale,
        causal=True,
        window=window_size,
        mask=mask,
        sinks=sinks,
        layout=layout,
    )


def _check_slices(args):
    q, k, v, window, scale, layout, mask, sinks = args

    def call(q, k, v, mask):
        return q, k, v, window, scale, layout, mask, sinks

    return att.check_slices(q, k, v, layout, call, causal=True, window=window, mask=mask)


def _dense_mask(q, k, v, window_size, scale, layout, mask, sinks):
    """MLX's fused attention with the window as a dense mask (O(seq^2) memory)."""
    q, k, v = (att.to_bhsd(a, layout) for a in (q, k, v))
    lq, lk = q.shape[2], k.shape[2]
    keep = att.fold(mask, att.visible(lq, lk, (0, lq), (0, lk), True, window_size), q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = MLX_FAST["scaled_dot_product_attention"](q, k, v, scale=scale, mask=keep, sinks=sinks)
    return att.to_bhsd(out, layout)


def _blocked(block_q: int, block_k: int):
    def fn(q, k, v, window_size, scale, layout, mask, sinks):
        return att.blocked(
            q,
            k,
            v,
            scale=scale,
            causal=True,
            window=window_size,
            mask=mask,
            sinks=sinks,
            layout=layout,
            block_q=block_q,
            block_k=block_k,
        )

    return fn


def _kernel_args(fn):
    """A kernel launcher ``fn(q, k, v, causal, scale, layout, window)`` taking the op's
    arguments."""

    def call(q, k, v, window_size, scale, layout, mask, sinks):
        if mask is not None or sinks is not None:
            raise ValueError(f"[{NAME}] the custom kernels take no mask array and no sinks")
        return fn(q, k, v, True, scale, layout, window_size)

    return call


def _window_example(shapes, dtype, key, layout="BHSD", window=16, mask="none", sinks=False, **_):
    q, k, v, _, _, _, array, logits = _example(
        shapes, dtype, key, layout=layout, mask=mask, sinks=sinks
    )
    return q, k, v, window, None, layout, array, logits


def _window_case(p):
    shapes, options = _case({**p, "causal": True})
    return shapes, {
        "layout": options["layout"],
        "window": p["window"],
        "mask": p["mask"],
        "sinks": p["sinks"],
    }


def _presets():
    def ex(b, h, hkv, s, d, window, dtype, layout="BHSD"):
        shapes = att.qkv_shapes(b, h, hkv, s, s, d, layout)
        return Example(shapes, dtype, (("layout", layout), ("window", window)))

    quick = [ex(1, 4, 2, 256, 64, w, t) for w in (16, 64) for t in ("float32", "float16")]
    default = [
        ex(1, 32, 8, s, 128, 512, "float16", lay) for s in (4096, 16384) for lay in ("BHSD", "BSHD")
    ]
    full = default + [ex(2, 16, 4, s, 64, w, "bfloat16") for s in (2048, 8192) for w in (128, 1024)]
    return {"quick": quick, "default": default, "full": full}


def sliding_window_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    window_size: int,
    *,
    scale: float | None = None,
    layout: str = "BHSD",
    mask: mx.array | None = None,
    sinks: mx.array | None = None,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Causal attention within a sliding window: query i sees keys i - window_size + 1 .. i.

    Args:
        q: queries, (B, Hq, Lq, D) for ``layout="BHSD"`` or (B, Lq, Hq, D) for ``"BSHD"``.
        k: keys with Hkv heads (Hq a multiple of Hkv) and Lk >= Lq positions.
        v: values, the shape of ``k``.
        window_size: how many keys each query sees, itself included (>= 1).
        scale: scores are multiplied by this; default ``1 / sqrt(D)``.
        layout: ``"BHSD"`` or ``"BSHD"``.
        mask: as for :func:`flash_attention`, applied inside the window.
        sinks: as for :func:`flash_attention`.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(q, k, v, window_size, scale, layout, mask, sinks, stream)


OP = register(
    Op(
        NAME,
        signature=sliding_window_attention,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_window_example,
        case=_window_case,
        default=lambda problem, backend: att.untuned(problem, backend, "builtin_masked"),
        mlx_default=att.mlx_default,
        variants=[
            Variant(
                "builtin_masked",
                lambda: _dense_mask,
                description="mx.fast.scaled_dot_product_attention with a dense mask",
            ),
            att.dense_variant(reference),
            Variant(
                "blocked",
                _blocked,
                space=BLOCKS,
                supports=_blocked_supports,
                description="composition: only the key blocks inside the window",
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
