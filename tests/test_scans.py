"""Scans beyond the op harness: Mamba's selective scan against a float64 NumPy loop, its
gradients, and its argument checks. (linear_scan's and associative_scan's variants, dtypes,
odd lengths and gradients are in test_ops with every op.)"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_primitives as mp

from . import references as ref


def _numpy_selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    u, dt, A, B, C = (ref.f64(v) for v in (u, delta, A, B, C))
    batch, length, channels = u.shape
    if delta_bias is not None:
        dt = dt + ref.f64(delta_bias)
    if softplus:
        dt = np.log1p(np.exp(dt))
    if B.ndim == 4:
        B = np.repeat(B, channels // B.shape[2], axis=2)
        C = np.repeat(C, channels // C.shape[2], axis=2)
    else:
        B, C = B[:, :, None, :], C[:, :, None, :]
    h = np.zeros((batch, channels, A.shape[1]))
    ys = []
    for t in range(length):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t]
        ys.append((h * C[:, t]).sum(-1))
    y = np.stack(ys, axis=1)
    if D is not None:
        y = y + u * ref.f64(D)
    if z is not None:
        zf = ref.f64(z)
        y = y * zf / (1 + np.exp(-zf))
    return y, h


def _inputs(batch, length, channels, state, groups, dtype, seed=0):
    k = mx.random.split(mx.random.key(seed), 8)
    bc = (batch, length, groups, state) if groups else (batch, length, state)
    return {
        "u": mx.random.normal((batch, length, channels), key=k[0]).astype(dtype),
        "delta": (0.1 * mx.random.uniform(shape=(batch, length, channels), key=k[1])).astype(dtype),
        "A": -mx.exp(mx.random.normal((channels, state), key=k[2])).astype(dtype),
        "B": mx.random.normal(bc, key=k[3]).astype(dtype),
        "C": mx.random.normal(bc, key=k[4]).astype(dtype),
        "D": mx.random.normal((channels,), key=k[5]).astype(dtype),
        "z": mx.random.normal((batch, length, channels), key=k[6]).astype(dtype),
        "delta_bias": (0.05 * mx.random.uniform(shape=(channels,), key=k[7])).astype(dtype),
    }


@pytest.mark.parametrize(
    "length,groups,options",
    [
        (1, 0, {}),
        (3, 2, {"delta_softplus": True}),
        (1000, 0, {"delta_softplus": True}),
        (37, 3, {}),
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["f32", "f16", "bf16"])
def test_selective_scan_matches_a_float64_loop(length, groups, options, dtype):
    x = _inputs(2, length, 6, 4, groups, dtype)
    y, last = mp.selective_scan(**x, return_state=True, **options)
    softplus = options.get("delta_softplus", False)
    want_y, want_h = _numpy_selective_scan(*x.values(), softplus)
    assert y.dtype == dtype and last.shape == (2, 6, 4)
    ref.assert_close(y, want_y, dtype, label="y")
    ref.assert_close(last, want_h, dtype, label="state")


def test_selective_scan_without_the_optional_inputs():
    x = _inputs(1, 50, 5, 3, 0, mx.float32)
    y = mp.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    want, _ = _numpy_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None,
                                    False)  # fmt: skip
    ref.assert_close(y, want, mx.float32)


def test_selective_scan_gradients_match_float64():
    x = _inputs(1, 40, 4, 3, 2, mx.float32, seed=1)
    names = list(x)
    cot = mx.random.normal((1, 40, 4), key=mx.random.key(9))

    def loss(*values):
        args = dict(zip(names, values))
        return (mp.selective_scan(**args, delta_softplus=True) * cot.astype(values[0].dtype)).sum()

    got = mx.grad(loss, argnums=tuple(range(len(names))))(*x.values())
    with mx.stream(mx.cpu):
        want = mx.grad(loss, argnums=tuple(range(len(names))))(
            *(v.astype(mx.float64) for v in x.values())
        )
    for name, g, w in zip(names, got, want):
        ref.assert_close(g, np.array(w), mx.float32, atol=1e-4, rtol=1e-3, label=name)


def test_selective_scan_names_the_argument_at_fault():
    x = _inputs(1, 8, 6, 4, 0, mx.float32)
    with pytest.raises(ValueError, match=r"\[selective_scan\] A has shape \(5, 4\)"):
        mp.selective_scan(**{**x, "A": x["A"][:5]})
    with pytest.raises(ValueError, match=r"\[selective_scan\] B has 4 groups, which do not"):
        mp.selective_scan(**{**x, "B": mx.zeros((1, 8, 4, 4))})
    with pytest.raises(ValueError, match=r"\[selective_scan\] C has 3 states, expected 4"):
        mp.selective_scan(**{**x, "C": x["C"][..., :3]})
    with pytest.raises(ValueError, match=r"\[selective_scan\] D has shape"):
        mp.selective_scan(**{**x, "D": x["D"][:2]})
