"""Every variant of every op has the public function's signature (names, kinds, defaults), so
a tuned variant serves any call the default serves; kernel variants differentiate, linearize
and vectorize through the op's reference."""

from __future__ import annotations

import functools
import inspect

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives.dialect.kernel import with_reference_transforms
from mlx_primitives.registry import ops

from . import references as ref


def _params():
    for o in ops():
        for v in o.variants:
            for cfg in v.configs()[:2]:
                yield pytest.param(o, v, cfg, id=f"{o.name}-{v.name}-{len(cfg) and cfg}")


@pytest.mark.parametrize("o,v,cfg", list(_params()))
def test_variant_has_the_public_signature(o, v, cfg):
    public = inspect.signature(getattr(mp, o.name))
    built = inspect.signature(v.build(**cfg))
    assert [(p.name, p.kind, p.default) for p in built.parameters.values()] == [
        (p.name, p.kind, p.default) for p in public.parameters.values()
    ], f"{o.name}/{v.name}: {built} != {public}"


def test_keyword_and_default_arguments_reach_every_variant():
    x, w = mx.random.normal((3, 16)), mx.random.normal((16,))
    for v in mp.registry.op("rms_norm").variants:
        if v.available():
            fn = v.build(**v.configs()[0])
            ref.assert_close(fn(x, weight=w, eps=1e-3), ref.rms_norm(x, w, 1e-3), mx.float32)
            ref.assert_close(fn(x, w), ref.rms_norm(x, w, 1e-5), mx.float32)


def _fake_kernel():
    """A forward without transformations of its own, standing for a custom kernel."""
    calls = []

    def forward(x, w, eps):
        calls.append(1)
        return mx.stop_gradient(x * mx.rsqrt(mx.mean(x * x, -1, keepdims=True) + eps) * w)

    def reference(x, w, eps):
        return x * mx.rsqrt(mx.mean(x * x, -1, keepdims=True) + eps) * w

    return with_reference_transforms(forward, reference), reference, calls


def test_kernel_transforms_go_through_the_reference():
    fn, reference, calls = _fake_kernel()
    x, w = mx.random.normal((4, 8)), mx.random.normal((8,))
    cot = mx.random.normal((4, 8))
    want = mx.vjp(lambda x, w: reference(x, w, 1e-5), [x, w], [cot])[1]
    got = mx.vjp(lambda x, w: fn(x, w, 1e-5), [x, w], [cot])[1]
    for g, r in zip(got, want):
        assert mx.allclose(g, r, atol=1e-6)
    tx, tw = mx.random.normal((4, 8)), mx.random.normal((8,))
    want = mx.jvp(lambda x, w: reference(x, w, 1e-5), [x, w], [tx, tw])[1][0]
    got = mx.jvp(lambda x, w: fn(x, w, 1e-5), [x, w], [tx, tw])[1][0]
    assert mx.allclose(got, want, atol=1e-6)
    xs = mx.random.normal((3, 4, 8))
    mapped = mx.vmap(lambda x: fn(x, w, 1e-5))(xs)
    assert mx.allclose(mapped, reference(xs, w, 1e-5), atol=1e-6)
    assert calls  # the forward itself ran for the plain calls


@pytest.mark.parametrize("with_weight", [False, True])
def test_kernel_transforms_keep_arrays_after_other_arguments_apart(with_weight):
    """Arrays after non-array arguments (rope's freqs and offset, layer_norm's bias after a
    None weight) keep their own vmap axes and gradients: MLX pairs a custom function's vmap
    axes with its arguments counting the non-arrays too."""

    def reference(x, scale, w, b, shift):
        return (x * scale + (0 if w is None else w) + b) * shift

    fn = with_reference_transforms(lambda *a: mx.stop_gradient(reference(*a)), reference)
    xs, b = mx.random.normal((8, 8)), mx.random.normal((8,))
    w = mx.random.normal((8,)) if with_weight else None
    # b unmapped, of the mapped size: a wrong axis would map it silently.
    got = mx.vmap(lambda x: fn(x, 2.0, w, b, 3.0))(xs)
    assert mx.allclose(got, reference(xs, 2.0, w, b, 3.0), atol=1e-6)
    # Only b mapped.
    got = mx.vmap(lambda b: fn(xs[0], 2.0, w, b, 3.0))(xs)
    assert mx.allclose(got, reference(xs[0], 2.0, w, xs, 3.0), atol=1e-6)
    want = mx.grad(lambda b: reference(xs, 2.0, w, b, 3.0).sum())(b)
    assert mx.allclose(mx.grad(lambda b: fn(xs, 2.0, w, b, 3.0).sum())(b), want)
    tangent = mx.random.normal((8,))
    want = mx.jvp(lambda b: reference(xs, 2.0, w, b, 3.0), [b], [tangent])[1][0]
    got = mx.jvp(lambda b: fn(xs, 2.0, w, b, 3.0), [b], [tangent])[1][0]
    assert mx.allclose(got, want)


def _loss(f, args: tuple, i: int, a):
    """The sum of ``f(*args)`` with argument ``i`` replaced by ``a``."""
    full = list(args)
    full[i] = a
    return f(*full).sum()


def test_kernel_gradients_skip_integer_arrays_before_floating_ones():
    """An integer array (rope's offset) before a floating one: MLX takes the VJP's gradients
    by array position, so the held-constant array still needs its entry."""

    def shift(x, off, scale, w):
        return (x + off.astype(x.dtype)) * w * scale

    def swapped(x, off, w, scale):
        return shift(x, off, scale, w)

    x, w = mx.random.normal((3, 4)), mx.random.normal((4,))
    off = mx.array([1, 2, 3, 4], mx.int32)
    # w after a non-array (packed), and the arrays first (as they are).
    for reference, args, at_w in ((shift, (x, off, 2.0, w), 3), (swapped, (x, off, w, 2.0), 2)):
        fn = with_reference_transforms(functools.partial(_frozen, reference), reference)
        for i in (0, at_w):
            want = mx.grad(functools.partial(_loss, reference, args, i))(args[i])
            got = mx.grad(functools.partial(_loss, fn, args, i))(args[i])
            assert got.shape == want.shape and mx.allclose(got, want)


def _frozen(reference, *args):
    """``reference`` without gradients of its own: a stand-in for a custom kernel."""
    return mx.stop_gradient(reference(*args))


def test_inference_mode_skips_the_gradient_wrapper():
    """In inference_mode a kernel runs bare: the fake kernel's forward stops gradients, so a
    gradient that is zero there shows the reference's VJP was not used."""
    fn, reference, calls = _fake_kernel()
    x, w = mx.random.normal((4, 8)), mx.random.normal((8,))

    def loss(x):
        return fn(x, w, 1e-5).sum()

    want = mx.grad(lambda x: reference(x, w, 1e-5).sum())(x)
    assert mx.allclose(mx.grad(loss)(x), want, atol=1e-6)
    with mp.inference_mode():
        assert mx.array_equal(fn(x, w, 1e-5), reference(x, w, 1e-5))
        assert not mx.any(mx.grad(loss)(x)).item()
    assert mx.allclose(mx.grad(loss)(x), want, atol=1e-6)  # the mode ends with its block
    with pytest.raises(KeyError), mp.inference_mode():
        raise KeyError("inside")
    assert mx.allclose(mx.grad(loss)(x), want, atol=1e-6)  # ... also when the block raises
    with mp.inference_mode():
        with mp.inference_mode():
            pass
        assert not mx.any(mx.grad(loss)(x)).item()  # a nested block ends only itself


def test_compiled_composition_does_not_retrace_for_each_offset():
    """mx.compile traces anew for each new Python scalar: a decoding loop passes a new offset
    every step, so the compiled variant passes it as an array."""
    from mlx_primitives.ops._common import mlx_variants

    traces = []

    def composition(x, offset):
        traces.append(1)
        return x + offset

    compiled = next(v for v in mlx_variants(composition, dynamic=(1,)) if v.name == "compiled")
    fn = compiled.factory()
    for offset in range(20):
        assert fn(mx.zeros(3), offset).tolist() == [offset] * 3
    assert len(traces) == 1
    assert mp.registry.op("rope").variant("compiled").build()(
        mx.ones((1, 1, 2, 4)), 4, offset=7
    ).shape == (1, 1, 2, 4)
