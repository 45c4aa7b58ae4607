"""Scans beyond the op harness: Mamba's selective scan through its public function (mamba-ssm's
arguments) against a float64 NumPy loop, its gradients, decoding from a carried state, and its
argument checks. (linear_scan's and associative_scan's variants, dtypes,
odd lengths and gradients are in test_ops with every op.)"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_primitives as mp

from . import references as ref


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
    want_y, want_h = ref.selective_scan(*x.values(), softplus)
    assert y.dtype == dtype and last.shape == (2, 6, 4) and last.dtype == mx.float32
    ref.assert_close(y, want_y, dtype, label="y")
    ref.assert_close(last, want_h, dtype, label="state")


def test_selective_scan_without_the_optional_inputs():
    x = _inputs(1, 50, 5, 3, 0, mx.float32)
    y = mp.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    want, _ = ref.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
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
    with pytest.raises(ValueError, match=r"\[selective_scan\] C has shape \(1, 8, 3\), expected"):
        mp.selective_scan(**{**x, "C": x["C"][..., :3]})
    with pytest.raises(ValueError, match=r"\[selective_scan\] D has shape"):
        mp.selective_scan(**{**x, "D": x["D"][:2]})


def test_selective_scan_decodes_from_a_carried_state():
    """A prefill's last state carried into one-position steps gives the whole sequence's outputs
    and state, per head of channels (Mamba-2's form)."""
    k = mx.random.split(mx.random.key(4), 6)
    u = mx.random.normal((2, 20, 12), key=k[0])
    dt = 0.1 * mx.random.uniform(shape=(2, 20, 3), key=k[1])
    A = -mx.exp(mx.random.normal((3,), key=k[2]))
    B, C = (mx.random.normal((2, 20, 3, 8), key=kk) for kk in k[3:5])
    D = mx.random.normal((3,), key=k[5])
    y, h = mp.selective_scan(u[:, :17], dt[:, :17], A, B[:, :17], C[:, :17], D, return_state=True)
    ys = [y]
    for t in range(17, 20):
        s = slice(t, t + 1)
        y_t, h = mp.selective_scan(u[:, s], dt[:, s], A, B[:, s], C[:, s], D, return_state=True,
                                   state=h)  # fmt: skip
        ys.append(y_t)
    want_y, want_h = ref.selective_scan(u, dt, A, B, C, D)
    ref.assert_close(mx.concatenate(ys, axis=1), want_y, mx.float32, label="y")
    ref.assert_close(h, want_h, mx.float32, label="state")


def test_selective_scan_names_the_head_split_at_fault():
    x = _inputs(1, 8, 6, 4, 0, mx.float32)
    with pytest.raises(ValueError, match=r"\[selective_scan\] delta has shape \(1, 8, 4\)"):
        mp.selective_scan(x["u"], x["delta"][..., :4], x["A"][:4], x["B"], x["C"])
    with pytest.raises(
        ValueError, match=r"\[selective_scan\] A has shape \(6, 4\), expected \(3, st"
    ):
        mp.selective_scan(x["u"], x["delta"][..., :3], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match=r"\[selective_scan\] state has shape \(1, 6, 3\)"):
        mp.selective_scan(**x, state=mx.zeros((1, 6, 3)))


def test_selective_scan_composition_in_segments(monkeypatch):
    """Past SCAN_MAX elements the scan composition goes segment by segment, each starting from
    the state the one before left: the same outputs and last state."""
    import sys

    module = sys.modules["mlx_primitives.ops.selective_scan"]
    monkeypatch.setattr(module, "SCAN_MAX", 2**10)  # 100 positions of 2x12x8 states: 20 segments
    args = module.OP.example(((2, 100, 12),), mx.float32, mx.random.key(1), states=8, groups=3,
                             gate=True, state="float32")  # fmt: skip
    y, h = module.OP.variant("scan").build()(*args)
    want_y, want_h = ref.selective_scan(*args)
    ref.assert_close(y, want_y, mx.float32, label="y")
    ref.assert_close(h, want_h, mx.float32, label="state")


@pytest.mark.parametrize("chunk", [16, 64])
def test_gated_delta_chunks_hold_decays_of_zero_and_one(chunk):
    """The chunked form works with differences of log decays: a decay of 0 (the state
    forgotten) or 1 must still give the recurrence's result, not inf - inf."""
    o = mp.registry.op("gated_delta")
    q, k, v, g, beta, state, mask = o.example(((1, 40, 2, 8),), mx.float32, mx.random.key(3))
    g = mx.where(mx.arange(40)[None, :, None] % 7 == 0, 0.0, mx.where(g > 0.9, 1.0, g))
    args = (q, k, v, g, beta, state, mask)
    want = o.reference(*args)
    got = o.variant("chunked").positional(chunk=chunk)(*args)
    for w, x in zip(want, got):
        assert not mx.isnan(x).any().item()
        assert mx.allclose(x, w, atol=1e-5, rtol=1e-4).item()


@pytest.mark.parametrize("chunk", [16, 128])
def test_gated_delta_chunks_hold_forget_gates(chunk):
    """Decays near 0 (a state reset) make the in-chunk sums of log decays large: their
    differences must keep float32 accuracy over a long chunk."""
    o = mp.registry.op("gated_delta")
    q, k, v, g, beta, state, _ = o.example(((1, 256, 2, 64),), mx.float32, mx.random.key(1),
                                           heads_v=4)  # fmt: skip
    u = mx.random.uniform(shape=g.shape, key=mx.random.key(2))
    g = mx.where(u < 0.3, 1e-8 * u, 0.9 + 0.1 * u)
    args = (q, k, v, g, beta, state, None)
    want = o.reference(*(a.astype(mx.float64) for a in args[:6]), None, stream=mx.cpu)
    got = o.variant("chunked").positional(chunk=chunk)(*args)
    for x, w in zip(got, want):
        assert mx.allclose(x.astype(mx.float64), w, atol=1e-5, rtol=1e-4).item()


@pytest.mark.parametrize("name", ["selective_scan", "gated_delta"])
def test_a_recurrent_kernel_launch_follows_each_call(untraced, monkeypatch, name):
    """The recurrent kernels keep their launch settings per shape, dtype and optional input:
    calls with and without a state and of other lengths get their own, and an input not given
    is a constant made once (no fill launched per call)."""
    from mlx_primitives.dialect.kernel import GpuKernel
    from mlx_primitives.registry import op

    launches = []

    def launch(self, inputs, plan):
        launches.append((inputs, dict(plan["template"]), plan["output_shapes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(GpuKernel, "launch", launch)
    o = op(name)
    fn = o.variant("recurrent").build(lanes=4, warps=2)
    width = (16,) if name == "selective_scan" else (2, 32)
    extra = {} if name == "selective_scan" else {"heads_v": 4}
    at = o.params.index("state")
    absent = []
    for length, carried in ((5, False), (5, True), (1, True), (5, False)):
        args = list(o.example(((2, length, *width),), mx.float32, mx.random.key(length),
                              state="float32", **extra))  # fmt: skip
        if not carried:
            args[at] = None
        fn(*args)
        inputs, template, shapes = launches[-1]
        assert template["HAS_STATE"] is carried and shapes[0][:2] == (2, length)
        absent.append(inputs[-1] if name == "selective_scan" else inputs[5])
    assert absent[0] is absent[3]  # the same constant, not a new zeros array per call


def test_the_serial_scan_launch_follows_each_call(untraced, monkeypatch):
    """linear_scan's serial kernel keeps its launch settings per shape, axis, direction and
    initial state; without one it gets a constant made once."""
    from mlx_primitives.dialect.kernel import GpuKernel
    from mlx_primitives.registry import op

    launches = []

    def launch(self, inputs, plan):
        launches.append((inputs, dict(plan["template"]), plan["output_shapes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(GpuKernel, "launch", launch)
    fn = op("linear_scan").variant("serial").build(threads=128, unroll=4)
    a, b = mx.ones((2, 5, 3)), mx.ones((2, 5, 3))
    for h0, axis, reverse, three in (
        (None, 1, False, (2, 5, 3)),
        (mx.zeros((2, 3)), 1, False, (2, 5, 3)),
        (None, 1, True, (2, 5, 3)),
        (None, -1, True, (10, 3, 1)),
        (None, 1, False, (2, 5, 3)),
    ):
        assert fn(a, b, h0, axis, reverse).shape == b.shape
        inputs, template, shapes = launches[-1]
        assert shapes == [three] and [x.shape for x in inputs[:2]] == [three, three]
        assert template["H0"] is (h0 is not None) and template["REVERSE"] is reverse
    assert launches[0][0][2] is launches[4][0][2]  # the same constant, not a zeros op per call
