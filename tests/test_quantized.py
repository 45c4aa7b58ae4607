"""quantized_matmul and QuantizedLinear: MLX's semantics on MLX's packed format, the calls the
variants leave to MLX, bad inputs against the errors MLX raises, the layer as a drop-in, and
the kernels' limits. Every variant against the float64 NumPy reference, on odd shapes and
every dtype, is tests/test_ops.py's (CPU) and tests/test_gpu.py's (kernels), over the cases
of tests/cases.py."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_primitives as mp
from mlx_primitives import dispatch
from mlx_primitives.dialect import poisoned
from mlx_primitives.hardware import current_backend
from mlx_primitives.ops import _quantized_kernels as kernels
from mlx_primitives.problem import Unmodelled
from mlx_primitives.registry import op as get_op

from . import references as ref
from .cases import covering
from .toy import record

qmm = importlib.import_module("mlx_primitives.ops.quantized_matmul")
OP = get_op("quantized_matmul")
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
IDS = ["f32", "f16", "bf16"]


def _packed(out: int, k: int, group_size=64, bits=4, dtype=mx.float32, seed=0, mode="affine"):
    """``mx.quantize`` of an (out, k) matrix of unit-scale rows: (w, scales, biases or None)."""
    wf = mx.random.normal((out, k), key=mx.random.key(seed)) / np.sqrt(k)
    w, scales, *biases = mx.quantize(wf, group_size, bits, mode=mode)
    if mode != "affine":
        return w, scales, None
    return w, scales.astype(dtype), biases[0].astype(dtype)


def _x(shape, dtype=mx.float32, seed=1):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _tolerance(dtype) -> dict:
    atol, rtol = OP.tolerances[str(dtype).rsplit(".", 1)[-1]]
    return {"atol": atol, "rtol": rtol}


# --- the variants ---------------------------------------------------------------------------


def test_numpy_reference_unpacks_mlx_packing():
    """tests/references.py reads MLX's packing on its own: every width and group size."""
    for bits in (1, 2, 3, 4, 5, 6, 8):
        for group_size in (32, 64, 128):
            w, scales, biases = _packed(5, 384, group_size, bits)
            want = np.array(mx.dequantize(w, scales, biases, group_size, bits))
            got = ref.dequantize(w, scales, biases, group_size, bits)
            assert np.allclose(got, want, atol=1e-6, rtol=1e-6), (bits, group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("variant", ["dequantize", "compiled"])
def test_compositions_at_layer_sizes(variant, dtype):
    """Long rows (4096 and 14336 in-features), where rounding adds up, within the op's
    tolerances (the cases of tests/cases.py are short)."""
    fn = OP.variant(variant).build()
    for k, n, rows in ((4096, 96, 3), (14336, 32, 1)):
        w, scales, biases = _packed(n, k, 64, 4, dtype)
        x = _x((rows, k), dtype)
        want = ref.quantized_matmul(x, w, scales, biases)
        ref.assert_close(fn(x, w, scales, biases), want, dtype, **_tolerance(dtype))


def test_defaults_are_mlxs():
    """group_size and bits None are the affine mode's 64 and 4, in every variant."""
    w, scales, biases = _packed(16, 256)
    x = _x((2, 256))
    want = ref.quantized_matmul(x, w, scales, biases, True, 64, 4)
    for v in OP.variants:
        if v.available():
            got = v.build(**v.configs()[0])(x, w, scales, biases)
            ref.assert_close(got, want, mx.float32, label=v.name)
    assert OP.problem(x, w, scales, biases) == OP.problem(x, w, scales, biases, True, 64, 4)


def test_problem_key():
    w, scales, biases = _packed(40, 320, 32, 8, mx.bfloat16)
    x = _x((2, 3, 320), mx.bfloat16)
    p = OP.problem(x, w, scales, biases, True, 32, 8)
    assert p.key == (
        "quantized_matmul|bfloat16|rows=8,in_features=320,out_features=40,bits=8,group_size=32,"
        "transpose=true"
    )
    assert p.as_dict()["mode"] == "affine"
    # Its case makes the same problem (probes and explain build calls from it).
    shapes, options = OP.case(p.as_dict())
    args = OP.example(shapes, mx.bfloat16, mx.random.key(0), **options)
    assert OP.problem(*args) == p
    # Without transpose, w's rows are the in-features.
    untransposed = OP.problem(_x((3, 64)), *_packed(64, 320, 32, 8), False, 32, 8).as_dict()
    assert (untransposed["in_features"], untransposed["out_features"]) == (64, 320)


def test_float64_is_served_where_mlx_raises():
    """MLX's own op takes no float64 (it raises when evaluated): the composition serves it,
    called or through a layer (which hands to MLX's op only what its default would)."""
    w, scales, biases = _packed(8, 128, 64, 4, mx.float64)
    x = _x((3, 128), mx.float64)
    layer = mp.QuantizedLinear(128, 8, bias=False)
    layer.weight, layer.scales, layer.biases = w, scales, biases
    with mx.stream(mx.cpu):
        want = ref.quantized_matmul(x, w, scales, biases)
        for got in (mp.quantized_matmul(x, w, scales, biases), layer(x)):
            assert np.allclose(np.array(got), want, atol=1e-12, rtol=1e-12)
        with pytest.raises(RuntimeError):
            mx.eval(mx.quantized_matmul(x, w, scales, biases))


def test_cuda_float32_of_many_rows_is_not_mlxs(monkeypatch):
    """On CUDA, MLX's op gave wrong float32 outputs from 2 rows (an H100, at 64 output
    features) (docs/notes/2026-12-08-cuda-first-calls-and-float32-qmm.md):
    there the default is the composition, and a layer's float32 calls never skip to MLX's
    op; other dtypes, fewer rows and other back-ends stay MLX's."""
    gather = get_op("gather_qmm")

    def defaults(o, dtype, sizes, backend):
        out = []
        for n in sizes:
            case = {**dict(zip([d.name for d in o.dims], [n, 8, 256, 64, 4, 64, True])),
                    "dtype": dtype}  # fmt: skip
            out.append(o._default({**case, "mode": "affine", "sorted": False}, backend)[0])
        return out

    assert defaults(OP, "float32", (1, 2, 8, 2048), "cuda") == ["builtin"] + ["dequantize"] * 3
    assert defaults(OP, "float16", (8, 2048), "cuda") == ["builtin"] * 2
    assert defaults(OP, "float32", (8, 2048), "cpu") == ["builtin"] * 2
    assert defaults(gather, "float32", (1, 8), "cuda") == ["builtin", "take"]
    assert defaults(gather, "bfloat16", (8,), "cuda") == ["builtin"]
    for o in (OP, gather):
        assert not o.mlx_default("float32", "cuda") and o.mlx_default("float32", "metal")
    with monkeypatch.context() as on_cuda:
        on_cuda.setattr(dispatch, "current_backend", lambda: "cuda")
        dispatch.forget_calls()
        try:
            assert not dispatch.idle("quantized_matmul", mx.float32)
        finally:
            on_cuda.undo()
            dispatch.forget_calls()  # what it found, kept for this (CPU) device


def test_a_record_that_kept_the_default_serves_the_default_of_now(db, monkeypatch):
    """A record that kept the default says the default serves: the op's default as it is now
    (one made before CUDA's float32 calls left MLX's op keeps them off it)."""
    w, scales, biases = _packed(64, 256)
    args = (_x((16, 256)), w, scales, biases, True, 64, 4, "affine")
    db.put(record(OP, args, "builtin", default_variant="builtin"))
    dispatch.reset()
    assert dispatch.choose(OP, OP.problem(*args)).variant == "builtin"
    monkeypatch.setattr(OP, "_default", lambda problem, backend: ("dequantize", {}))
    decision = dispatch.choose(OP, OP.problem(*args))
    assert (decision.variant, decision.source) == ("dequantize", "user")


def test_gradient_wrt_x_matches_mlx():
    w, scales, biases = _packed(24, 192)
    x, cot = _x((3, 192)), _x((3, 24), seed=2)

    def loss(f):
        return mx.grad(lambda x: (f(x, w, scales, biases) * cot).sum())

    want = loss(mx.quantized_matmul)(x)
    assert mx.allclose(loss(mp.quantized_matmul)(x), want, atol=1e-5).item()
    assert np.allclose(np.array(want), np.array(cot) @ ref.dequantize(w, scales, biases), atol=1e-5)


def test_large_calls_are_checked_on_slices_of_rows(monkeypatch):
    """Past CHECK_MACS, the check's float64 reference runs on the first, middle and last
    CHECK_ROWS rows, and selects those rows of the call's output."""
    from mlx_primitives.check import expected, run_checked

    monkeypatch.setattr(qmm, "CHECK_MACS", 1000)
    args = OP.example(((2, 50, 64), (8, 8)), mx.float32, mx.random.key(0))
    slices = OP.check_slices(args)
    assert [s[0][0].shape for s in slices] == [(16, 64)] * 3
    y = OP(*args)
    full = ref.quantized_matmul(*args).reshape(100, 8)
    for (part, select), start in zip(slices, (0, 42, 84)):
        assert np.allclose(np.array(select([y])[0]), full[start : start + 16], atol=1e-5)
        assert np.allclose(ref.quantized_matmul(*part), full[start : start + 16])
    assert len(expected(OP, args)) == 3
    assert run_checked(OP, OP.variant("dequantize").build(), args, "float32").ok
    wrong = run_checked(OP, lambda *a: OP(*a) * 1.01, args, "float32")
    assert not wrong.ok
    monkeypatch.setattr(qmm, "CHECK_MACS", 2**28)
    assert OP.check_slices(args) is None


def test_a_tuned_record_serves_the_call(db):
    """A record naming the composition routes the public function and the layer there."""
    w, scales, biases = _packed(32, 256, 64, 4, mx.float16)
    x = _x((4, 256), mx.float16)
    args = (x, w, scales, biases, True, None, None, "affine")
    db.put(record(OP, args, "compiled", default_variant="builtin"))
    dispatch.reset()
    assert dispatch.choose(OP, OP.problem(*args)).variant == "compiled"
    got = mp.quantized_matmul(x, w, scales, biases)
    ref.assert_close(got, ref.quantized_matmul(*args), mx.float16, **_tolerance(mx.float16))
    assert any(key[0] == "quantized_matmul" for key in dispatch._calls)


# --- what MLX's own op serves ---------------------------------------------------------------


def _mlx_served(monkeypatch):
    """Fail the test if a call is routed to the variants (it must go to MLX's own op, the
    op's ``outside``)."""

    def refuse(*args):
        raise AssertionError("served by the variants")

    dispatch.forget_calls()
    monkeypatch.setattr(dispatch, "route", refuse)


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_other_modes_are_mlxs(mode, monkeypatch):
    w, scales, _ = _packed(32, 256, None, None, mode=mode)
    x = _x((3, 256), mx.bfloat16)
    want = mx.quantized_matmul(x, w, scales, mode=mode)
    _mlx_served(monkeypatch)
    assert mx.array_equal(mp.quantized_matmul(x, w, scales, mode=mode), want).item()


@pytest.mark.parametrize(
    "case",
    ["stacked weights", "float16 x, float32 scales", "int32 x", "bool x", "float16 biases"],
)
def test_calls_the_variants_do_not_model_are_mlxs(case, monkeypatch):
    w, scales, biases = _packed(16, 128)
    x = _x((2, 3, 128))
    if case == "stacked weights":
        w, scales, biases = (mx.stack([a, a * 0 + a]) for a in (w, scales, biases))
    elif case == "float16 x, float32 scales":
        x = x.astype(mx.float16)
    elif case == "int32 x":
        x = (x * 4).astype(mx.int32)
    elif case == "bool x":
        x = x > 0
    else:
        biases = biases.astype(mx.float16)
    want = mx.quantized_matmul(x, w, scales, biases)
    _mlx_served(monkeypatch)
    got = mp.quantized_matmul(x, w, scales, biases)
    assert got.dtype == want.dtype and mx.array_equal(got, want).item()


def test_stream_reaches_both_paths():
    w, scales, biases = _packed(16, 128)
    x = _x((2, 128))
    want = mx.quantized_matmul(x, w, scales, biases)
    for s in (mx.cpu, mx.default_stream(mx.cpu)):
        assert mx.allclose(mp.quantized_matmul(x, w, scales, biases, stream=s), want).item()
        got = mp.quantized_matmul(x.astype(mx.float16), w, scales, biases, stream=s)
        assert mx.array_equal(got, mx.quantized_matmul(x.astype(mx.float16), w, scales, biases))


# --- bad inputs (the public function's are tests/test_bad_inputs.py's) ----------------


def test_calls_the_variants_do_not_model_are_unmodelled_and_kept_as_mlxs():
    """The problem function marks the calls the variants do not model; dispatch keeps MLX's op
    for their argument marks, as it keeps a decision, while bad modelled calls stay errors."""
    x, (w, scales, biases) = _x((3, 256)), _packed(64, 256)
    outside = [
        ((x, w, scales.astype(mx.float16), biases), {}),
        ((x, w, scales, biases), {"mode": "mxfp4"}),
        ((x, w[None], scales[None], biases[None]), {}),
    ]
    for args, kwargs in outside:
        with pytest.raises(Unmodelled):
            OP.problem(*args, **kwargs)
    with pytest.raises(ValueError, match=r"x has 255 features \(its last dim\), expected 256"):
        OP.problem(x[:, :255], w, scales, biases)
    dispatch.forget_calls()
    args = outside[0][0]
    for _ in range(2):
        got = mp.quantized_matmul(*args)
    assert mx.array_equal(got, mx.quantized_matmul(*args)).item()
    kept = [fn for key, fn in dispatch._calls.items() if key[0] == "quantized_matmul"]
    assert kept == [OP.outside]


# --- QuantizedLinear ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias,group_size,bits", [(True, None, None), (False, 32, 8), (True, 128, 2)]
)
def test_quantized_linear_is_a_drop_in(served, bias, group_size, bits):
    theirs = nn.QuantizedLinear(256, 40, bias, group_size, bits)
    if bias:
        theirs.bias = mx.random.normal((40,))
    ours = mp.QuantizedLinear(256, 40, bias, group_size, bits)
    mine, their = dict(_flat(ours.parameters())), dict(_flat(theirs.parameters()))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in their.items()}
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in their.items()}
    ours.load_weights(list(their.items()), strict=True)
    x = _x((2, 3, 256))
    assert mx.array_equal(ours(x), theirs(x)).item()
    assert (ours.group_size, ours.bits, ours.mode) == (theirs.group_size, theirs.bits, "affine")
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    assert not ours.trainable_parameters() and not theirs.trainable_parameters()


def _flat(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_quantized_linear_from_linear(served, mode):
    linear = nn.Linear(128, 24)
    theirs = nn.QuantizedLinear.from_linear(linear, mode=mode)
    ours = mp.QuantizedLinear.from_linear(linear, mode=mode)
    for (name, a), (other, b) in zip(_flat(ours.parameters()), _flat(theirs.parameters())):
        assert name == other and mx.array_equal(a, b).item(), name
    x = _x((5, 128))
    assert mx.array_equal(ours(x), theirs(x)).item()
    # The input's gradient flows (the layer's own parameters are frozen).
    g = mx.grad(lambda x: ours(x).sum())(x)
    assert mx.allclose(g, mx.grad(lambda x: theirs(x).sum())(x), atol=1e-5).item()


def _spy_dequantize(monkeypatch) -> list:
    """The input shapes the ``dequantize`` variant serves from now on, as they come."""
    variant, served = OP.variant("dequantize"), []
    factory = variant.factory

    def spy():
        fn = factory()
        return lambda *a: served.append(a[0].shape) or fn(*a)

    monkeypatch.setattr(variant, "factory", spy)
    monkeypatch.setattr(variant, "_built", {})
    return served


def test_quantized_linear_keeps_its_routes_until_the_dispatch_forgets_them(db, monkeypatch):
    """A layer's calls go to MLX's op until a record of theirs chooses another variant, then
    to it (its route kept), and to the next choice once the record changes and the dispatch
    is reset."""
    layer = mp.QuantizedLinear(256, 40, bias=False)
    x = _x((1, 256))
    args = (x, layer.weight, layer.scales, layer.biases, True, 64, 4, "affine")
    served = _spy_dequantize(monkeypatch)
    layer(x)
    assert not served
    db.put(record(OP, args, "dequantize", default_variant="builtin"))
    dispatch.reset()
    for _ in range(3):
        np.testing.assert_allclose(layer(x), mx.quantized_matmul(*args[:4]), atol=1e-4)
    assert served == [(1, 256)] * 4  # the probe's case, then the three calls
    db.put(record(OP, args, "compiled", default_variant="builtin"))  # another choice
    dispatch.reset()
    served.clear()
    layer(x)
    assert not served


def test_quantized_linear_hands_to_mlx_the_calls_no_record_could_change(monkeypatch):
    """Where no record of quantized_matmul in the input's dtype chose another variant than the
    default, a layer's route is MLX's op itself: its calls skip the dispatch, until calls are
    recorded (then they go through it, to be counted)."""
    layer = mp.QuantizedLinear(256, 40, bias=True)
    x = _x((2, 256))
    reached = []
    first = dispatch._first
    monkeypatch.setattr(dispatch, "_first", lambda *a: reached.append(a[0].name) or first(*a))
    want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases) + layer.bias
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    assert not reached
    with mp.record():
        np.testing.assert_allclose(layer(x), want, atol=1e-5)
    assert reached == ["quantized_matmul"]


def test_quantized_layers_share_routes_only_where_their_arrays_agree():
    """The layers' routes are shared: a route made for one layer's scales is never another's
    whose scales have another dtype (a float64 input: the composition serves the first, and
    the second, of float32 scales, is MLX's call, which raises as mp.quantized_matmul's
    does)."""
    a, b = mp.QuantizedLinear(128, 64, bias=False), mp.QuantizedLinear(128, 64, bias=False)
    a.set_dtype(mx.float64)
    x = _x((2, 128), mx.float64)
    with mx.stream(mx.cpu):
        want = ref.quantized_matmul(x, a.weight, a.scales, a.biases)
        assert np.allclose(np.array(a(x)), want, atol=1e-12)
        with pytest.raises(RuntimeError):
            mx.eval(mp.quantized_matmul(x, b.weight, b.scales, b.biases))
        with pytest.raises(RuntimeError):
            mx.eval(b(x))


# --- SwiGLU blocks of quantized layers -------------------------------------------------------


def _block(kind: str, bias: bool = False) -> mp.SwiGLU:
    """A SwiGLU block of float layers, MLX's quantized ones or this library's (as lm.patch
    leaves a model's)."""
    block = mp.SwiGLU(128, 192, bias=bias)
    if kind != "float":
        nn.quantize(block, 64, 4)
    if kind == "ours":
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer, ours = block[name], mp.QuantizedLinear.__new__(mp.QuantizedLinear)
            ours.__dict__.update(layer.__dict__)
            dict.update(ours, layer)
            block[name] = ours
    mx.eval(block.parameters())
    return block


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("kind", ["float", "mlx", "ours"])
def test_a_decoding_swiglu_block_is_one_compiled_call(monkeypatch, kind, bias):
    """Up to FUSED_MAX_ROWS rows a SwiGLU block of three float or three quantized layers runs as
    one compiled call of its arrays, traced once per input shape: the numbers (and gradients)
    of its layers called one by one; longer inputs go layer by layer."""
    from mlx_primitives.nn import _fused, feed_forward

    block = _block(kind, bias)
    traced = []
    make = feed_forward._block

    def spy(kind):
        forward = make(kind)
        return lambda x, *arrays: traced.append(x.shape[1]) or forward(x, *arrays)

    monkeypatch.setattr(feed_forward, "_block", spy)
    monkeypatch.setattr(_fused, "_compiled", {})

    def layer_by_layer(x):
        g, u, d = block.gate_proj, block.up_proj, block.down_proj
        return d(nn.silu(g(x)) * u(x))

    most = feed_forward.FUSED_MAX_ROWS
    for rows in (1, 3, most, most + 1, 1):
        x = _x((1, rows, 128))
        np.testing.assert_allclose(block(x), layer_by_layer(x), rtol=1e-5, atol=1e-5)
    assert traced == [1, 3, most]
    x = _x((2, 1, 128))
    if kind == "float":  # the weights' gradients through the compiled call
        grads = nn.value_and_grad(block, lambda m, x: m(x).sum())(block, x)[1]
        with pytest.MonkeyPatch.context() as unfused:
            unfused.setattr(feed_forward, "FUSED_MAX_ROWS", 0)
            want = nn.value_and_grad(block, lambda m, x: m(x).sum())(block, x)[1]
        for (_, g), (_, w) in zip(tree_flatten(grads), tree_flatten(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    g = mx.grad(lambda x: block(x).sum())(x)
    np.testing.assert_allclose(g, mx.grad(lambda x: layer_by_layer(x).sum())(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "ours"])
def test_a_compiled_swiglu_block_follows_its_layers(kind):
    """A compiled block serves the layers its module has now: a bias added to a layer after
    the block was traced is added, a replaced layer's numbers are used and the old layer is
    not kept alive by the block."""
    import gc
    import weakref

    block = _block(kind)
    x = _x((1, 1, 128))

    def layer_by_layer(x):
        g, u, d = block.gate_proj, block.up_proj, block.down_proj
        return d(nn.silu(g(x)) * u(x))

    np.testing.assert_allclose(block(x), layer_by_layer(x), rtol=1e-5, atol=1e-5)
    block.down_proj.bias = mx.random.normal((128,))
    np.testing.assert_allclose(block(x), layer_by_layer(x), rtol=1e-5, atol=1e-5)
    old = weakref.ref(block.up_proj)
    block.up_proj = _block(kind).up_proj
    gc.collect()
    assert old() is None
    np.testing.assert_allclose(block(x), layer_by_layer(x), rtol=1e-5, atol=1e-5)


def test_a_compiled_swiglu_block_follows_the_dispatchs_decisions(db, monkeypatch):
    """A compiled block keeps the variants it traced only while the dispatch keeps its
    decisions: a new record serves it after a reset; while calls are recorded each projection
    is counted."""
    block = _block("ours")
    x = _x((1, 1, 128))
    served = _spy_dequantize(monkeypatch)
    want = block(x)
    assert not served
    layer = block.gate_proj
    args = (x, layer.weight, layer.scales, layer.biases, True, 64, 4, "affine")
    db.put(record(OP, args, "dequantize", default_variant="builtin"))
    dispatch.reset()
    np.testing.assert_allclose(block(x), want, rtol=1e-5, atol=1e-5)
    assert (1, 1, 128) in served  # traced again: the gate and up projections' new variant
    with mp.record():
        block(x), block(x)
        counted = dict(mp.recording.counts())
    assert sum(n for (name, _), n in counted.items() if name == "quantized_matmul") == 2 * 3


def test_a_compiled_swiglu_block_traces_a_kernel_variant_once(db, monkeypatch):
    """The variants a compiled block traces may be custom kernels (here qmv, its launch stood
    in by MLX ops so that it runs on any machine): the block gives its layers' numbers, and
    each kernel is launched while the block is traced, not at its later calls."""
    launched = []

    def stand_in(**kwargs):
        launched.append(kwargs["inputs"][0].shape)
        return _stand_in(**kwargs)

    monkeypatch.setitem(kernels.QMV.__dict__, "_kernel", stand_in)
    qmv = OP.variant("qmv")
    monkeypatch.setattr(qmv, "backends", qmv.backends | {current_backend()})
    monkeypatch.setattr(qmv, "_built", {})
    block = _block("ours")
    config = {"lanes_k": 32, "cols": 4, "warps": 1, "vec": 4, "rows": 1, "scale": "after"}
    x, h = _x((1, 1, 128)), _x((1, 1, 192))
    for layer, into in ((block.gate_proj, x), (block.down_proj, h)):
        args = (into, layer.weight, layer.scales, layer.biases, True, 64, 4, "affine")
        db.put(record(OP, args, "qmv", config, default_variant="builtin"))
    dispatch.reset()
    g, u, d = (
        (layer.weight, layer.scales, layer.biases)
        for layer in (block.gate_proj, block.up_proj, block.down_proj)
    )
    want = mx.quantized_matmul(nn.silu(mx.quantized_matmul(x, *g)) * mx.quantized_matmul(x, *u), *d)
    np.testing.assert_allclose(block(x), want, rtol=1e-5, atol=1e-5)
    # The trace: each problem's probe (on its small case), then its projections.
    traced = [(1, 128)] * 3 + [(1, 192)] * 2
    assert launched == traced
    for _ in range(3):
        np.testing.assert_allclose(block(x), want, rtol=1e-5, atol=1e-5)
    assert launched == traced


def test_quantized_linear_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"\[QuantizedLinear\] mode must be one of"):
        mp.QuantizedLinear(64, 8, mode="int4")


# --- the qmv kernel -------------------------------------------------------------------------


def _problem(rows=1, k=4096, n=4096, bits=4, group_size=64, dtype="float16", transpose=True):
    return {
        "dtype": dtype,
        "rows": rows,
        "in_features": k,
        "out_features": n,
        "bits": bits,
        "group_size": group_size,
        "transpose": transpose,
        "mode": "affine",
    }


def test_qmv_declines_what_it_does_not_model():
    v = OP.variant("qmv")

    def served(**changes):
        return any(v.allows(_problem(**changes), c) for c in v.configs())

    assert served() and served(rows=32) and served(bits=8) and served(bits=2, group_size=32)
    assert not served(rows=64)
    assert not served(transpose=False)
    assert not served(bits=3) and not served(bits=6)
    assert not served(dtype="float64")
    # A lane's chunk of codes lies inside one quantization group.
    assert not v.allows(_problem(bits=2, group_size=32), {**v.configs()[0], "vec": 4})
    # Configurations serve every problem of the default preset of up to 32 rows.
    for ex in OP.presets["default"]:
        (rows, k), (n, _) = ex.shapes
        options = dict(ex.options)
        if rows <= 32:
            assert served(rows=rows, k=k, n=n, dtype=ex.dtype, **options), ex.label()


def test_qmv_configs_fit_registers_and_threadgroup_memory():
    v = OP.variant("qmv")
    problem = _problem(rows=32, k=14336)
    allowed = [c for c in v.configs() if v.allows(problem, c)]
    assert allowed
    for c in allowed:
        rows = c["rows"]
        side = 32 // c["lanes_k"]
        assert rows * c["cols"] <= kernels.MAX_REGISTERS
        shared = c["warps"] * rows * c["cols"] * side * 4 if c["warps"] > 1 else 0
        assert 2 * shared <= 49152 and shared <= 32768
    # 32 rows of 8 columns of accumulators alone would spill.
    assert not any(c["cols"] == 8 and c["rows"] == 32 for c in allowed)
    # Rows per pass: the problem's, a half or a quarter (rows 3 are 4 rounded up).
    for rows, want in ((1, {1}), (4, {4, 2, 1}), (32, {32, 16, 8})):
        assert {c["rows"] for c in v.configs() if v.allows(_problem(rows=rows), c)} == want


@pytest.mark.parametrize("rows,n", [(1, 4096), (3, 40), (17, 24), (32, 256)])
def test_qmv_launch_covers_every_output(rows, n, monkeypatch):
    """What the kernel is handed (launch skipped): a grid of whole groups whose columns cover
    every output, the configuration's rows per pass, x vectors holding at least a weight
    vector's words."""
    k = 256
    w, scales, biases = _packed(n, k, 64, 4, mx.float16)
    x = _x((rows, k), mx.float16)
    launches = []

    def launch(self, inputs, plan):
        launches.append((inputs, dict(plan["template"]), plan["grid"], plan["threadgroup"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(kernels.GpuKernel, "launch", launch)
    v = OP.variant("qmv")
    for cfg in covering(v, OP.problem(x, w, scales, biases).as_dict()):
        y = v.factory(**cfg)(x, w, scales, biases, True, 64, 4, "affine")
        assert y.shape == (rows, n)
        inputs, template, grid, group = launches.pop()
        assert [a.shape for a in inputs] == [(rows, k), w.shape, scales.shape, biases.shape]
        columns = 32 // cfg["lanes_k"] * cfg["cols"]  # a group's
        assert group == (32 * cfg["warps"], 1, 1) and grid[0] % group[0] == 0
        assert grid[0] // group[0] * columns >= n > (grid[0] // group[0] - 1) * columns
        assert template["LK"] == cfg["lanes_k"] and template["COLS"] == cfg["cols"]
        assert template["MT"] == cfg["rows"] and template["VEC"] >= template["WV"]
        assert template["SCALE_AFTER"] is (cfg["scale"] == "after")


# --- the mma kernel -------------------------------------------------------------------------


def test_mma_declines_what_it_does_not_model():
    v = OP.variant("mma")

    def served(**changes):
        return any(v.allows(_problem(**changes), c) for c in v.configs())

    assert v.backends == {"cuda"}
    assert served() and served(rows=32) and served(bits=8) and served(dtype="bfloat16")
    assert not served(rows=64) and not served(transpose=False)
    assert not served(dtype="float32") and not served(bits=2) and not served(bits=3)
    # Every warp of every split has a step of 128 in-features (4-bit).
    assert served(k=1024) and not v.allows(_problem(k=1024), {"tiles": 1, "warps": 8, "split": 2})
    # Serves every 16-bit 4- and 8-bit problem of the default preset of up to 32 rows.
    for ex in OP.presets["default"]:
        (rows, k), (n, _) = ex.shapes
        if rows <= 32:
            assert served(rows=rows, k=k, n=n, dtype=ex.dtype, **dict(ex.options)), ex.label()


@pytest.mark.parametrize("rows,k,n", [(1, 4096, 4096), (3, 4160, 40), (17, 192, 24), (32, 256, 8)])
def test_mma_launch_covers_every_output(rows, k, n, monkeypatch):
    """What the kernel is handed (launch skipped): one or two row tiles, a grid of whole groups
    whose columns cover every output once per split, float32 partial sums when split."""
    w, scales, biases = _packed(n, k, 64, 4, mx.float16)
    x = _x((rows, k), mx.float16)
    launches = []

    def launch(self, inputs, plan):
        shapes, dtypes = plan["output_shapes"], plan["output_dtypes"]
        launches.append((dict(plan["template"]), plan["grid"], plan["threadgroup"], shapes, dtypes))
        return [mx.zeros(s, d) for s, d in zip(shapes, dtypes)]

    monkeypatch.setattr(kernels.GpuKernel, "launch", launch)
    v = OP.variant("mma")
    configs = covering(v, OP.problem(x, w, scales, biases).as_dict())
    assert configs
    for cfg in configs:
        y = v.factory(**cfg)(x, w, scales, biases, True, 64, 4, "affine")
        assert y.shape == (rows, n) and y.dtype == mx.float16
        template, grid, group, shapes, dtypes = launches.pop()
        assert template["MT"] == (1 if rows <= 16 else 2) and template["NT"] == cfg["tiles"]
        assert group == (32 * cfg["warps"], 1, 1) and grid[0] % group[0] == 0
        groups, columns = grid[0] // group[0], 8 * cfg["tiles"]
        assert groups % cfg["split"] == 0
        per_split = groups // cfg["split"]
        assert per_split * columns >= n > (per_split - 1) * columns
        assert shapes == [(rows, n) if cfg["split"] == 1 else (cfg["split"], rows, n)]
        assert dtypes == [mx.float16 if cfg["split"] == 1 else mx.float32]


def _shifted(a: mx.array) -> mx.array:
    """``a`` as a row-contiguous view one element into its buffer (off any vector boundary)."""
    flat = mx.concatenate([mx.zeros((1,), a.dtype), a.reshape(-1)])
    return flat[1:].reshape(a.shape)


KERNELS = [v.name for v in OP.variants if v.is_kernel]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("which", ["x", "w", "both"])
def test_kernel_on_views_that_start_off_a_vector_boundary(which, kernel):
    """Views one element into their buffers reach the kernel uncopied: its vector loads of x
    and of the packed words must fall back to elements."""
    w, scales, biases = _packed(72, 1024, 64, 4, mx.float16)
    x = _x((5, 1024), mx.float16)
    if which in ("x", "both"):
        x = _shifted(x)
    if which in ("w", "both"):
        w = _shifted(w)
    args = (x, w, scales, biases, True, 64, 4, "affine")
    want = ref.quantized_matmul(*args)
    v = OP.variant(kernel)
    for cfg in covering(v, OP.problem(*args).as_dict())[:4]:
        with poisoned():
            got = v.build(**cfg)(*args)
        ref.assert_close(got, want, mx.float16, label=f"{kernel} {cfg}", **_tolerance(mx.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_kernel_at_layer_sizes_matches_the_reference(dtype, kernel):
    """A decode step and a batch of 16 rows at a Llama-3-8B down projection (14336
    in-features), each config family once."""
    w, scales, biases = _packed(4096, 14336, 64, 4, dtype)
    v = OP.variant(kernel)
    for rows in (1, 16):
        x = _x((rows, 14336), dtype)
        args = (x, w, scales, biases, True, 64, 4, "affine")
        want = ref.quantized_matmul(*args)
        for cfg in covering(v, OP.problem(*args).as_dict())[:3]:
            with poisoned():
                got = v.build(**cfg)(*args)
            ref.assert_close(got, want, dtype, label=f"{kernel} {cfg}", **_tolerance(dtype))


@pytest.mark.gpu
def test_float32_of_every_row_count_is_served_right():
    """float32 calls through the dispatch's defaults (no record) at the tiny models' layer (64
    features, where MLX's CUDA op gave NaN and unrepeatable outputs from 8 rows) and a real
    one: the reference's numbers, the same at every call, through the op and the layer.
    Where MLX's float32 matmuls run at TF32 (CUDA), at its precision."""
    tf32 = current_backend() == "cuda"
    tol = {"atol": 5e-3, "rtol": 5e-3} if tf32 else _tolerance(mx.float32)
    for out, k in ((64, 64), (1024, 4096)):
        w, scales, biases = _packed(out, k)
        layer = mp.QuantizedLinear(k, out, bias=False)
        layer.weight, layer.scales, layer.biases = w, scales, biases
        for rows in (1, 2, 7, 8, 11, 16, 64):
            x = _x((rows, k), seed=rows)
            want = ref.quantized_matmul(x, w, scales, biases)
            first = mp.quantized_matmul(x, w, scales, biases)
            for got in (first, mp.quantized_matmul(x, w, scales, biases), layer(x)):
                ref.assert_close(got, want, mx.float32, label=f"{out}x{k} {rows} rows", **tol)
                assert mx.array_equal(got, first).item(), f"{out}x{k} {rows} rows"
    # The experts' product: one row per (token, expert) pair, 1 to 16 pairs.
    w, scales, biases = (mx.stack(a) for a in zip(*(_packed(64, 64, seed=e) for e in range(4))))
    for tokens in (1, 4, 5, 8):
        x = _x((tokens, 1, 1, 64), seed=tokens)
        experts = mx.array([[e % 4, (e + 1) % 4] for e in range(tokens)], mx.uint32)
        args = (x, w, scales, biases, None, experts)
        want = ref.gather_qmm(*args)
        first = mp.gather_qmm(*args)
        for got in (first, mp.gather_qmm(*args)):
            ref.assert_close(got, want, mx.float32, label=f"{2 * tokens} pairs", **tol)
            assert mx.array_equal(got, first).item(), f"{2 * tokens} pairs"


def _stand_in(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value):
    """What a quantized kernel computes, in MLX ops, for the launch it is given: checks the
    path around the kernels (shapes, cached launch settings, the split's sum) on any machine."""
    t = dict(template)
    x2, w, scales, biases = inputs
    assert x2.ndim == 2 and output_shapes[0][-2:] == (x2.shape[0], w.shape[0])
    y = mx.quantized_matmul(x2, w, scales, biases, group_size=t["GS"], bits=t["BITS"])
    if len(output_shapes[0]) == 3:  # split: partial sums that add up to y
        split = output_shapes[0][0]
        y = mx.broadcast_to(y.astype(mx.float32) / split, output_shapes[0])
    return [y.astype(output_dtypes[0])]


@pytest.mark.parametrize(
    "variant, config",
    [
        ("qmv", {"lanes_k": 32, "cols": 4, "warps": 2, "vec": 4, "rows": 1, "scale": "after"}),
        ("mma", {"tiles": 4, "warps": 4, "split": 1}),
        ("mma", {"tiles": 2, "warps": 2, "split": 4}),
    ],
)
def test_a_kernel_launch_shapes_what_it_takes_and_gives(monkeypatch, variant, config):
    """One built variant, called with x of one, two and three dims (its launch settings kept
    per shape), gives the built-in's output in x's leading shape; a shape seen before is
    replayed (the forward is traced once per shape), on the new values."""
    launched = []

    def stand_in(**kwargs):
        launched.append(kwargs["inputs"][0].shape)
        return _stand_in(**kwargs)

    for kernel in (kernels.QMV, kernels.MMA):  # in place of the MLX kernel it makes on first use
        monkeypatch.setitem(kernel.__dict__, "_kernel", stand_in)
    w, scales, biases = _packed(96, 256, dtype=mx.float16)
    fn = OP.variant(variant).build(**config)
    for i, shape in enumerate([(256,), (3, 256), (2, 5, 256), (3, 256)]):
        x = mx.random.normal(shape, key=mx.random.key(i)).astype(mx.float16)
        got = fn(x, w, scales, biases, True, 64, 4, "affine")
        want = mx.quantized_matmul(x, w, scales, biases)
        assert got.shape == want.shape == (*shape[:-1], 96) and got.dtype == mx.float16
        np.testing.assert_allclose(np.array(got, np.float32), np.array(want, np.float32),
                                   rtol=1e-2, atol=1e-2)  # fmt: skip
    assert launched == [(1, 256), (3, 256), (10, 256)]
