"""Kernel forwards traced once per call shape (dialect.traced): replayed on new values, a
trace per context a forward reads, bounded, differentiable."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives import inference_mode
from mlx_primitives.dialect import poisoned
from mlx_primitives.dialect.kernel import _INFERENCE, _POISON, with_reference_transforms
from mlx_primitives.dialect.traced import MAX_TRACES, Traced


def _x(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_a_forward_runs_once_per_shape_and_replays_on_new_values():
    ran = []

    def forward(x, w, scale):
        ran.append(x.shape)
        return (x * w).reshape(-1) * scale

    fn = Traced(forward)
    for seed, shape in enumerate([(2, 3), (2, 3), (4, 3), (2, 3)]):
        x, w = _x(*shape, seed=seed), _x(3, seed=10 + seed)
        np.testing.assert_allclose(fn(x, w, 2.0), (x * w).reshape(-1) * 2.0, rtol=1e-6)
    assert ran == [(2, 3), (4, 3)]
    fn(_x(2, 3), _x(3), 3.0)  # a new constant is a new trace
    assert len(ran) == 3 and fn.traces == 3


def test_each_context_a_forward_reads_gets_its_own_trace():
    def forward(x):
        poison = 0.0 if _POISON.get() is None else 1.0
        return x + poison + (10.0 if _INFERENCE.get() else 0.0)

    fn, x = Traced(forward), mx.zeros((2,))
    assert fn(x).tolist() == [0.0, 0.0]
    with poisoned():
        assert fn(x).tolist() == [1.0, 1.0]
    with inference_mode():
        assert fn(x).tolist() == [10.0, 10.0]
    stream = mx.new_stream(mx.default_device())
    for _ in range(2):
        with mx.stream(stream):  # MLX keeps a trace per stream
            assert fn(x).tolist() == [0.0, 0.0]
    assert fn(x).tolist() == [0.0, 0.0] and fn.traces == 4


def test_traces_are_dropped_past_the_bound():
    fn = Traced(lambda x: x + 1)
    for n in range(1, MAX_TRACES + 1):
        fn(mx.zeros((n,)))
    assert fn.traces == MAX_TRACES
    assert fn(mx.zeros((MAX_TRACES + 1,))).tolist() == [1.0] * (MAX_TRACES + 1)
    assert fn.traces == 0  # one more trace than the bound: all dropped
    assert fn(mx.zeros((1,))).tolist() == [1.0] and fn.traces == 1


def test_a_traced_kernel_forward_keeps_its_reference_gradient():
    """The custom function inside the trace still gives the reference's VJP (a forward that
    has none of its own: its gradient would be wrong through MLX's)."""

    def forward(x, w, eps):
        return mx.stop_gradient(x * w + eps)

    def reference(x, w, eps):
        return mx.sin(x) * w + eps

    fn = Traced(with_reference_transforms(forward, reference))
    x, w = _x(3, 5), _x(5, seed=1)
    for _ in range(2):  # traced, then replayed
        got = mx.grad(lambda x: fn(x, w, 0.5).sum())(x)
        np.testing.assert_allclose(got, mx.cos(x) * w, rtol=1e-5, atol=1e-6)


def test_a_forward_that_raises_raises_at_each_call():
    def forward(x):
        if x.shape[0] > 2:
            raise ValueError("[toy] x is too long")
        return x * 2

    fn = Traced(forward)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"\[toy\] x is too long"):
            fn(mx.zeros((3,)))
    assert fn(mx.ones((2,))).tolist() == [2.0, 2.0]


def test_poison_is_read_as_the_value_poisoned_sets():
    # Traces are told apart by identity: poisoned() must set this one NaN object.
    with poisoned():
        assert _POISON.get() is math.nan


def test_a_traced_kernel_forward_keeps_its_reference_jvp_and_vmap():
    def forward(x, w, eps):
        return mx.stop_gradient(x * w + eps)

    def reference(x, w, eps):
        return mx.sin(x) * w + eps

    fn = Traced(with_reference_transforms(forward, reference))
    x, w, t = _x(3, 5), _x(5, seed=1), _x(3, 5, seed=2)
    for _ in range(2):  # traced, then replayed
        _, (tangent,) = mx.jvp(lambda x: fn(x, w, 0.5), [x], [t])
        np.testing.assert_allclose(tangent, mx.cos(x) * w * t, rtol=1e-5, atol=1e-6)
        mapped = mx.vmap(lambda x: fn(x, w, 0.5))(x)
        np.testing.assert_allclose(mapped, mx.sin(x) * w + 0.5, rtol=1e-5, atol=1e-6)
