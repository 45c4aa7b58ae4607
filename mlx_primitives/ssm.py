"""State-space models' drop-ins for mlx-lm: Mamba-2's ``ssm_update`` and ``ssm_attn`` on the
tuned :func:`mlx_primitives.selective_scan`, and the gated delta rule's ``gated_delta_update``
on the tuned :func:`mlx_primitives.gated_delta`."""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from .ops.selective_scan import selective_scan


@partial(mx.compile, shapeless=True)
def _step_sizes(dt, dt_bias, low, high):
    dt = dt.astype(mx.float32) + dt_bias
    return mx.clip(mx.logaddexp(dt, mx.zeros_like(dt)), low, high)


def _shape(op: str, name: str, a, shape: tuple, what: str, floating: bool = True) -> None:
    """``a`` is an mx.array of ``shape`` (``what`` names its dims for the message)."""
    if not isinstance(a, mx.array):
        raise TypeError(f"[{op}] {name} must be an mlx.core.array, got {type(a).__name__}")
    if floating and not mx.issubdtype(a.dtype, mx.floating):
        raise ValueError(f"[{op}] {name} must have a floating dtype, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"[{op}] {name} has shape {a.shape}, expected {shape} {what}")


def _check(op: str, x, A_log, B, C, D, dt, dt_bias, state, mask, lengths) -> None:
    """mlx-lm's Mamba-2 arguments, each named where it is wrong."""
    if not isinstance(x, mx.array) or x.ndim != 4:
        raise ValueError(f"[{op}] x must be (batch, length, heads, head_dim), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")  # fmt: skip
    batch, length, heads, head_dim = x.shape
    _shape(op, "A_log", A_log, (heads,), "(heads,)")
    _shape(op, "dt", dt, (batch, length, heads), "(batch, length, heads)")
    _shape(op, "dt_bias", dt_bias, (heads,), "(heads,)")
    _shape(op, "D", D, (heads,), "(heads,)")
    groups_states = B.shape[2:] if isinstance(B, mx.array) and B.ndim == 4 else (1, 1)
    for name, m in (("B", B), ("C", C)):
        _shape(op, name, m, (batch, length, *groups_states), "(batch, length, groups, states)")
    if heads % groups_states[0]:
        raise ValueError(f"[{op}] B has {groups_states[0]} groups, which do not split {heads} "
                         "heads evenly")  # fmt: skip
    if state is not None:
        want = (batch, heads, head_dim, groups_states[1])
        _shape(op, "state", state, want, "(batch, heads, head_dim, states)")
    if mask is not None:
        _shape(op, "mask", mask, (batch, length), "(batch, length)", floating=False)
    if lengths is not None:
        _shape(op, "lengths", lengths, (batch,), "(batch,)", floating=False)


def _ssm(op: str, x, A_log, B, C, D, dt, dt_bias, state, limits, mask, lengths, kernel_dtypes):
    """The SSM through :func:`selective_scan`. ``kernel_dtypes``: the output in x's dtype and
    the state in its own, as mlx-lm's Metal decoding kernel gives them; else as its
    ``ssm_attn``: the output in x's and D's promoted dtype, the state in float32."""
    _check(op, x, A_log, B, C, D, dt, dt_bias, state, mask, lengths)
    batch, length, heads, head_dim = x.shape
    delta = _step_sizes(dt, dt_bias, *limits)
    if lengths is not None:
        real = mx.arange(length)[None] < lengths[:, None]
        mask = real if mask is None else mx.logical_and(real, mask.astype(mx.bool_))
    if mask is not None:
        delta = mx.where(mask.astype(mx.bool_)[..., None], delta, 0.0)
    channels = heads * head_dim
    if state is not None:
        state = state.reshape(batch, channels, -1)
        if not kernel_dtypes:
            state = state.astype(mx.float32)
    A = -mx.exp(A_log.astype(mx.float32))
    y, state = selective_scan(x.reshape(batch, length, channels), delta, A, B, C, D,
                              return_state=True, state=state)  # fmt: skip
    y = y.reshape(x.shape).astype(x.dtype if kernel_dtypes else mx.result_type(x, D))
    return y, state.reshape(batch, heads, head_dim, -1)


def ssm_attn(
    x: mx.array,
    A_log: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    dt: mx.array,
    dt_bias: mx.array,
    state: mx.array | None = None,
    time_step_limit: tuple[float, float] = (0.001, 100.0),
    mask: mx.array | None = None,
    lengths: mx.array | None = None,
    step: int = 256,
) -> tuple[mx.array, mx.array]:
    """mlx-lm's Mamba-2 SSM (``mlx_lm.models.ssm.ssm_attn``): the same arguments, state layout
    and results, through :func:`mlx_primitives.selective_scan` with one decay per head. The
    output has x's and D's promoted dtype, the state float32, as mlx-lm's.

    A position that ``mask`` hides or that lies past its sequence's ``lengths`` leaves the
    state as it was (its own output is padding).

    Args:
        x: ``(batch, length, heads, head_dim)``.
        A_log: the decays' logarithms, ``(heads,)``.
        B, C: ``(batch, length, groups, states)``.
        D: the skip connection, ``(heads,)``.
        dt: the raw step sizes, ``(batch, length, heads)``.
        dt_bias: ``(heads,)``.
        state: ``(batch, heads, head_dim, states)`` (default zeros).
        time_step_limit: the step sizes' bounds after softplus.
        mask: ``(batch, length)``, True (or nonzero) where a position is real.
        lengths: ``(batch,)``, each sequence's length (a negative one keeps the state).
        step: mlx-lm's chunk size; accepted for its signature, the chunk is tuned here.
    """
    return _ssm("ssm_attn", x, A_log, B, C, D, dt, dt_bias, state, time_step_limit, mask,
                lengths, kernel_dtypes=False)  # fmt: skip


def ssm_update(
    hidden_states: mx.array,
    A_log: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    dt: mx.array,
    dt_bias: mx.array,
    state: mx.array | None = None,
    time_step_limit: tuple[float, float] = (0.001, 100.0),
    mask: mx.array | None = None,
    lengths: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """mlx-lm's ``ssm_update`` (Mamba-2, Nemotron-H, Falcon-H1, Granite-MoE-hybrid, PLaMo 2):
    prefill and decoding steps alike through :func:`selective_scan` (the tuned dispatch picks
    the chunked product, the recurrent kernel or a composition per shape). Arguments as
    :func:`ssm_attn`'s; the dtypes as mlx-lm's path on this device gives them (on Metal a
    decoding step keeps x's dtype and the state's, as its kernel does)."""
    kernel = (
        isinstance(hidden_states, mx.array)
        and hidden_states.ndim == 4
        and hidden_states.shape[1] == 1
        and state is not None
        and mx.default_device() == mx.gpu
        and mx.metal.is_available()
    )
    return _ssm("ssm_update", hidden_states, A_log, B, C, D, dt, dt_bias, state,
                time_step_limit, mask, lengths, kernel_dtypes=kernel)  # fmt: skip


@partial(mx.compile, shapeless=True)
def _gates(a, b, A_log, dt_bias):
    """The decays ``exp(-exp(A_log) softplus(a + dt_bias))`` in float32 and the strengths
    ``sigmoid(b)`` in b's dtype (compiled, as mlx-lm's)."""
    g = mx.exp(-mx.exp(A_log.astype(mx.float32)) * mx.logaddexp(a + dt_bias, mx.zeros_like(a)))
    return g, mx.sigmoid(b)


def _bounded_gates(a, b, A_log, dt_bias, lower_bound):
    """:func:`_gates` with the decays bounded below: ``exp(lower_bound sigmoid(...))``."""
    decay = mx.exp(A_log.astype(mx.float32))
    g = mx.exp(lower_bound * mx.sigmoid(decay * (a.astype(mx.float32) + dt_bias)))
    return g, mx.sigmoid(b)


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
        use_kernel: False runs mlx-lm's own token-by-token composition, each step compiled
            (as mlx-lm does in training).
        lower_bound: bound the decays from below (``exp(lower_bound * sigmoid(...))``).
        allow_neg_eigval: beta in [0, 2] instead of [0, 1].
    """
    from .ops.gated_delta import OP, gated_delta

    if lower_bound is None:
        g, beta = _gates(a, b, A_log, dt_bias)
    else:
        g, beta = _bounded_gates(a, b, A_log, dt_bias, lower_bound)
    if allow_neg_eigval:
        beta = beta * 2.0
    if not use_kernel:
        return OP.variant("compiled").build()(q, k, v, g, beta, state, mask)
    return gated_delta(q, k, v, g, beta, state, mask)
