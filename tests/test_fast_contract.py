"""The drop-in contract: ``mp.rms_norm``, ``layer_norm``, ``rope`` and
``scaled_dot_product_attention`` behave as their ``mx.fast`` namesakes (MLX's own
``python/tests/test_fast.py`` and ``test_fast_sdpa.py`` are the model: same arguments, same
results, same exception types), called directly and through ``mp.patch_mlx()``."""

from __future__ import annotations

import importlib
import math
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_primitives as mp
from mlx_primitives import dispatch
from mlx_primitives.hardware import current_backend
from mlx_primitives.patch import _INSTALLED, MLX_FAST, NAMES, patched

from .toy import record


@pytest.fixture(params=["direct", "patched"])
def fast(request):
    """The functions under test: this library's, or ``mx.fast``'s after ``patch_mlx()`` (each
    call through the dispatch)."""
    if request.param == "direct":
        yield {name: getattr(mp, name) for name in NAMES}
        return
    request.getfixturevalue("served")
    mp.patch_mlx()
    try:
        assert patched()
        yield {name: getattr(mx.fast, name) for name in NAMES}
    finally:
        mp.unpatch_mlx()


def _close(a, b, atol=1e-5):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape
    assert np.allclose(a, b, atol=atol, rtol=1e-4, equal_nan=True), np.nanmax(np.abs(a - b))


def test_patch_installs_the_tuned_ops_where_they_may_gain_and_removes_them(db, monkeypatch):
    """patch_mlx() puts an op's function in mx.fast where a record of this machine could route
    a call elsewhere, or while calls are recorded; MLX's own stays where none could (then a
    patched program pays nothing for it), until the dispatch forgets its decisions. A function
    a program put in mx.fast since is left there. On the CPU attention is always ours: its
    untuned long calls run the blocked composition, not MLX's."""
    monkeypatch.setattr(dispatch, "_shipped_records", lambda chip, op_name: [])
    dispatch.reset()
    mp.patch_mlx()
    ours = {"scaled_dot_product_attention"} if current_backend() == "cpu" else set()
    try:
        assert patched()
        for n in NAMES:  # nothing tuned
            assert getattr(mx.fast, n) is (_INSTALLED[n] if n in ours else MLX_FAST[n]), n
        with mp.record():
            assert all(getattr(mx.fast, n) is _INSTALLED[n] for n in NAMES)
        assert mx.fast.rms_norm is MLX_FAST["rms_norm"]
        x, w = mx.random.normal((3, 16)), mx.ones((16,))
        o = mp.registry.op("rms_norm")
        db.put(record(o, (x.astype(mx.float16), w, 1e-5), "compiled", default_variant="builtin"))
        dispatch.reset()
        assert mx.fast.rms_norm.__wrapped__ is mp.rms_norm
        assert mx.fast.rope is MLX_FAST["rope"]
        # The built-in variants call MLX's own functions: no recursion through mx.fast.
        _close(mx.fast.rms_norm(x, None, 1e-5), MLX_FAST["rms_norm"](x, None, 1e-5))
        theirs = mx.fast.layer_norm = lambda *args, **kwargs: MLX_FAST["layer_norm"](*args)
        with mp.record():
            assert mx.fast.layer_norm is theirs
    finally:
        mp.unpatch_mlx()
    assert not patched()
    assert all(getattr(mx.fast, n) is MLX_FAST[n] for n in NAMES)
    dispatch.reset()  # forgetting again while unpatched puts nothing back
    assert all(getattr(mx.fast, n) is MLX_FAST[n] for n in NAMES)


def test_a_patched_program_is_served_by_the_tuned_variant(db, monkeypatch):
    """A program that calls mx.fast only gets the variant a tuning record chose."""
    o = mp.registry.op("rms_norm")
    x, w = mx.random.normal((8, 64)), mx.ones((64,))
    db.put(record(o, (x, w, 1e-5), "compiled", default_variant="builtin"))
    dispatch.reset()
    served = []
    compiled = o.variant("compiled")
    factory = compiled.factory

    def spy():
        fn = factory()
        return lambda *args: served.append(args) or fn(*args)

    monkeypatch.setattr(compiled, "factory", spy)
    monkeypatch.setattr(compiled, "_built", {})
    mp.patch_mlx()
    try:
        _close(mx.fast.rms_norm(x, w, 1e-5), MLX_FAST["rms_norm"](x, w, 1e-5))
    finally:
        mp.unpatch_mlx()
    assert any(args[0] is x for args in served)  # the probe runs it too, on its own input


def test_a_patched_function_hands_to_mlx_the_calls_no_record_could_change(db, monkeypatch):
    """Through mx.fast, a call reaches the dispatch only where a usable record of its op and
    dtype chose another variant than the default, or where calls are recorded."""
    o = mp.registry.op("rms_norm")
    reached = []
    serve = o.serve
    monkeypatch.setattr(o, "serve", lambda *args: reached.append(args) or serve(*args))
    x, w = mx.random.normal((8, 64)), mx.ones((64,))
    x16, w16 = x.astype(mx.float16), w.astype(mx.float16)

    def dispatched(args=None, variant=None) -> bool:
        if args is not None:  # a record for args' problem, the built-in its default
            db.put(record(o, args, variant, default_variant="builtin"))
            dispatch.reset()
        reached.clear()
        _close(mx.fast.rms_norm(x, w, 1e-5), MLX_FAST["rms_norm"](x, w, 1e-5))
        return bool(reached)

    mp.patch_mlx()
    try:
        assert not dispatched()  # nothing tuned
        assert not dispatched((x, w, 1e-5), "builtin")  # one that kept the default
        assert not dispatched((x16, w16, 1e-5), "compiled")  # a win in another dtype
        with mp.record():
            assert dispatched()
        assert dispatched((x, w, 1e-5), "compiled")
        monkeypatch.setenv("MLXP_DISPATCH", "default")
        dispatch.reset()
        assert not dispatched()
    finally:
        mp.unpatch_mlx()


# rms_norm and layer_norm


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_norms_match_mlx(fast, dtype):
    x = mx.random.normal((3, 5, 33)).astype(dtype)
    w, b = mx.random.normal((33,)).astype(dtype), mx.random.normal((33,)).astype(dtype)
    atol = 1e-5 if dtype == mx.float32 else 3e-2
    _close(fast["rms_norm"](x, w, 1e-5), MLX_FAST["rms_norm"](x, w, 1e-5), atol)
    _close(fast["rms_norm"](x, None, 1e-5), MLX_FAST["rms_norm"](x, None, 1e-5), atol)
    for weight, bias in ((w, b), (w, None), (None, b), (None, None)):
        want = MLX_FAST["layer_norm"](x, weight, bias, 1e-5)
        got = fast["layer_norm"](x, weight=weight, bias=bias, eps=1e-5)
        assert got.dtype == want.dtype
        _close(got, want, atol)


def test_norms_take_a_stream(fast):
    x, w = mx.random.normal((4, 8)), mx.ones((8,))
    _close(fast["rms_norm"](x, w, 1e-5, stream=mx.cpu), MLX_FAST["rms_norm"](x, w, 1e-5))
    _close(
        fast["layer_norm"](x, w, None, 1e-5, stream=mx.default_stream(mx.cpu)),
        MLX_FAST["layer_norm"](x, w, None, 1e-5),
    )


def test_norm_gradients_match_mlx(fast):
    x, w, y = mx.random.normal((4, 16)), mx.random.normal((16,)), mx.random.normal((4, 16))
    for name, extra in (("rms_norm", ()), ("layer_norm", (None,))):

        def loss(f, extra=extra):
            return lambda x, w: (f(x, w, *extra, 1e-5) * y).sum()

        got = mx.grad(loss(fast[name]), argnums=(0, 1))(x, w)
        want = mx.grad(loss(MLX_FAST[name]), argnums=(0, 1))(x, w)
        for g, r in zip(got, want):
            _close(g, r, 1e-4)


@pytest.mark.parametrize(
    "name,args",
    [
        ("rms_norm", (mx.ones((8,), mx.int32), -1e-5)),
        ("rms_norm", (mx.ones((8,)), float("inf"))),
        ("rms_norm", (None, True)),
        ("layer_norm", (mx.ones((8,), mx.int32), None, 1e-5)),
        ("layer_norm", (None, mx.ones((8,), mx.int32), -1.0)),
    ],
)
def test_norms_take_what_mlx_takes(fast, name, args):
    """Values the variants do not model but MLX's norms take (an integer weight or bias, a
    negative, infinite or boolean eps) give MLX's results."""
    x = mx.random.normal((2, 8)).astype(mx.float16)
    got, want = fast[name](x, *args), MLX_FAST[name](x, *args)
    assert got.dtype == want.dtype
    _close(got, want)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f["rms_norm"](mx.ones((2, 8)), mx.ones((4,)), 1e-5),
        lambda f: f["rms_norm"](mx.ones((2, 8)), mx.ones((1, 8)), 1e-5),
        lambda f: f["rms_norm"](mx.array(1.0), None, 1e-5),
        lambda f: f["layer_norm"](mx.ones((2, 8)), mx.ones((3,)), None, 1e-3),
        lambda f: f["layer_norm"](mx.ones((2, 8)), None, mx.ones((3,)), 1e-3),
    ],
)
def test_norm_errors_are_mlxs(fast, call):
    with pytest.raises(ValueError):
        call(MLX_FAST)
    with pytest.raises(ValueError):
        call(fast)


# rope


def _rope(f, x, dims, **kwargs):
    options = {"traditional": False, "base": 10000.0, "scale": 1.0, "offset": 0, **kwargs}
    return f["rope"](x, dims, **options)


@pytest.mark.parametrize(
    "shape,dims,options",
    [
        ((2, 8, 16), 16, {}),
        ((2, 8, 16), 8, {"traditional": True, "offset": 3}),
        ((1, 4, 5, 32), 32, {"scale": 0.5, "base": 500.0}),
        ((3, 2, 4, 32), 32, {"offset": mx.arange(3)}),
        ((1, 1, 1, 64), 64, {"offset": 5}),
        ((2, 3, 4, 8), 8, {"base": None, "freqs": mx.random.uniform(shape=(4,))}),
        ((1, 1, 1024, 32), 32, {"offset": 4000}),
    ],
)
def test_rope_matches_mlx(fast, shape, dims, options):
    x = mx.random.normal(shape)
    _close(_rope(fast, x, dims, **options), _rope(MLX_FAST, x, dims, **options), 1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"base": -10000.0},
        {"scale": -1.0},
        {"scale": float("inf")},
        {"base": None, "freqs": mx.array([1, 2, 4, 8], mx.int32)},
    ],
)
def test_rope_takes_what_mlx_takes(fast, options):
    """A negative or non-finite base or scale, or integer frequencies, which the variants do
    not model: MLX's results."""
    x = mx.random.normal((1, 2, 4, 8))
    _close(_rope(fast, x, 8, **options), _rope(MLX_FAST, x, 8, **options), 1e-4)


def test_rope_on_a_transposed_input_and_a_stream(fast):
    x = mx.random.uniform(shape=(1, 1, 4, 32)).swapaxes(1, 2)
    _close(_rope(fast, 1.0 * x, 32), _rope(MLX_FAST, x, 32))
    _close(_rope(fast, x, 32, stream=mx.cpu), _rope(MLX_FAST, x, 32))


def test_rope_gradient_matches_mlx(fast):
    x, y = mx.random.uniform(shape=(2, 100, 32)), mx.random.uniform(shape=(2, 100, 32))
    for dims, traditional in ((32, True), (16, False)):

        def loss(f, dims=dims, traditional=traditional):
            return lambda x: (_rope(f, x, dims, traditional=traditional) * y).sum()

        _close(mx.grad(loss(fast))(x), mx.grad(loss(MLX_FAST))(x))


@pytest.mark.parametrize(
    "x,dims,options",
    [
        ((mx.random.uniform(shape=(2, 4, 8)) * 10).astype(mx.int32), 8, {}),
        (mx.ones((1, 4, 64)), 0, {}),
        (mx.ones((1, 4, 64)), -2, {}),
        (mx.ones((1, 4, 64)), 7, {}),
        (mx.ones((1, 4, 64)), 128, {}),
        (mx.ones((2, 4, 8)), 8, {"base": None, "freqs": mx.ones((7,))}),
        (mx.ones((2, 4, 8)), 8, {"base": None, "freqs": mx.ones((1, 8))}),
        (mx.ones((2, 4, 8)), 8, {"base": None}),
        (mx.ones((2, 4, 8)), 8, {"freqs": mx.ones((4,))}),
        (mx.ones((8, 4, 4, 32)), 32, {"offset": mx.array([1, 2, 3])}),
        (mx.ones((2, 4, 8)), 8, {"offset": 1.5}),
        (mx.ones((2, 4, 8)), 8, {"offset": mx.array(1.5)}),
        (mx.ones((4, 8)), 8, {}),
    ],
)
def test_rope_errors_are_mlxs(fast, x, dims, options):
    with pytest.raises(ValueError):
        _rope(MLX_FAST, x, dims, **options)
    with pytest.raises(ValueError):
        _rope(fast, x, dims, **options)


# scaled_dot_product_attention


def _qkv(b=2, hq=4, hkv=2, lq=5, lk=9, d=16, dtype=mx.float32, dv=None):
    keys = mx.random.split(mx.random.key(0), 3)
    q = mx.random.uniform(0.0, 0.5, (b, hq, lq, d), key=keys[0]).astype(dtype)
    k = mx.random.uniform(0.0, 0.5, (b, hkv, lk, d), key=keys[1]).astype(dtype)
    v = mx.random.uniform(-1.0, 1.0, (b, hkv, lk, dv or d), key=keys[2]).astype(dtype)
    return q, k, v


def _sdpa(f, q, k, v, **kwargs):
    return f["scaled_dot_product_attention"](q, k, v, scale=1 / math.sqrt(q.shape[-1]), **kwargs)


MASKS = {
    "none": lambda lq, lk: None,
    "causal": lambda lq, lk: "causal",
    "bool 0-d": lambda lq, lk: mx.array(True),
    "bool 1-d": lambda lq, lk: mx.arange(lk) % 3 != 0,
    "bool 2-d": lambda lq, lk: mx.random.uniform(shape=(lq, lk)) < 0.6,
    "bool 4-d": lambda lq, lk: mx.random.uniform(shape=(2, 4, lq, lk)) < 0.6,
    "bool 3-d heads": lambda lq, lk: mx.random.uniform(shape=(4, lq, lk)) < 0.6,
    "additive 0-d": lambda lq, lk: mx.array(0.5),
    "additive 1-d": lambda lq, lk: mx.random.normal((lk,)),
    "additive 4-d": lambda lq, lk: mx.random.normal((2, 1, lq, lk)),
    "all hidden bool": lambda lq, lk: mx.zeros((lq, lk), mx.bool_),
    "all hidden additive": lambda lq, lk: mx.full((lq, lk), -math.inf),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lq,lk", [(5, 9), (1, 9), (9, 5), (3, 3)])
def test_sdpa_matches_mlx(fast, mask, lq, lk):
    """Every mask kind and rank, GQA, causal with more queries than keys, and rows that may
    attend to no key: the mean of the values (boolean, causal) or NaN (additive -inf)."""
    q, k, v = _qkv(lq=lq, lk=lk)
    m = MASKS[mask](lq, lk)
    _close(_sdpa(fast, q, k, v, mask=m), _sdpa(MLX_FAST, q, k, v, mask=m))


@pytest.mark.parametrize("mask", ["none", "causal", "bool 2-d", "all hidden bool"])
def test_sdpa_sinks_match_mlx(fast, mask):
    q, k, v = _qkv(lq=6, lk=4)
    sinks = mx.random.normal((4,))
    m = MASKS[mask](6, 4)
    _close(_sdpa(fast, q, k, v, mask=m, sinks=sinks), _sdpa(MLX_FAST, q, k, v, mask=m, sinks=sinks))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_sdpa_in_16_bits_and_promoted_dtypes(fast, dtype):
    q, k, v = _qkv(dtype=dtype)
    for mask in (None, "causal", mx.random.normal((5, 9)).astype(dtype)):
        _close(_sdpa(fast, q, k, v, mask=mask), _sdpa(MLX_FAST, q, k, v, mask=mask), 2e-2)
    mixed = (q, k.astype(mx.float32), v)
    out = _sdpa(fast, *mixed)
    assert out.dtype == _sdpa(MLX_FAST, *mixed).dtype == mx.float32


def test_sdpa_values_with_their_own_head_dim_and_force_fused(fast):
    q, k, v = _qkv(dv=8)
    _close(_sdpa(fast, q, k, v, mask="causal"), _sdpa(MLX_FAST, q, k, v, mask="causal"))
    q, k, v = _qkv()
    _close(_sdpa(fast, q, k, v, force_fused=False), _sdpa(MLX_FAST, q, k, v))


def test_sdpa_gradients_match_mlx(fast):
    q, k, v = _qkv()
    cot = mx.random.normal((2, 4, 5, 16))

    def loss(f):
        return lambda q, k, v: (_sdpa(f, q, k, v, mask="causal") * cot).sum()

    got = mx.grad(loss(fast), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(MLX_FAST), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        _close(g, w, 1e-4)


@pytest.mark.parametrize(
    "call",
    [
        lambda f, q, k, v: _sdpa(f, q[0], k[0], v[0]),
        lambda f, q, k, v: _sdpa(f, q, k, v, mask="foo"),
        lambda f, q, k, v: _sdpa(f, q, k, v, mask=mx.ones((1, 1, 1, 5, 9), mx.bool_)),
        lambda f, q, k, v: _sdpa(f, q, k, v, mask=mx.ones((3, 4), mx.bool_)),
        lambda f, q, k, v: _sdpa(f, q, k, v, sinks=mx.ones((3,))),
        lambda f, q, k, v: _sdpa(f, *(a.astype(mx.int32) for a in (q, k, v))),
        lambda f, q, k, v: _sdpa(f, mx.ones((2, 3, 5, 16)), k, v),
        lambda f, q, k, v: _sdpa(f, mx.ones((2, 4, 5, 8)), k, v),
        lambda f, q, k, v: _sdpa(f, mx.ones((1, 4, 5, 16)), k, v),
        lambda f, q, k, v: _sdpa(
            f, *(a.astype(mx.float16) for a in (q, k, v)), mask=mx.zeros((5, 9))
        ),
    ],
)
def test_sdpa_errors_are_mlxs(fast, call):
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        mx.eval(call(MLX_FAST, q, k, v))
    with pytest.raises(ValueError):
        mx.eval(call(fast, q, k, v))


@pytest.mark.parametrize("name", ["flash_attention", "sliding_window_attention"])
def test_attention_ops_take_the_same_masks(name):
    """flash_attention and sliding_window_attention take masks of any rank and sinks, with the
    same meaning (sliding_window_attention is causal attention inside the window)."""
    q, k, v = _qkv(lq=5, lk=9)
    sinks = mx.random.normal((4,))
    for mask in ("bool 0-d", "bool 1-d", "additive 1-d", "bool 3-d heads", "all hidden bool"):
        m = MASKS[mask](5, 9)
        if name == "flash_attention":
            got = mp.flash_attention(q, k, v, mask=m, sinks=sinks, scale=0.25)
            want = MLX_FAST["scaled_dot_product_attention"](
                q, k, v, scale=0.25, mask=m, sinks=sinks
            )
        else:
            got = mp.sliding_window_attention(q, k, v, 9, mask=m, sinks=sinks, scale=0.25)
            tri = mx.array(np.tril(np.ones((5, 9), bool), 4))
            full = mx.broadcast_to(m, (2, 4, 5, 9))
            hidden = mx.where(tri, full, mx.finfo(mx.float32).min if m.dtype != mx.bool_ else False)
            want = MLX_FAST["scaled_dot_product_attention"](
                q, k, v, scale=0.25, mask=hidden, sinks=sinks
            )
        _close(got, want)


def _attention_variants():
    o = mp.registry.op("flash_attention")
    for v in o.variants:
        if v.available():
            for cfg in v.configs()[:2]:
                yield pytest.param(v, cfg, id=f"{v.name}-{cfg}")


@pytest.mark.parametrize("variant,cfg", list(_attention_variants()))
@pytest.mark.parametrize("mask", ["causal", "bool 2-d", "all hidden bool", "all hidden additive"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_every_attention_variant_keeps_mlxs_semantics(variant, cfg, mask, with_sinks):
    """Whatever the tuner picks, a row that may attend to no key gives what MLX gives."""
    q, k, v = _qkv(lq=9, lk=5)
    sinks = mx.random.normal((4,)) if with_sinks else None
    m = MASKS[mask](9, 5)
    causal, array = (True, None) if m == "causal" else (False, m)
    fn = variant.build(**cfg)
    got = fn(q, k, v, causal=causal, scale=0.25, mask=array, sinks=sinks)
    _close(got, MLX_FAST["scaled_dot_product_attention"](q, k, v, scale=0.25, mask=m, sinks=sinks))


@pytest.mark.parametrize("variant,cfg", list(_attention_variants()))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("lq,lk", [(9, 5), (5, 9)])
def test_a_causal_and_an_additive_mask_agree_in_every_variant(variant, cfg, dtype, lq, lk):
    """flash_attention's causal mask with an additive mask (MLX's attention takes one mask):
    what the causal mask hides is -inf in the additive one, in every variant and dtype."""
    q, k, v = _qkv(lq=lq, lk=lk, dtype=dtype)
    mask = mx.random.normal((lq, lk)).astype(dtype)
    keep = mx.array(np.tril(np.ones((lq, lk), bool), lk - lq))
    folded = mx.where(keep, mask, -math.inf)
    want = MLX_FAST["scaled_dot_product_attention"](q, k, v, scale=0.25, mask=folded)
    got = variant.build(**cfg)(q, k, v, causal=True, scale=0.25, mask=mask)
    _close(got, want, 1e-5 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("name", ["gather_mm", "gather_qmm", "quantized_matmul"])
def test_a_module_loaded_with_ours_in_mlxs_place_refuses(monkeypatch, name):
    """The built-in variants call MLX's own function as it was at import: loaded where a
    program has put this library's in MLX's place, an op module refuses rather than recurse."""
    monkeypatch.setattr(mx, name, getattr(mp, name))
    monkeypatch.delitem(sys.modules, f"mlx_primitives.ops.{name}")
    with pytest.raises(ImportError, match=rf"mlx.core.{name} is already this library's"):
        importlib.import_module(f"mlx_primitives.ops.{name}")
