"""Mamba's selective scan (mamba-ssm's ``selective_scan_fn``), channels last, and the Mamba-2
form of it (one step size, decay and skip per head of channels): per channel and state
``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` and ``y_t = C_t . h_t + D u_t``, times
``silu(z_t)``."""

from __future__ import annotations

import mlx.core as mx

from ..problem import EXACT, Dim, bucket
from ..registry import Example, Op, Variant, register
from ._common import accumulator, check_array, check_bool, check_vector, random
from ._scan_kernels import selective_variant
from .linear_scan import linear_scan

NAME = "selective_scan"
DIMS = (
    Dim("batch"),
    Dim("length"),
    Dim("channels", EXACT),
    Dim("heads", EXACT),
    Dim("states", EXACT),
    Dim("groups", EXACT),
    Dim("decay", EXACT),
    Dim("delta", EXACT),
    Dim("skip", EXACT),
    Dim("gate", EXACT),
    Dim("bias", EXACT),
    Dim("softplus", EXACT),
    Dim("state", EXACT),
)
# The scan composition forms a (batch, positions, channels, states) decay and input: at most
# this many elements at a time.
SCAN_MAX = 2**26


def _problem(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state):
    dtype, shape = check_array(NAME, "u", u, min_ndim=3)
    if len(shape) != 3:
        raise ValueError(f"[{NAME}] u must be (batch, length, channels), got shape {shape}")
    batch, length, channels = shape
    delta_dtype, d_shape = check_array(NAME, "delta", delta, min_ndim=3)
    heads = d_shape[-1]
    if len(d_shape) != 3 or d_shape[:2] != (batch, length) or channels % heads:
        raise ValueError(
            f"[{NAME}] delta has shape {d_shape}, expected ({batch}, {length}, {channels}) or "
            f"({batch}, {length}, heads) with heads dividing {channels} channels"
        )
    _, a_shape = check_array(NAME, "A", A)
    if len(a_shape) > 2 or a_shape[0] != heads:
        raise ValueError(f"[{NAME}] A has shape {a_shape}, expected ({heads}, states) or "
                         f"({heads},) like delta's last dim")  # fmt: skip
    groups = states = None
    for name, m in (("B", B), ("C", C)):
        _, m_shape = check_array(NAME, name, m, min_ndim=3)
        if len(m_shape) not in (3, 4) or m_shape[:2] != (batch, length):
            raise ValueError(f"[{NAME}] {name} has shape {m_shape}, expected ({batch}, {length}, "
                             "states) or ({batch}, {length}, groups, states)")  # fmt: skip
        g, n = (1, m_shape[2]) if len(m_shape) == 3 else m_shape[2:]
        if channels % g:
            raise ValueError(f"[{NAME}] {name} has {g} groups, which do not split {channels} "
                             "channels evenly")  # fmt: skip
        if groups is not None and (g, n) != (groups, states):
            raise ValueError(f"[{NAME}] C has shape {m_shape}, expected {B.shape} like B")
        groups, states = g, n
    if len(a_shape) == 2 and a_shape[1] != states:
        raise ValueError(f"[{NAME}] A has {a_shape[1]} states, expected {states} like B")
    # Whether D and the bias are given, not their dtypes: a model's may be either, and a
    # vector per head is read once a call.
    skip = check_vector(NAME, "D", D, heads) != "none"
    bias = check_vector(NAME, "delta_bias", delta_bias, heads) != "none"
    if z is not None and check_array(NAME, "z", z)[1] != shape:
        raise ValueError(f"[{NAME}] z has shape {z.shape}, expected {shape} like u")
    check_bool(NAME, "delta_softplus", delta_softplus)
    check_bool(NAME, "return_state", return_state)
    given = "none"
    if state is not None:
        given, s_shape = check_array(NAME, "state", state)
        if s_shape != (batch, channels, states):
            raise ValueError(f"[{NAME}] state has shape {s_shape}, expected "
                             f"{(batch, channels, states)}")  # fmt: skip
    decay = "matrix" if len(a_shape) == 2 else "scalar"
    values = (bucket(batch), bucket(length), channels, heads, states, groups, decay, delta_dtype,
              skip, z is not None, bias, delta_softplus, given)  # fmt: skip
    return dtype, values


def _step_sizes(delta, delta_bias, delta_softplus, acc):
    """``delta`` plus its bias, through softplus where asked, in ``acc``: one per head."""
    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)
    return mx.logaddexp(dt, mx.zeros_like(dt)) if delta_softplus else dt


def _parts(u, delta, A, B, C, D, delta_bias, delta_softplus, acc):
    """The inputs in ``acc`` shaped per group of channels: u and dt ``(batch, length, groups,
    per)``, A ``(groups, per, states)`` (``(groups, per, 1)`` for one decay per head), B and C
    ``(batch, length, groups, 1, states)``, D ``(groups, per)`` or None."""
    batch, length, channels = u.shape
    heads = delta.shape[-1]
    n = B.shape[-1]
    groups = 1 if B.ndim == 3 else B.shape[2]
    dt = _step_sizes(delta, delta_bias, delta_softplus, acc)
    per_head = channels // heads
    if per_head > 1:
        dt = mx.repeat(dt, per_head, axis=-1)
    # One decay per head (Mamba-2) stays one per channel, not per state: exp runs once a
    # channel, and broadcasting does the rest.
    a = A.astype(acc)
    a = a[:, None, :] if a.ndim == 2 else a[:, None, None]
    width = a.shape[-1]
    a = mx.broadcast_to(a, (heads, per_head, width)).reshape(groups, channels // groups, width)
    split = (batch, length, groups, channels // groups)
    Bg, Cg = (m.astype(acc).reshape(batch, length, groups, 1, n) for m in (B, C))
    d = None
    if D is not None:
        d = mx.repeat(D.astype(acc), per_head) if per_head > 1 else D.astype(acc)
        d = d.reshape(split[2:])
    return u.astype(acc).reshape(split), dt.reshape(split), a, Bg, Cg, d


def _finish(y, u, d, z, h, state):
    """y plus the skip, gated, in u's dtype; the last state as ``(batch, channels, states)`` in
    the given state's dtype (float32 without one)."""
    batch, length, channels = u.shape
    if d is not None:
        y = y + u.astype(y.dtype).reshape(y.shape) * d
    y = y.reshape(batch, length, channels)
    if z is not None:
        zf = z.astype(y.dtype)
        y = y * zf * mx.sigmoid(zf)
    out_state = mx.float32 if state is None else state.dtype
    if y.dtype == mx.float64:
        out_state = mx.float64
    return y.astype(u.dtype), h.reshape(batch, channels, -1).astype(out_state)


def _step(h, x, dt, a, b, c):
    """One position: ``h`` ``(batch, groups, per, states)``; x, dt ``(batch, groups, per)``; b,
    c ``(batch, groups, 1, states)``."""
    h = mx.exp(dt[..., None] * a) * h + (dt * x)[..., None] * b
    return (h * c).sum(-1), h


def _steps(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, step):
    acc = accumulator(u.dtype)
    x, dt, a, Bg, Cg, d = _parts(u, delta, A, B, C, D, delta_bias, delta_softplus, acc)
    batch, length, groups, per = x.shape
    n = Bg.shape[-1]
    h = (mx.zeros((batch, groups, per, n), acc) if state is None
         else state.astype(acc).reshape(batch, groups, per, n))  # fmt: skip
    ys = []
    for t in range(length):
        y, h = step(h, x[:, t], dt[:, t], a, Bg[:, t], Cg[:, t])
        ys.append(y)
    return _finish(mx.stack(ys, axis=1), u, d, z, h, state)


def reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state):
    """The recurrence one position at a time in float32 (float64 for float64 inputs)."""
    return _steps(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, _step)


_COMPILED_STEP = mx.compile(_step)


def _compiled(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state):
    """One position at a time, each step ``mx.compile``'d."""
    return _steps(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, _COMPILED_STEP)


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state):
    """Every state at once through the tuned :func:`linear_scan`, the decays and inputs of a
    segment of positions formed first (segments of at most ``SCAN_MAX`` elements, each
    starting from the state the one before left)."""
    acc = accumulator(u.dtype)
    x, dt, a, Bg, Cg, d = _parts(u, delta, A, B, C, D, delta_bias, delta_softplus, acc)
    batch, length, groups, per = x.shape
    n = Bg.shape[-1]
    h = None if state is None else state.astype(acc).reshape(batch, groups, per, n)
    segment = max(1, SCAN_MAX // (batch * groups * per * n))
    ys = []
    for s in range(0, length, segment):
        t = slice(s, s + segment)
        drive = (dt[:, t] * x[:, t])[..., None] * Bg[:, t]  # (batch, positions, groups, per, n)
        decay = mx.broadcast_to(mx.exp(dt[:, t, ..., None] * a), drive.shape)
        states = linear_scan(decay, drive, h, axis=1)
        ys.append((states * Cg[:, t]).sum(-1))
        h = states[:, -1]
    y = mx.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
    return _finish(y, u, d, z, h, state)


def _chunked(chunk):
    def chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state):
        """Mamba-2's state-space duality: within a chunk of positions the output is a masked
        attention-like product (decays between positions times ``C_i . B_j``); across chunks
        the state carries. Needs one decay per head (``A`` of shape ``(heads,)``)."""
        acc = accumulator(u.dtype)
        batch, length, channels = u.shape
        heads, n = delta.shape[-1], B.shape[-1]
        groups = 1 if B.ndim == 3 else B.shape[2]
        per, r = channels // heads, heads // groups
        dt = _step_sizes(delta, delta_bias, delta_softplus, acc)
        log_decay = (dt * A.astype(acc)).swapaxes(1, 2)  # (batch, heads, length)
        xs = (dt[..., None] * u.astype(acc).reshape(batch, length, heads, per)).transpose(
            0, 2, 1, 3
        )  # (batch, heads, length, per)
        Bg, Cg = (m.astype(acc).reshape(batch, length, groups, n).swapaxes(1, 2) for m in (B, C))
        h = None if state is None else state.astype(acc).reshape(batch, groups, r, per, n)
        ys = []
        for s in range(0, length, chunk):
            e = min(s + chunk, length)
            q = e - s
            cum = mx.cumsum(log_decay[..., s:e], axis=-1).reshape(batch, groups, r, q)
            tri = mx.tril(mx.ones((q, q), mx.bool_))
            gaps = mx.where(tri, cum[..., :, None] - cum[..., None, :], -mx.inf)
            b_, c_ = Bg[:, :, s:e], Cg[:, :, s:e]  # (batch, groups, q, n)
            scores = (c_ @ b_.swapaxes(-1, -2))[:, :, None] * mx.exp(gaps)
            x_ = xs[:, :, s:e].reshape(batch, groups, r, q, per)
            y = scores @ x_  # (batch, groups, r, q, per)
            last = cum[..., -1:]
            if h is not None:
                y = y + mx.exp(cum)[..., None] * (c_[:, :, None] @ h.swapaxes(-1, -2))
                h = mx.exp(last)[..., None] * h
            carried = (x_ * mx.exp(last - cum)[..., None]).swapaxes(-1, -2) @ b_[:, :, None]
            h = carried if h is None else h + carried
            ys.append(y.transpose(0, 3, 1, 2, 4).reshape(batch, q, heads, per))
        y = mx.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
        d = None if D is None else D.astype(acc)[:, None]
        y = y if d is None else y + u.astype(acc).reshape(y.shape) * d
        return _finish(y, u, None, z, h, state)

    return chunked


def _scalar_heads(p: dict) -> bool:
    return p["decay"] == "scalar" and p["heads"] % p["groups"] == 0


def _default(problem, backend):
    if problem["dtype"] == "float64":
        return "steps", {}
    if problem["length"] == 1:  # a decoding step: one step, compiled but on the CPU, where
        return ("steps" if backend == "cpu" else "compiled"), {}  # MLX's fusion runs slower
    if _scalar_heads(problem):  # mlx-lm's own path for Mamba-2 on every back-end but Metal
        return "chunked", {"chunk": 256}
    return "scan", {}


def _example(shapes, dtype, key, heads=None, states=16, groups=1, decay="matrix",
             delta="float32", skip=True, gate=False, bias=False, softplus=False,
             state="none"):  # fmt: skip
    """``shapes``: u's ``(batch, length, channels)``. Step sizes in (0.001, 0.1) (raw values
    around -3 with ``softplus``), decays ``A < 0``, B and C of unit scale."""
    ks = mx.random.split(key, 8)
    batch, length, channels = shapes[0]
    heads = heads or channels
    u = random((batch, length, channels), dtype, ks[0])
    if softplus:
        dt = random((batch, length, heads), mx.float32, ks[1], 0.5, -3.0)
    else:
        dt = 0.001 + 0.099 * mx.random.uniform(shape=(batch, length, heads), key=ks[1])
    a_shape = (heads, states) if decay == "matrix" else (heads,)
    A = -mx.exp(mx.random.uniform(shape=a_shape, key=ks[2]) * 2.0)
    m_shape = (batch, length, groups, states)
    B, C = (random(m_shape, dtype, k) for k in ks[3:5])
    D = mx.random.uniform(shape=(heads,), key=ks[5]) if skip else None
    z = random((batch, length, channels), dtype, ks[6]) if gate else None
    b = mx.full((heads,), 0.1) if bias else None
    s = None if state == "none" else random((batch, channels, states), getattr(mx, state),
                                            ks[7], 0.1)  # fmt: skip
    return u, dt.astype(getattr(mx, delta)), A, B, C, D, z, b, softplus, True, s


def _case(p):
    shapes = ((p["batch"], p["length"], p["channels"]),)
    options = {"heads": p["heads"], "states": p["states"], "groups": p["groups"],
               "decay": p["decay"], "delta": p["delta"], "skip": p["skip"], "gate": p["gate"],
               "bias": p["bias"], "softplus": p["softplus"],
               "state": p["state"]}  # fmt: skip
    return shapes, options


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
    *,
    state: mx.array | None = None,
    stream: mx.Stream | None = None,
):
    """Mamba's selective scan (mamba-ssm's ``selective_scan_fn``), channels last: per channel
    and state ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t . h_t + D u_t``, times
    ``silu(z_t)`` when ``z`` is given, where ``dt = delta (+ delta_bias)``, through softplus
    with ``delta_softplus``. Accumulated in float32, ``y`` in ``u``'s dtype; differentiable.

    The channels may be split evenly into heads (Mamba-2): ``delta``, ``A``, ``D`` and
    ``delta_bias`` then give one value (one row of ``A``, or one decay) per head.

    Args:
        u: the input, ``(batch, length, channels)``.
        delta: the step sizes, ``(batch, length, channels)`` or ``(batch, length, heads)``.
        A: the (diagonal) state matrix, ``(heads, states)``, or one decay per head ``(heads,)``.
        B: ``(batch, length, states)``, or ``(batch, length, groups, states)`` with the
            channels split evenly over the groups.
        C: like ``B``.
        D: the skip connection, ``(heads,)``.
        z: the gate, like ``u``.
        delta_bias: added to ``delta``, ``(heads,)``.
        delta_softplus: pass ``delta`` (plus its bias) through softplus.
        return_state: also return the last state, ``(batch, channels, states)``, in
            ``state``'s dtype (float32 without one), to carry on decoding.
        state: the state before the first position (default zeros).
        stream: the stream or device to run on (default: the default stream).
    """
    y, h = OP.serve(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state,
                    stream)  # fmt: skip
    return (y, h) if return_state else y


def _presets() -> dict:
    def ex(batch, length, channels, dtype="bfloat16", **options):
        return Example(((batch, length, channels),), dtype, tuple(options.items()))

    # Mamba-2 2.7B (80 heads of 64, 128 states, one group) and Nemotron-H 8B (128 heads of 64,
    # 8 groups): decoding steps and prefills, the step sizes computed in float32 as mlx-lm
    # does; Mamba-1 2.8B (5120 channels, 16 states): a prefill.
    mamba2 = {"heads": 80, "states": 128, "decay": "scalar"}
    nemotron = {"heads": 128, "states": 128, "groups": 8, "decay": "scalar"}
    mamba1 = {"gate": True, "bias": True, "softplus": True, "delta": "bfloat16"}
    default = [
        ex(1, 1, 5120, state="float32", **mamba2),
        ex(8, 1, 5120, state="float32", **mamba2),
        ex(1, 512, 5120, **mamba2),
        ex(1, 4096, 5120, **mamba2),
        ex(1, 1, 8192, state="float32", **nemotron),
        ex(1, 4096, 8192, **nemotron),
        ex(1, 4096, 5120, **mamba1),
    ]
    quick = [ex(1, 64, 32, "float32"), ex(2, 100, 64, "float32", heads=4, decay="scalar")]
    return {"quick": quick, "default": default, "full": default}


OP = register(
    Op(
        NAME,
        signature=selective_scan,
        dims=DIMS,
        problem=_problem,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            Variant("steps", lambda: reference, description="one position at a time"),
            Variant(
                "compiled",
                lambda: _compiled,
                description="one position at a time, each step mx.compile'd",
            ),
            Variant("scan", lambda: _scan, description="every state at once through linear_scan"),
            Variant(
                "chunked",
                _chunked,
                space={"chunk": (256, 128, 64, 32)},
                supports=lambda p, q: _scalar_heads(p),
                description="Mamba-2's state-space duality, chunk by chunk (one decay per head)",
            ),
            selective_variant(reference),
        ],
        presets=_presets(),
        differentiable=(0, 1, 2, 3, 4),
        feed=None,
    )
)
