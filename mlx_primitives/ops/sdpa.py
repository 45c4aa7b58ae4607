"""``mx.fast.scaled_dot_product_attention`` with its exact signature and semantics, served by
the tuned attention variants (through :func:`flash_attention`)."""

from __future__ import annotations

import mlx.core as mx

from ..patch import MLX_FAST
from .flash_attention import OP as FLASH

NAME = "scaled_dot_product_attention"


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: str | mx.array | None = None,
    sinks: mx.array | None = None,
    force_fused: bool = False,
    stream: mx.Stream | None = None,
) -> mx.array:
    """Multi-head attention, ``softmax(q k^T * scale + mask) v``, as
    ``mx.fast.scaled_dot_product_attention``, routed to the tuned variants.

    Args:
        q: queries, ``(B, N_q, T_q, D)``.
        k: keys, ``(B, N_kv, T_kv, D)``, ``N_q`` a multiple of ``N_kv`` (GQA, MQA).
        v: values, ``(B, N_kv, T_kv, D_v)``.
        scale: scores are multiplied by this.
        mask: None, ``"causal"`` (aligned bottom-right: with more queries than keys the first
            rows see no key), or a boolean or additive array of at most 4 dims broadcastable
            to ``(B, N_q, T_q, T_kv)``. A row that may attend to no key gives the mean of the
            values under a boolean or causal mask, and NaN under an additive -inf.
        sinks: one logit per query head, ``(N_q,)``.
        force_fused: MLX's own fused kernel, as MLX does with it.
        stream: the stream or device to run on.
    """
    if force_fused or (mask.__class__ is str and mask != "causal"):
        return _mlx(q, k, v, scale, mask, sinks, force_fused, stream)
    causal = mask.__class__ is str
    try:
        # Values with a head dim of their own (MLA) are not modelled: checked up front, as
        # they would fail the problem's check at every call.
        if v.shape[-1] == q.shape[-1]:
            array = None if causal else mask
            return FLASH.serve(q, k, v, causal, scale, "BHSD", array, sinks, stream)
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    # What the variants do not model (those values, dtypes to promote, empty arrays) MLX's own
    # op serves, and it raises MLX's errors.
    return _mlx(q, k, v, scale, mask, sinks, force_fused, stream)


def _mlx(q, k, v, scale, mask, sinks, force_fused, stream):
    return MLX_FAST[NAME](
        q, k, v, scale=scale, mask=mask, sinks=sinks, force_fused=force_fused, stream=stream
    )
