"""Mixture-of-experts helpers: routing bookkeeping, the auxiliary losses, and the gather and
scatter of token rows. Everything stays on the device: no call reads an array back to the host,
so a whole MoE block traces under ``mx.compile``."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from .ops._gather import check_indices, inverse


def _floating(op: str, name: str, x) -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"[{op}] {name} must be an mlx.core.array, got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"[{op}] {name} must have a floating dtype, got {x.dtype}")


def _experts(op: str, indices, num_experts) -> None:
    if check_indices(op, "indices", indices) is None:
        raise TypeError(f"[{op}] indices must be an mlx.core.array, got None")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"[{op}] num_experts must be a positive int, got {num_experts!r}")


class ExpertDispatch(NamedTuple):
    """Where each (token, expert) pair goes, from :func:`build_expert_dispatch`.

    Attributes:
        order: the pairs (flat positions in ``indices``) in expert order.
        experts: the expert of each pair in that order (ascending).
        tokens: the token of each pair in that order (``order // top_k``).
        counts: pairs per expert, ``(num_experts,)``.
        offsets: where each expert's pairs start in ``order``, ``(num_experts + 1,)``.
        inverse: the position in ``order`` of each pair (``order[inverse] == arange``).
    """

    order: mx.array
    experts: mx.array
    tokens: mx.array
    counts: mx.array
    offsets: mx.array
    inverse: mx.array


def build_expert_dispatch(indices: mx.array, num_experts: int) -> ExpertDispatch:
    """Sort a router's choices by expert, on the device.

    Args:
        indices: the experts of each token, ``(..., top_k)`` integers in ``[0, num_experts)``.
        num_experts: the number of experts.
    """
    _experts("build_expert_dispatch", indices, num_experts)
    top_k = indices.shape[-1] if indices.ndim else 1
    flat = indices.reshape(-1).astype(mx.uint32)
    pairs = flat.size
    order = mx.argsort(flat).astype(mx.uint32)
    counts = mx.zeros((num_experts,), mx.int32).at[flat].add(mx.ones((pairs,), mx.int32))
    offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
    return ExpertDispatch(order, flat[order], order // top_k, counts, offsets, inverse(order))


def compute_load_balancing_loss(
    router_logits: mx.array,
    indices: mx.array,
    num_experts: int | None = None,
    z_loss_weight: float = 0.0,
) -> mx.array:
    """The Switch Transformer / GShard auxiliary loss, ``E * sum_e f_e * P_e`` (``f_e`` the
    share of the routed pairs that expert ``e`` got, ``P_e`` its mean router probability),
    plus ``z_loss_weight`` times the router z-loss, the mean squared log-sum-exp of the
    logits (ST-MoE). It is 1 for a perfectly balanced router; gradients reach the logits.

    Args:
        router_logits: ``(..., num_experts)``.
        indices: the chosen experts, ``(..., top_k)`` over the same leading dims.
        num_experts: the number of experts (default: the logits' last dim).
        z_loss_weight: the weight of the z-loss term.
    """
    op = "compute_load_balancing_loss"
    _floating(op, "router_logits", router_logits)
    experts = router_logits.shape[-1] if num_experts is None else num_experts
    _experts(op, indices, experts)
    if router_logits.shape[-1] != experts:
        raise ValueError(
            f"[{op}] router_logits has {router_logits.shape[-1]} experts, expected {experts}"
        )
    if indices.shape[:-1] != router_logits.shape[:-1]:
        raise ValueError(
            f"[{op}] indices has shape {indices.shape}, expected {router_logits.shape[:-1]} "
            "before its last dim like router_logits"
        )
    logits = router_logits.astype(mx.float32).reshape(-1, experts)
    probs = mx.softmax(logits, axis=-1)
    flat = mx.stop_gradient(indices).reshape(-1).astype(mx.uint32)
    share = mx.zeros((experts,), mx.float32).at[flat].add(mx.ones(flat.shape)) / flat.size
    loss = experts * mx.sum(share * probs.mean(axis=0))
    if z_loss_weight:
        loss = loss + z_loss_weight * mx.mean(mx.square(mx.logsumexp(logits, axis=-1)))
    return loss


def selective_gather(x: mx.array, indices: mx.array) -> mx.array:
    """The rows ``x[indices]`` (along the first axis), differentiable in ``x``.

    Args:
        x: ``(rows, ...)``, any floating dtype.
        indices: integer rows to take, any shape.
    """
    _floating("selective_gather", "x", x)
    if check_indices("selective_gather", "indices", indices) is None:
        raise TypeError("[selective_gather] indices must be an mlx.core.array, got None")
    return mx.take(x, indices, axis=0)


def selective_scatter_add(
    target: mx.array, updates: mx.array, indices: mx.array, weights: mx.array | None = None
) -> mx.array:
    """``target`` with row ``indices[i]`` increased by ``updates[i]`` (times ``weights[i]``),
    repeated indices adding up: how expert outputs are combined per token. Differentiable in
    ``target``, ``updates`` and ``weights``.

    Args:
        target: ``(rows, ...)``, any floating dtype.
        updates: ``(n, ...)`` with ``target``'s trailing dims.
        indices: ``(n,)`` integer rows of ``target``.
        weights: optional ``(n,)`` factors of the updates.
    """
    op = "selective_scatter_add"
    _floating(op, "target", target)
    _floating(op, "updates", updates)
    shape = check_indices(op, "indices", indices)
    if shape is None or len(shape) != 1:
        raise ValueError(f"[{op}] indices must be a 1-D integer array, got {shape}")
    if updates.shape != (shape[0], *target.shape[1:]):
        raise ValueError(
            f"[{op}] updates has shape {updates.shape}, expected {(shape[0], *target.shape[1:])}"
        )
    if weights is not None:
        _floating(op, "weights", weights)
        if weights.shape != shape:
            raise ValueError(f"[{op}] weights has shape {weights.shape}, expected {shape}")
        updates = updates * weights.reshape(shape + (1,) * (updates.ndim - 1))
    return target.at[indices].add(updates.astype(target.dtype))
