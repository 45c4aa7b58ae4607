"""The gated delta rule (Qwen3-Next, Kimi Linear, Qwen3.5): per head a ``(Dv, Dk)`` state that
decays by ``g_t``, is corrected towards ``v_t`` along ``k_t`` by ``beta_t``, and is read by
``q_t``; the recurrence of mlx-lm's ``gated_delta_ops`` and Metal kernels, with their shapes."""

from __future__ import annotations

import mlx.core as mx

from ..dialect.kernel import with_reference_transforms
from ..problem import EXACT, Dim, bucket
from ..registry import Example, Op, Variant, register
from ._common import check_array, random
from ._gated_delta_kernels import recurrent_variant

NAME = "gated_delta"
DIMS = (
    Dim("batch"),
    Dim("tokens"),
    Dim("k_heads", EXACT),
    Dim("v_heads", EXACT),
    Dim("k_dims", EXACT),
    Dim("v_dims", EXACT),
    Dim("gate", EXACT),
    Dim("mask", EXACT),
    Dim("state", EXACT),
)


def _problem(q, k, v, g, beta, state, mask):
    dtype, shape = check_array(NAME, "q", q, min_ndim=4)
    if len(shape) != 4:
        raise ValueError(f"[{NAME}] q must be (batch, tokens, heads, k_dims), got {shape}")
    batch, tokens, hk, dk = shape
    for name, a in (("k", k), ("v", v)):
        got_dtype, got = check_array(NAME, name, a, min_ndim=4)
        if got_dtype != dtype:
            raise TypeError(f"[{NAME}] {name} has dtype {a.dtype}, expected {q.dtype} like q")
    if k.shape != shape:
        raise ValueError(f"[{NAME}] k has shape {k.shape}, expected {shape} like q")
    if v.ndim != 4 or v.shape[:2] != (batch, tokens):
        raise ValueError(
            f"[{NAME}] v has shape {v.shape}, expected ({batch}, {tokens}, heads, v_dims)"
        )
    hv, dv = v.shape[2:]
    if hv % hk:
        raise ValueError(f"[{NAME}] v has {hv} heads, not a multiple of q's {hk}")
    _, g_shape = check_array(NAME, "g", g, min_ndim=3)
    if g_shape not in ((batch, tokens, hv), (batch, tokens, hv, dk)):
        raise ValueError(
            f"[{NAME}] g has shape {g_shape}, expected {(batch, tokens, hv)} or "
            f"{(batch, tokens, hv, dk)}"
        )
    _, b_shape = check_array(NAME, "beta", beta, min_ndim=3)
    if b_shape != (batch, tokens, hv):
        raise ValueError(f"[{NAME}] beta has shape {b_shape}, expected {(batch, tokens, hv)}")
    state_dtype = "none"
    if state is not None:
        state_dtype, s_shape = check_array(NAME, "state", state, min_ndim=4)
        if s_shape != (batch, hv, dv, dk):
            raise ValueError(f"[{NAME}] state has shape {s_shape}, expected {(batch, hv, dv, dk)}")
    has_mask = mask is not None
    if has_mask and (not isinstance(mask, mx.array) or mask.shape != (batch, tokens)):
        raise ValueError(f"[{NAME}] mask must be an array of shape {(batch, tokens)}")
    gate = "vector" if len(g_shape) == 4 else "scalar"
    values = (bucket(batch), bucket(tokens), hk, hv, dk, dv, gate, has_mask, state_dtype)
    return dtype, values


def _step(q, k, v, g, beta, s, mask):
    """One token: the state decayed, corrected towards v along k, read by q; ``mask`` (or
    None) keeps the old state where False."""
    decay = g[..., None, None] if g.ndim == 2 else g[..., None, :]
    new = s * decay
    kt = k[..., None, :]
    delta = (v - (new * kt).sum(-1)) * beta[..., None]
    new = new + kt * delta[..., None]
    y = (new * q[..., None, :]).sum(-1)
    if mask is not None:
        new = mx.where(mask[:, None, None, None], new, s)
    return y, new


def _steps(q, k, v, g, beta, state, mask, acc, step=_step):
    """The recurrence one token at a time, in ``acc`` (mlx-lm's ``gated_delta_ops``)."""
    batch, tokens, hk, dk = q.shape
    hv, dv = v.shape[2:]
    if hv > hk:
        q, k = (mx.repeat(x, hv // hk, axis=2) for x in (q, k))
    # The state in ``acc`` carries every step's arithmetic there (inputs promote to it), as
    # in mlx-lm; only a float64 reference casts them all up front.
    if acc == mx.float64:
        q, k, v, g, beta = (x.astype(acc) for x in (q, k, v, g, beta))
    s = mx.zeros((batch, hv, dv, dk), acc) if state is None else state.astype(acc)
    ys = []
    for t in range(tokens):
        m = None if mask is None else mask[:, t]
        y, s = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s, m)
        ys.append(y)
    return mx.stack(ys, axis=1), s


_COMPILED_STEP = mx.compile(_step)


def _compiled(q, k, v, g, beta, state, mask):
    """The token-by-token composition with each step ``mx.compile``'d (as mlx-lm does)."""
    acc = mx.float64 if q.dtype == mx.float64 else mx.float32
    y, s = _steps(q, k, v, g, beta, state, mask, acc, step=_COMPILED_STEP)
    return y.astype(q.dtype), s.astype(mx.float32 if state is None else state.dtype)


def _chunked(chunk):
    def chunked(q, k, v, g, beta, state, mask):
        """The tokens a chunk at a time (the WY form of the delta rule): within a chunk the
        corrections ``W`` solve one unit lower-triangular system, and the outputs and the
        next state are matrix products, so the steps of a chunk cost a few matmuls. One
        decay per head, no mask, not float64."""
        dtype, acc = q.dtype, mx.float32
        batch, tokens, hk, dk = q.shape
        hv, dv = v.shape[2:]
        q, k, v, beta = (x.astype(acc).swapaxes(1, 2) for x in (q, k, v, beta))
        if hv > hk:
            q, k = (mx.repeat(x, hv // hk, axis=1) for x in (q, k))
        # The decays' logs, summed and differenced in float64 (this runs on the CPU): a decay
        # near 0 sums to logs whose float32 differences lose digits. A decay of 0 (a state
        # forgotten) is held finite.
        log_g = mx.log(mx.maximum(g.astype(mx.float64), 1e-300)).swapaxes(1, 2)
        s = mx.zeros((batch, hv, dv, dk), acc) if state is None else state.astype(acc)
        ys = []
        for start in range(0, tokens, chunk):
            t = slice(start, start + chunk)
            qc, kc, vc, bc = q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t]
            n = qc.shape[2]
            c = mx.cumsum(log_g[:, :, t], axis=-1)  # (batch, heads, n)
            below = mx.tril(mx.ones((n, n), mx.bool_))
            decays = mx.where(below, mx.exp(c[..., :, None] - c[..., None, :]), 0).astype(acc)
            kk = mx.tril(decays * (kc @ kc.swapaxes(-1, -2)), -1)
            system = mx.eye(n, dtype=acc) + bc[..., None] * kk
            gamma = mx.exp(c).astype(acc)[..., None]
            rhs = bc[..., None] * (vc - gamma * (kc @ s.swapaxes(-1, -2)))
            w = mx.linalg.solve_triangular(system, rhs, upper=False, stream=mx.cpu)
            ys.append(gamma * (qc @ s.swapaxes(-1, -2)) + (decays * (qc @ kc.swapaxes(-1, -2))) @ w)
            to_end = mx.exp(c[..., -1:] - c).astype(acc)[..., None]  # (batch, heads, n, 1)
            s = gamma[..., -1:, :] * s + (w * to_end).swapaxes(-1, -2) @ kc
        y = mx.concatenate(ys, axis=2) if len(ys) > 1 else ys[0]
        out_state = mx.float32 if state is None else state.dtype
        return y.swapaxes(1, 2).astype(dtype), s.astype(out_state)

    # MLX has no VJP of the solve's matrix: gradients go through the reference.
    return with_reference_transforms(chunked, reference)


def reference(q, k, v, g, beta, state, mask):
    """The recurrence step by step in float32 (float64 for float64 inputs)."""
    acc = mx.float64 if q.dtype == mx.float64 else mx.float32
    y, s = _steps(q, k, v, g, beta, state, mask, acc)
    return y.astype(q.dtype), s.astype(mx.float32 if state is None else state.dtype)


def _chunks(p: dict) -> bool:
    # MLX's float64 exp on the CPU is float32-accurate: float64 calls step exactly.
    return p["gate"] == "scalar" and not p["mask"] and p["dtype"] != "float64"


def _default(problem, backend):
    if problem["dtype"] == "float64":
        return "steps", {}
    # On the CPU a chunk's steps as matmuls beat stepping from two tokens on (the ssm suite).
    if backend == "cpu" and problem["tokens"] > 1 and _chunks(problem):
        return "chunked", {"chunk": 16}
    # mlx-lm's own path on every back-end but Metal (each step compiled): never slower than it.
    return "compiled", {}


def _example(shapes, dtype, key, heads_v=None, v_dims=None, gate="scalar", mask=False,
             state="float32"):  # fmt: skip
    """``shapes``: q's ``(batch, tokens, k_heads, k_dims)``; v has ``heads_v`` heads (default
    q's) of ``v_dims`` (default k_dims). q and k unit-norm, as mlx-lm's ``normalize_qk``
    leaves them; decays in (0.8, 1)."""
    ks = mx.random.split(key, 7)
    batch, tokens, hk, dk = shapes[0]
    hv, dv = heads_v or hk, v_dims or dk
    q, k = (random((batch, tokens, hk, dk), mx.float32, kk) for kk in ks[:2])
    q, k = (x / mx.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    v = random((batch, tokens, hv, dv), dtype, ks[2])
    g_shape = (batch, tokens, hv) + ((dk,) if gate == "vector" else ())
    g = (0.8 + 0.2 * mx.random.uniform(shape=g_shape, key=ks[3])).astype(dtype)
    beta = mx.random.uniform(shape=(batch, tokens, hv), key=ks[4]).astype(dtype)
    s = None if state == "none" else random((batch, hv, dv, dk), getattr(mx, state), ks[5], 0.1)
    m = mx.random.uniform(shape=(batch, tokens), key=ks[6]) > 0.2 if mask else None
    return q.astype(dtype), k.astype(dtype), v, g, beta, s, m


def _case(p):
    shapes = ((p["batch"], p["tokens"], p["k_heads"], p["k_dims"]),)
    options = {"heads_v": p["v_heads"], "v_dims": p["v_dims"], "gate": p["gate"],
               "mask": p["mask"], "state": p["state"]}  # fmt: skip
    return shapes, options


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    *,
    stream: mx.Stream | None = None,
) -> tuple[mx.array, mx.array]:
    """The gated delta recurrence over the tokens: per head ``S = g_t S``, then ``S += beta_t
    (v_t - S k_t) k_t^T`` and ``y_t = S q_t`` (a token whose mask is False leaves ``S`` as it
    was). Returns ``y`` in q's dtype and the last state (float32 unless ``state`` says).

    Args:
        q, k: ``(batch, tokens, k_heads, k_dims)``, normalized (q scaled) by the caller.
        v: ``(batch, tokens, v_heads, v_dims)``; ``v_heads`` a multiple of ``k_heads``.
        g: the decays, ``(batch, tokens, v_heads)`` or per key dim ``(..., k_dims)``.
        beta: the correction strengths, ``(batch, tokens, v_heads)``.
        state: ``(batch, v_heads, v_dims, k_dims)`` (default zeros).
        mask: ``(batch, tokens)`` booleans.
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(q, k, v, g, beta, state, mask, stream)


def _presets() -> dict:
    def ex(batch, tokens, dtype, **options):
        return Example(((batch, tokens, 16, 128),), dtype, tuple(options.items()))

    # Qwen3-Next's linear attention: 16 key heads, 32 value heads, 128 dims; decoding and
    # prefills, bfloat16 activations and a float32 state.
    default = [ex(b, t, "bfloat16", heads_v=32) for b, t in ((1, 1), (8, 1), (1, 512), (1, 4096))]
    quick = [
        Example(((1, 1, 2, 32),), "float32", (("heads_v", 4),)),
        Example(((1, 64, 2, 32),), "float32", (("heads_v", 4), ("mask", True))),
    ]
    return {"quick": quick, "default": default, "full": default}


OP = register(
    Op(
        NAME,
        signature=gated_delta,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            Variant(
                "steps",
                lambda: reference,
                description="one token at a time in MLX ops",
            ),
            Variant(
                "compiled",
                lambda: _compiled,
                description="one token at a time, each step mx.compile'd (mlx-lm's ops path)",
            ),
            Variant(
                "chunked",
                _chunked,
                backends=frozenset({"cpu"}),
                space={"chunk": (16, 32, 64, 128)},
                supports=lambda p, params: _chunks(p),
                description="a chunk of tokens at a time: a triangular solve and matmuls "
                "(the solve runs on the CPU)",
            ),
            recurrent_variant(reference),
        ],
        presets=_presets(),
        differentiable=(0, 1, 2, 3, 4),
        feed=None,
    )
)
