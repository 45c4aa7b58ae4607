"""Float64 NumPy references, written independently of the library's MLX references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def f64(a) -> np.ndarray | None:
    """An mx.array as a float64 NumPy array (None stays None)."""
    if a is None or a.dtype == mx.float64:  # no astype: float64 ops run on the CPU only
        return None if a is None else np.array(a)
    return np.array(a.astype(mx.float32)).astype(np.float64)


def rms_norm(x, w, eps):
    x = f64(x)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * f64(w)


def layer_norm(x, w, b, eps):
    x = f64(x)
    mu = x.mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * f64(w)
    return y if b is None else y + f64(b)


def rope(x, dims, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=None, layout="BHSD"):
    x = f64(x)
    if layout == "BSHD":
        x = x.swapaxes(1, 2)
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-2], shape[-1])
    half = dims // 2
    off = np.array(offset).astype(np.float64).reshape(-1, 1, 1)  # (B or 1, 1, 1)
    pos = (np.arange(shape[-2])[None, :, None] + off) * scale  # (B|1, S, 1)
    inv = 1.0 / f64(freqs) if freqs is not None else base ** (-np.arange(half) * 2.0 / dims)
    theta = (pos * inv)[:, None]  # (B|1, 1, S, half)
    out = x.copy()
    if traditional:
        a, b = x[..., 0:dims:2], x[..., 1:dims:2]
        out[..., 0:dims:2] = a * np.cos(theta) - b * np.sin(theta)
        out[..., 1:dims:2] = a * np.sin(theta) + b * np.cos(theta)
    else:
        a, b = x[..., :half], x[..., half:dims]
        out[..., :half] = a * np.cos(theta) - b * np.sin(theta)
        out[..., half:dims] = a * np.sin(theta) + b * np.cos(theta)
    out = out.reshape(shape)
    return out.swapaxes(1, 2) if layout == "BSHD" else out


def swiglu(gate, up):
    g = f64(gate)
    return g / (1 + np.exp(-g)) * f64(up)


def geglu(gate, up, approximate="none"):
    g = f64(gate)
    if approximate == "tanh":
        act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    elif approximate == "fast":
        act = g / (1 + np.exp(-1.702 * g))
    else:
        act = 0.5 * g * (1 + _erf(g / math.sqrt(2)))
    return act * f64(up)


def unpack(w, bits: int) -> np.ndarray:
    """The codes of MLX's packing: each row of uint32 words read as one little-endian stream of
    bits, ``bits`` a code, lowest first (3, 5 and 6-bit codes straddle words)."""
    words = np.ascontiguousarray(np.array(w).astype("<u4"))
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    n = stream.shape[-1] // bits
    codes = stream[..., : n * bits].reshape(*stream.shape[:-1], n, bits)
    return (codes.astype(np.int64) << np.arange(bits)).sum(-1)


def dequantize(w, scales, biases, group_size: int = 64, bits: int = 4) -> np.ndarray:
    """MLX's affine dequantization: ``scale * code + bias``, one scale and bias a group."""
    q = unpack(w, bits).astype(np.float64)
    s = np.repeat(f64(scales), group_size, axis=-1)
    b = np.repeat(f64(biases), group_size, axis=-1)
    return q * s + b


def quantized_matmul(
    x, w, scales, biases, transpose=True, group_size=None, bits=None, mode="affine"
):
    assert mode == "affine", mode
    wd = dequantize(w, scales, biases, group_size or 64, bits or 4)
    return f64(x) @ (wd.T if transpose else wd)


def linear_scan(a, b, h0=None, axis=-1, reverse=False):
    """Every state of ``h_t = a_t h_{t-1} + b_t``, one step at a time."""
    a, b = (np.moveaxis(f64(v), axis, 0) for v in (a, b))
    if reverse:
        a, b = a[::-1], b[::-1]
    h = np.zeros(b.shape[1:]) if h0 is None else f64(h0)
    states = []
    for t in range(b.shape[0]):
        h = a[t] * h + b[t]
        states.append(h)
    out = np.stack(states)
    return np.moveaxis(out[::-1] if reverse else out, 0, axis)


def associative_scan(x, op="add", axis=-1, reverse=False, inclusive=True):
    """The prefix scan of ``op``, by NumPy's accumulate."""
    fn = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum,
          "logaddexp": np.logaddexp}[op]  # fmt: skip
    identity = {"add": 0.0, "mul": 1.0, "max": -np.inf, "min": np.inf, "logaddexp": -np.inf}[op]
    v = np.moveaxis(f64(x), axis, 0)
    if reverse:
        v = v[::-1]
    if not inclusive:
        v = np.concatenate([np.full((1, *v.shape[1:]), identity), v[:-1]])
    out = fn.accumulate(v, axis=0)
    return np.moveaxis(out[::-1] if reverse else out, 0, axis)


def gated_delta(q, k, v, g, beta, state=None, mask=None):
    """The gated delta rule one token and one head at a time."""
    q, k, v, g, beta = (f64(x) for x in (q, k, v, g, beta))
    batch, tokens, hk, dk = q.shape
    hv, dv = v.shape[2:]
    s = np.zeros((batch, hv, dv, dk)) if state is None else f64(state).copy()
    y = np.zeros((batch, tokens, hv, dv))
    m = None if mask is None else np.array(mask)
    for bi in range(batch):
        for h in range(hv):
            kh = h // (hv // hk)
            for t in range(tokens):
                decay = g[bi, t, h] if g.ndim == 3 else g[bi, t, h][None, :]
                new = s[bi, h] * decay
                kt = k[bi, t, kh]
                new = new + np.outer((v[bi, t, h] - new @ kt) * beta[bi, t, h], kt)
                y[bi, t, h] = new @ q[bi, t, kh]
                if m is None or m[bi, t]:
                    s[bi, h] = new
    return y, s


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    softplus=False,
    return_state=False,
    state=None,
):
    """Mamba's selective scan one position at a time; the channels split evenly into
    ``delta``'s heads (one step size, A row or decay, D and bias per head) and into B's groups.
    Returns ``y`` and the last state ``(batch, channels, states)``."""
    u, dt, A, B, C = (f64(v) for v in (u, delta, A, B, C))
    batch, length, channels = u.shape
    per = channels // dt.shape[-1]
    if delta_bias is not None:
        dt = dt + f64(delta_bias)
    if softplus:
        dt = np.logaddexp(dt, 0.0)
    dt = np.repeat(dt, per, axis=-1)
    A = np.repeat(A if A.ndim == 2 else A[:, None], per, axis=0)
    B, C = (m[:, :, None, :] if m.ndim == 3 else np.repeat(m, channels // m.shape[2], axis=2)
            for m in (B, C))  # fmt: skip
    h = np.zeros((batch, channels, B.shape[-1])) if state is None else f64(state).copy()
    ys = []
    for t in range(length):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t]
        ys.append((h * C[:, t]).sum(-1))
    y = np.stack(ys, axis=1)
    if D is not None:
        y = y + u * np.repeat(f64(D), per)
    if z is not None:
        zf = f64(z)
        y = y * zf / (1 + np.exp(-zf))
    return y, h


def gather_mm(a, b, lhs=None, rhs=None, sorted_indices=False):
    """Each pair of the broadcast indices: block ``lhs`` of ``a`` times matrix ``rhs`` of ``b``."""
    af, bf = f64(a), f64(b)
    batch = af.shape[:-2]
    left = np.arange(math.prod(batch)).reshape(batch) if lhs is None else np.array(lhs)
    right = np.arange(math.prod(bf.shape[:-2])) if rhs is None else np.array(rhs)
    left, right = np.broadcast_arrays(left, right)
    blocks = af.reshape(-1, *af.shape[-2:])[left.ravel()]
    out = blocks @ bf.reshape(-1, *bf.shape[-2:])[right.ravel()]
    return out.reshape(*left.shape, *out.shape[1:])


def gather_qmm(
    x, w, scales, biases, lhs=None, rhs=None, transpose=True, group_size=None, bits=None,
    mode="affine", global_scale=None, sorted_indices=False,
):  # fmt: skip
    """Each pair of the broadcast indices: block ``lhs`` of x times dequantized matrix ``rhs``."""
    assert mode == "affine" and transpose, (mode, transpose)
    wd = dequantize(w, scales, biases, group_size or 64, bits or 4)  # (E, N, K)
    xf = f64(x)
    batch = xf.shape[:-2]
    left = np.arange(math.prod(batch)).reshape(batch) if lhs is None else np.array(lhs)
    right = np.arange(wd.shape[0]) if rhs is None else np.array(rhs)
    left, right = np.broadcast_arrays(left, right)
    blocks = xf.reshape(-1, *xf.shape[-2:])[left.ravel()]
    out = np.einsum("pmk,pnk->pmn", blocks, wd[right.ravel()])
    return out.reshape(*left.shape, *out.shape[1:])


# Per output dtype (atol, rtol): float32-accumulating results against float64.
TOLERANCES = {
    mx.float32: (1e-5, 1e-4),
    mx.float16: (2e-3, 5e-3),
    mx.bfloat16: (2e-2, 3e-2),
}


def assert_close(got: mx.array, want: np.ndarray, dtype, *, atol=None, rtol=None, label=""):
    """Elementwise ``|got - want| <= atol + rtol |want|``; NaN or Inf never passes. An op of
    several outputs compares them in turn."""
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want), f"{label}: {len(got)} outputs, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, dtype, atol=atol, rtol=rtol, label=f"{label} output {i}")
        return
    a, r = TOLERANCES[dtype]
    atol = a if atol is None else atol
    rtol = r if rtol is None else rtol
    g = f64(got)
    assert g.shape == want.shape, f"{label}: shape {g.shape} != {want.shape}"
    assert np.isfinite(g).all(), f"{label}: non-finite output"
    diff = np.abs(g - want)
    bad = diff > atol + rtol * np.abs(want)
    assert not bad.any(), f"{label}: {int(bad.sum())}/{bad.size} off, max abs diff {diff.max():.3g}"


def attention(
    q, k, v, *, causal=False, scale=None, window=None, mask=None, sinks=None, layout="BHSD"
):
    """Softmax attention in float64, GQA by repeating heads, with MLX's mask semantics: a
    boolean, causal or window mask hides a score with a finite minimum (a row that sees no key
    averages every value), an additive mask is added (a row of -inf gives NaN); ``sinks`` are
    a softmax column per head whose weight is dropped."""
    q, k, v = (f64(a) for a in (q, k, v))
    if layout == "BSHD":
        q, k, v = (a.swapaxes(1, 2) for a in (q, k, v))
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
    s = q @ k.swapaxes(-1, -2) * (1 / math.sqrt(d) if scale is None else scale)
    keep = np.ones((lq, lk), bool)
    i = np.arange(lq)[:, None] + lk - lq
    j = np.arange(lk)[None, :]
    if causal or window is not None:
        keep = keep & (j <= i)
    if window is not None:
        keep = keep & (j > i - window)
    bias = 0.0
    if mask is not None:
        m = np.array(mask) if mask.dtype == mx.bool_ else f64(mask)
        if m.dtype == bool:
            keep = keep & m
        else:
            bias = m
    s = np.where(keep, s, np.finfo(np.float64).min / 2) + bias
    if sinks is not None:
        column = np.broadcast_to(f64(sinks)[None, :, None, None], (*s.shape[:-1], 1))
        s = np.concatenate([column, s], axis=-1)
    with np.errstate(invalid="ignore"):
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
    if sinks is not None:
        w = w[..., 1:]
    out = w @ v
    return out.swapaxes(1, 2) if layout == "BSHD" else out
