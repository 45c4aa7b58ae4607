"""Cross-attention over long key/value sequences, one chunk of keys at a time (online
softmax), so memory grows with the chunk, not with the key length."""

from __future__ import annotations

import mlx.core as mx

from ..registry import Example, Op, Variant, register
from . import _attention as att
from ._common import check_int
from .flash_attention import _builtin, _case, _example

NAME = "chunked_cross_attention"
DIMS = att.DIMS


def _problem(q, k, v, chunk_size, scale, layout):
    dtype, (b, hq, hkv, lq, lk, d) = att.check_qkv(NAME, q, k, v, layout, scale)
    if chunk_size is not None:
        check_int(NAME, "chunk_size", chunk_size, minimum=1)
    return dtype, att.problem_values(b, hq, hkv, lq, lk, d, layout)


def reference(q, k, v, chunk_size, scale, layout):
    return att.reference(q, k, v, scale=scale, layout=layout)


def _check_slices(args):
    q, k, v, chunk_size, scale, layout = args

    def call(q, k, v, _mask):
        return q, k, v, chunk_size, scale, layout

    return att.check_slices(q, k, v, layout, call)


def _chunked(chunk: int):
    def fn(q, k, v, chunk_size, scale, layout):
        lq = q.shape[2] if layout == "BHSD" else q.shape[1]
        return att.blocked(
            q, k, v, scale=scale, layout=layout, block_q=lq, block_k=chunk_size or chunk
        )

    return fn


def _plain(q, k, v, chunk_size, scale, layout):
    return _builtin(q, k, v, False, scale, layout, None, None)


def _cross_example(shapes, dtype, key, layout="BHSD", **_):
    q, k, v, *_ = _example(shapes, dtype, key, layout=layout)
    return q, k, v, None, None, layout


def _cross_case(p):
    shapes, options = _case({**p, "causal": False, "mask": "none"})
    return shapes, {"layout": options["layout"]}


def _presets():
    def ex(b, h, hkv, lq, lk, d, dtype, layout="BHSD"):
        return Example(att.qkv_shapes(b, h, hkv, lq, lk, d, layout), dtype, (("layout", layout),))

    quick = [ex(1, 4, 4, 64, 1024, 64, t) for t in ("float32", "float16")]
    default = [ex(1, 16, 16, 256, 16384, 64, "float16", lay) for lay in ("BHSD", "BSHD")] + [
        ex(4, 8, 8, 77, 4096, 128, "bfloat16")
    ]
    full = default + [ex(2, 8, 2, q, 32768, 128, "float16") for q in (64, 512)]
    return {"quick": quick, "default": default, "full": full}


def chunked_cross_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    chunk_size: int | None = None,
    scale: float | None = None,
    layout: str = "BHSD",
    stream: mx.Stream | None = None,
) -> mx.array:
    """Attention of queries over a long key/value sequence, chunk by chunk (not causal).

    Args:
        q: queries, (B, Hq, Lq, D) for ``layout="BHSD"`` or (B, Lq, Hq, D) for ``"BSHD"``.
        k: keys with Hkv heads (Hq a multiple of Hkv) and any number of positions.
        v: values, the shape of ``k``.
        chunk_size: keys per chunk; None lets the tuned dispatch choose the implementation
            and chunk size, an int always runs the chunked composition with it.
        scale: scores are multiplied by this; default ``1 / sqrt(D)``.
        layout: ``"BHSD"`` or ``"BSHD"``.
        stream: the stream or device to run on (default: the default stream).
    """
    if chunk_size is not None:
        OP.problem(q, k, v, chunk_size, scale, layout)
        return _EXPLICIT(q, k, v, chunk_size, scale, layout, stream=stream)
    return OP.serve(q, k, v, chunk_size, scale, layout, stream)


OP = register(
    Op(
        NAME,
        signature=chunked_cross_attention,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_cross_example,
        case=_cross_case,
        default=lambda problem, backend: ("builtin", {}),
        variants=[
            Variant("builtin", lambda: _plain, description="mx.fast.scaled_dot_product_attention"),
            att.dense_variant(reference),
            Variant(
                "chunked",
                _chunked,
                space={"chunk": (1024, 256, 512, 2048, 4096)},
                supports=lambda p, c: c["chunk"] <= max(p["kv_len"], 256),
                description="composition: online softmax over chunks of keys",
            ),
        ],
        presets=_presets(),
        differentiable=(0, 1, 2),
        tolerances=att.TOLERANCES,
        check_slices=_check_slices,
    )
)

# An explicit chunk_size: the chunked composition with it (its own chunk overrides the
# variant's parameter), made once.
_EXPLICIT = OP.accepting(_chunked(0))
