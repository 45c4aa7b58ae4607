"""State-space models: Mamba's selective scan, composed on the tuned :func:`linear_scan`."""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from .ops._common import accumulator
from .ops.linear_scan import linear_scan

NAME = "selective_scan"


def _array(name: str, a, ndim: tuple[int, ...]) -> tuple:
    if not isinstance(a, mx.array):
        raise TypeError(f"[{NAME}] {name} must be an mlx.core.array, got {type(a).__name__}")
    if not mx.issubdtype(a.dtype, mx.floating):
        raise ValueError(f"[{NAME}] {name} must have a floating dtype, got {a.dtype}")
    if a.ndim not in ndim:
        raise ValueError(f"[{NAME}] {name} must have {' or '.join(map(str, ndim))} dims, got "
                         f"shape {a.shape}")  # fmt: skip
    return a.shape


def _per_channel(name: str, m: mx.array, shape: tuple, channels: int) -> mx.array:
    """B or C as ``(batch, length, channels, state)``: ``(batch, length, state)`` is shared by
    every channel, ``(batch, length, groups, state)`` split evenly over them."""
    got = _array(name, m, (3, 4))
    batch, length = shape[:2]
    if got[:2] != (batch, length):
        raise ValueError(f"[{NAME}] {name} has shape {got}, expected ({batch}, {length}, ...)")
    if m.ndim == 3:
        return m[:, :, None, :]
    groups = got[2]
    if channels % groups:
        raise ValueError(
            f"[{NAME}] {name} has {groups} groups, which do not split {channels} channels evenly"
        )
    return mx.repeat(m, channels // groups, axis=2)


def selective_scan(
    u: mx.array,
    delta: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array | None = None,
    z: mx.array | None = None,
    delta_bias: mx.array | None = None,
    delta_softplus: bool = False,
    return_state: bool = False,
):
    """Mamba's selective scan (mamba-ssm's ``selective_scan_fn``), channels last: per channel
    ``d`` and state ``n``, ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` and
    ``y_t = C_t . h_t + D u_t``, times ``silu(z_t)`` when ``z`` is given. The recurrence runs
    through the tuned :func:`mlx_primitives.linear_scan`; accumulated in float32, returned in
    ``u``'s dtype; differentiable in every input.

    Args:
        u: the input, ``(batch, length, channels)``.
        delta: the step sizes, like ``u``.
        A: the state matrix (diagonal per channel), ``(channels, state)``.
        B: ``(batch, length, state)``, or ``(batch, length, groups, state)`` with the
            channels split evenly over the groups.
        C: like ``B``.
        D: the skip connection, ``(channels,)``.
        z: the gate, like ``u``.
        delta_bias: added to ``delta``, ``(channels,)``.
        delta_softplus: pass ``delta`` (plus its bias) through softplus.
        return_state: also return the last state, ``(batch, channels, state)``.
    """
    shape = _array("u", u, (3,))
    channels = shape[2]
    if _array("delta", delta, (3,)) != shape:
        raise ValueError(f"[{NAME}] delta has shape {delta.shape}, expected {shape} like u")
    a_shape = _array("A", A, (2,))
    if a_shape[0] != channels:
        raise ValueError(f"[{NAME}] A has shape {a_shape}, expected ({channels}, state)")
    state = a_shape[1]
    Bc, Cc = (_per_channel(n, m, shape, channels) for n, m in (("B", B), ("C", C)))
    for name, m in (("B", Bc), ("C", Cc)):
        if m.shape[-1] != state:
            raise ValueError(f"[{NAME}] {name} has {m.shape[-1]} states, expected {state} like A")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and _array(name, v, (1,)) != (channels,):
            raise ValueError(f"[{NAME}] {name} has shape {v.shape}, expected ({channels},)")
    if z is not None and _array("z", z, (3,)) != shape:
        raise ValueError(f"[{NAME}] z has shape {z.shape}, expected {shape} like u")

    acc = accumulator(u.dtype)
    uf, dt = u.astype(acc), delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)
    if delta_softplus:
        dt = mx.logaddexp(dt, mx.zeros_like(dt))
    decay = mx.exp(dt[..., None] * A.astype(acc))  # (batch, length, channels, state)
    drive = (dt * uf)[..., None] * Bc.astype(acc)
    h = linear_scan(decay, drive, axis=1)
    y = (h * Cc.astype(acc)).sum(-1)
    if D is not None:
        y = y + uf * D.astype(acc)
    if z is not None:
        zf = z.astype(acc)
        y = y * zf * mx.sigmoid(zf)
    y = y.astype(u.dtype)
    return (y, h[:, -1].astype(u.dtype)) if return_state else y


@partial(mx.compile, shapeless=True)
def _raw_gates(a, b, A_log, dt_bias):
    g = mx.exp(-mx.exp(A_log.astype(mx.float32)) * mx.logaddexp(a + dt_bias, mx.zeros_like(a)))
    return g, mx.sigmoid(b)


def _gates(a, b, A_log, dt_bias, dtype):
    """The decays ``exp(-exp(A_log) softplus(a + dt_bias))`` and strengths ``sigmoid(b)``
    (compiled, as mlx-lm's), in ``dtype``."""
    g, beta = _raw_gates(a, b, A_log, dt_bias)
    return g.astype(dtype), beta.astype(dtype)


def _bounded_gates(a, b, A_log, dt_bias, dtype, lower_bound):
    """:func:`_gates` with the decays bounded below: ``exp(lower_bound sigmoid(...))``."""
    decay = mx.exp(A_log.astype(mx.float32))
    g = mx.exp(lower_bound * mx.sigmoid(decay * (a.astype(mx.float32) + dt_bias)))
    return g.astype(dtype), mx.sigmoid(b).astype(dtype)


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    *,
    use_kernel: bool = True,
    lower_bound: float | None = None,
    allow_neg_eigval: bool = False,
) -> tuple[mx.array, mx.array]:
    """mlx-lm's ``gated_delta_update`` (Qwen3-Next, Kimi Linear, Qwen3.5), through the tuned
    :func:`mlx_primitives.gated_delta`: the same arguments, state layout and results.

    Args:
        q, k: ``(batch, tokens, k_heads, k_dims)``, normalized by the caller (mlx-lm's
            ``normalize_qk``).
        v: ``(batch, tokens, v_heads, v_dims)``.
        a, b: the gate and strength inputs, ``(batch, tokens, v_heads)``.
        A_log, dt_bias: the layer's decay parameters, ``(v_heads,)``.
        state: ``(batch, v_heads, v_dims, k_dims)`` (default zeros, float32).
        mask: ``(batch, tokens)`` booleans.
        use_kernel: False runs the token-by-token composition (as mlx-lm does in training).
        lower_bound: bound the decays from below (``exp(lower_bound * sigmoid(...))``).
        allow_neg_eigval: beta in [0, 2] instead of [0, 1].
    """
    from .ops.gated_delta import OP, gated_delta

    if lower_bound is None:
        g, beta = _gates(a, b, A_log, dt_bias, q.dtype)
    else:
        g, beta = _bounded_gates(a, b, A_log, dt_bias, q.dtype, lower_bound)
    if allow_neg_eigval:
        beta = beta * 2.0
    if not use_kernel:
        return OP.variant("steps").build()(q, k, v, g, beta, state, mask)
    return gated_delta(q, k, v, g, beta, state, mask)
