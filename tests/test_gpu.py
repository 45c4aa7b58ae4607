"""Custom kernels on a GPU back-end: every kernel variant, over its parameter space, against
float64 NumPy references on odd shapes and all float dtypes, with poisoned outputs."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_primitives import dispatch
from mlx_primitives.dsl import inference_mode, poisoned
from mlx_primitives.hardware import current_backend
from mlx_primitives.problem import dtype_name
from mlx_primitives.registry import op as get_op
from mlx_primitives.tuning.db import TuningDB

from . import references as ref
from .test_ops import REFERENCES
from .toy import record

pytestmark = pytest.mark.gpu

DTYPES = [mx.float32, mx.float16, mx.bfloat16]

# (shapes, options) per op: rows of length 1, 3, 1000 and 4097, a single row, many rows.
CASES = {
    "rms_norm": [
        (((1, 4096),), {}),
        (((3, 1000),), {}),
        (((1000, 1024),), {}),
        (((5, 4097),), {}),
        (((7, 3),), {}),
        (((2, 3, 8),), {}),
        (((9, 1024),), {"weight": "none"}),
        (((9, 1024),), {"weight": "float32"}),
    ],
    "layer_norm": [
        (((1, 4096),), {}),
        (((3, 1000),), {"bias": "none"}),
        (((1000, 1024),), {"weight": "none", "bias": "none"}),
        (((5, 4097),), {"weight": "none"}),
        (((7, 3),), {}),
    ],
    "rope": [
        (((1, 1, 1, 8),), {}),
        (((2, 3, 37, 64),), {"traditional": True}),
        (((2, 37, 3, 64),), {"layout": "BSHD"}),
        (((1, 5, 8, 128),), {"layout": "BSHD", "traditional": True, "dims": 96}),
        (((2, 4, 9, 80),), {"freqs": True, "dims": 64}),
        (((3, 2, 5, 32),), {"offset": 100}),
        (((3, 4, 9, 64),), {"per_batch": True}),
        (((3, 9, 4, 64),), {"per_batch": True, "layout": "BSHD"}),
    ],
    "swiglu": [(((1,),), {}), (((3, 7),), {}), (((1000, 1024),), {}), (((2, 4097),), {})],
    "geglu": [
        (((1, 8),), {}),
        (((3, 1000),), {"approximate": "tanh"}),
        (((1000, 1024),), {"approximate": "fast"}),
        (((2, 4097),), {"approximate": "none"}),
    ],
}


def covering(variant, problem: dict) -> list[dict]:
    """Configs that the variant allows for ``problem``, covering each parameter value that any
    allowed config has at least once (not the whole product: each config is a compile)."""
    allowed = [c for c in variant.configs() if variant.allows(problem, c)]
    chosen: list[dict] = []
    for key in variant.space:
        for value in variant.space[key]:
            if any(c[key] == value for c in chosen):
                continue
            match = next((c for c in allowed if c[key] == value), None)
            if match is not None:
                chosen.append(match)
    return chosen


def _launches():
    for o in map(get_op, CASES):
        for v in o.variants:
            if not v.is_kernel:
                continue
            for i, (shapes, options) in enumerate(CASES[o.name]):
                for dtype in DTYPES:
                    yield pytest.param(
                        o.name,
                        v.name,
                        shapes,
                        options,
                        dtype,
                        id=f"{o.name}-{v.name}-{i}-{dtype_name(dtype)}",
                    )


@pytest.mark.parametrize("name,variant,shapes,options,dtype", list(_launches()))
def test_kernel_variant_matches_float64_reference(name, variant, shapes, options, dtype):
    o = get_op(name)
    v = o.variant(variant)
    args, kwargs = o.example(shapes, dtype, mx.random.key(abs(hash(shapes)) % 2**31), **options)
    problem = o.problem(*args, **kwargs).as_dict(o.dims)
    configs = covering(v, problem)
    if dtype != mx.float16:
        configs = configs[:2]  # the full cover in float16; each other dtype twice
    want = REFERENCES[name](args, kwargs)
    tol = o.tolerances.get(dtype_name(dtype))
    extra = {} if tol is None else {"atol": tol[0], "rtol": tol[1]}
    for cfg in configs:
        with poisoned():
            got = v.build(**cfg)(*args, **kwargs)
            mx.eval(got)
        ref.assert_close(got, want, dtype, label=f"{name}/{variant} {cfg}", **extra)


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "swiglu", "geglu"])
def test_kernel_on_non_contiguous_input(name):
    o = get_op(name)
    args, kwargs = o.example(((64, 40),), mx.float16, mx.random.key(3))
    args = (args[0].T.T[::2], *args[1:])  # a strided view: every other row
    if name in ("swiglu", "geglu"):
        args = (args[0], args[1][::2])
    want = REFERENCES[name](args, kwargs)
    for v in o.variants:
        if v.is_kernel:
            problem = o.problem(*args, **kwargs).as_dict(o.dims)
            for cfg in covering(v, problem)[:2]:
                with poisoned():
                    got = v.build(**cfg)(*args, **kwargs)
                ref.assert_close(got, want, mx.float16, label=f"{name}/{v.name} {cfg}")


def _served_case(o, key: int = 5):
    """Arguments of the first case past the first (a single row) that every kernel variant of
    ``o`` has a config for, in float32."""
    kernels = [v for v in o.variants if v.is_kernel]
    for shapes, options in CASES[o.name][1:]:
        args, kwargs = o.example(shapes, mx.float32, mx.random.key(key), **options)
        problem = o.problem(*args, **kwargs).as_dict(o.dims)
        if all(covering(v, problem) for v in kernels):
            return args, kwargs
    raise AssertionError(f"[{o.name}] no case serves every kernel variant")


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu"])
def test_kernel_gradients_match_reference(name):
    o = get_op(name)
    args, kwargs = _served_case(o)
    cot = mx.random.normal(o.reference(*args, **kwargs).shape, key=mx.random.key(6))
    pos = [i for i in o.differentiable if args[i] is not None]

    def grads(f):
        def loss(*diff):
            full = list(args)
            for i, d in zip(pos, diff):
                full[i] = d
            return (f(*full, **kwargs) * cot).sum()

        return mx.grad(loss, argnums=list(range(len(pos))))(*[args[i] for i in pos])

    want = grads(o.reference)
    for v in o.variants:
        if v.is_kernel:
            cfg = covering(v, o.problem(*args, **kwargs).as_dict(o.dims))[0]
            for g, w in zip(grads(v.build(**cfg)), want):
                ref.assert_close(
                    g, ref.f64(w), mx.float32, atol=1e-4, rtol=1e-3, label=f"{name}/{v.name} grad"
                )


def _runs_bare_in_inference_mode(fn, args, kwargs, label):
    """In inference_mode ``fn`` (a kernel variant) gives the same output without its gradient
    wrapper: a gradient or vmap through it is then MLX's error, and works again after."""

    def loss(x):
        return fn(x, *args[1:], **kwargs).sum()

    wrapped = fn(*args, **kwargs)
    with inference_mode():
        assert mx.array_equal(fn(*args, **kwargs), wrapped).item(), label
        with pytest.raises(ValueError, match="vjp"):
            mx.eval(mx.grad(loss)(args[0]))
        with pytest.raises(ValueError, match="vmap"):
            mx.eval(mx.vmap(loss)(args[0][None]))
    mx.eval(mx.grad(loss)(args[0]))


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu"])
def test_kernel_in_inference_mode_runs_bare(name):
    o = get_op(name)
    args, kwargs = _served_case(o, key=7)
    problem = o.problem(*args, **kwargs).as_dict(o.dims)
    for v in o.variants:
        if v.is_kernel:
            fn = v.build(**covering(v, problem)[0])
            _runs_bare_in_inference_mode(fn, args, kwargs, f"{name}/{v.name}")


def test_user_record_dispatches_a_kernel(user_db):
    """A tuned record naming a kernel variant serves the call (after its probe)."""
    o = get_op("rms_norm")
    x, w = mx.random.normal((8, 256)).astype(mx.float16), mx.ones((256,), mx.float16)
    db = TuningDB(str(user_db))
    params = {"threads_per_row": 32, "rows_per_group": 1, "vec": 8}
    db.put(record(o, (x, w, 1e-5), "row", params, default_variant="builtin"))
    dispatch.reset()
    assert dispatch.choose(o, o.problem(x, w, 1e-5)).source == "user"
    y = o(x, w, 1e-5)
    ref.assert_close(y, ref.rms_norm(x, w, 1e-5), mx.float16)


_MANY_INPUTS = ["rms_norm", "layer_norm", "swiglu", "geglu"]


@pytest.mark.parametrize(
    "name,rest_only",
    [(n, False) for n in [*_MANY_INPUTS, "rope"]] + [(n, True) for n in _MANY_INPUTS],
)
def test_kernel_on_views_that_start_off_a_vector_boundary(name, rest_only):
    """A row-contiguous view with an element offset reaches the kernel uncopied: its vector
    loads must fall back to elements (a misaligned 16-byte access faults on CUDA). With
    ``rest_only`` the first input stays aligned: a kernel's test must cover every array."""
    o = get_op(name)
    shapes = ((2, 4, 16, 64),) if name == "rope" else ((64, 40),)
    args, kwargs = o.example(shapes, mx.float16, mx.random.key(11))

    def shifted(a):
        flat = mx.concatenate([mx.zeros((1,), a.dtype), a.reshape(-1)])
        return flat[1:].reshape(a.shape)

    first = next(i for i, a in enumerate(args) if isinstance(a, mx.array))
    args = tuple(
        shifted(a) if isinstance(a, mx.array) and not (rest_only and i == first) else a
        for i, a in enumerate(args)
    )
    want = REFERENCES[name](args, kwargs)
    for v in o.variants:
        if v.is_kernel:
            for cfg in covering(v, o.problem(*args, **kwargs).as_dict(o.dims))[:3]:
                with poisoned():
                    got = v.build(**cfg)(*args, **kwargs)
                ref.assert_close(got, want, mx.float16, label=f"{name}/{v.name} {cfg}")


# Attention-kernel cases by variant: (op, q shape, kv shape, options).
# GQA 1, 4 and 8, head dims 32 to 256 (80 and 192 fill part of a lane group), one key, odd
# lengths, windows 1, 16 and past the start.
DECODE_CASES = [
    ("flash_attention", (2, 8, 1, 128), (2, 2, 1000, 128), {"causal": True}),
    ("flash_attention", (1, 3, 3, 80), (1, 37, 3, 80), {"causal": True, "layout": "BSHD"}),
    ("flash_attention", (2, 8, 5, 64), (2, 2, 1000, 64), {}),
    ("flash_attention", (1, 4, 1, 32), (1, 4, 1, 32), {"causal": True}),
    ("flash_attention", (1, 1, 4, 256), (1, 4097, 1, 256), {"layout": "BSHD"}),
    ("flash_attention", (3, 4, 2, 192), (3, 4, 300, 192), {"causal": True, "scale": 0.3}),
    (
        "sliding_window_attention",
        (1, 1, 8, 128),
        (1, 1000, 2, 128),
        {"layout": "BSHD", "w": 16},
    ),
    ("sliding_window_attention", (2, 4, 4, 64), (2, 4, 37, 64), {"w": 1}),
    ("sliding_window_attention", (1, 8, 2, 96), (1, 1, 100, 96), {"w": 500}),
]
ATTENTION_CASES = {
    "decode": DECODE_CASES,
    # The tensor-core decode: 16-bit only, head dims 32 to 128 in steps of 32, up to 16 query
    # rows per KV head (GQA 8 with 2 queries fills the tile's upper rows).
    "decode_mma": [
        *(DECODE_CASES[i] for i in (0, 3, 6, 7, 8)),
        ("flash_attention", (1, 3, 3, 64), (1, 37, 3, 64), {"causal": True, "layout": "BSHD"}),
        ("flash_attention", (2, 8, 2, 64), (2, 1, 1000, 64), {}),
        ("flash_attention", (1, 1, 4, 96), (1, 4097, 1, 96), {"layout": "BSHD"}),
        ("flash_attention", (3, 4, 2, 128), (3, 4, 300, 128), {"causal": True, "scale": 0.3}),
        # 12 rows (the upper half partly filled), head dim 32 over many keys, and a window
        # that starts past key 0 and spans several splits.
        ("flash_attention", (1, 8, 3, 64), (1, 2, 500, 64), {"causal": True}),
        ("flash_attention", (2, 1, 4, 32), (2, 700, 2, 32), {"layout": "BSHD"}),
        ("sliding_window_attention", (1, 4, 1, 64), (1, 2, 5000, 64), {"w": 3000}),
    ],
    # Query lengths 1, 5, 37, 1000 and partial tiles; fewer queries than keys and more (not
    # causal); GQA 1, 4 and 8; head dims 32 to 256; windows 1, 16, 100 and past the start.
    "flash": [
        ("flash_attention", (1, 8, 1000, 64), (1, 2, 1000, 64), {"causal": True}),
        ("flash_attention", (2, 37, 4, 80), (2, 37, 4, 80), {"layout": "BSHD"}),
        ("flash_attention", (1, 8, 5, 128), (1, 1, 300, 128), {"causal": True}),
        ("flash_attention", (1, 2, 1, 32), (1, 2, 1, 32), {"causal": True}),
        (
            "flash_attention",
            (1, 100, 2, 256),
            (1, 100, 2, 256),
            {"causal": True, "layout": "BSHD", "scale": 0.2},
        ),
        ("flash_attention", (2, 3, 70, 192), (2, 3, 33, 192), {}),
        ("flash_attention", (1, 4, 129, 96), (1, 4, 129, 96), {"causal": True}),
        (
            "sliding_window_attention",
            (1, 1000, 4, 64),
            (1, 1000, 1, 64),
            {"layout": "BSHD", "w": 16},
        ),
        ("sliding_window_attention", (2, 4, 37, 128), (2, 4, 37, 128), {"w": 1}),
        ("sliding_window_attention", (1, 8, 50, 96), (1, 2, 100, 96), {"w": 500}),
        ("sliding_window_attention", (1, 2, 300, 64), (1, 2, 300, 64), {"w": 100}),
    ],
}
# (kernel, case, dtype) no config can serve: 32 float32 keys and values of head dim 192 or 256
# overflow the flash tile's threadgroup memory (test_flash_kernel_declines_what_it_cannot_hold).
UNSERVED = {("flash", 4, mx.float32), ("flash", 5, mx.float32)}
# The dtypes each kernel is written for (tensor cores take 16-bit operands).
ATTENTION_DTYPES = {"decode_mma": (mx.float16, mx.bfloat16)}
ATTENTION_PARAMS = [
    (v, i, dtype)
    for v, cases in ATTENTION_CASES.items()
    for i in range(len(cases))
    for dtype in ATTENTION_DTYPES.get(v, DTYPES)
    if (v, i, dtype) not in UNSERVED
]
ATTENTION_TOLERANCES = {
    mx.float32: (2e-5, 1e-4),
    mx.float16: (4e-3, 1e-2),
    mx.bfloat16: (3e-2, 4e-2),
}


def _attention_call(name, q_shape, kv_shape, options, dtype, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    q, k, v = (
        mx.random.normal(s, key=kk).astype(dtype)
        for s, kk in zip((q_shape, kv_shape, kv_shape), keys)
    )
    options = dict(options)
    if name == "sliding_window_attention":
        window = options.pop("w")
        want = ref.attention(q, k, v, window=window, **options)
        return (q, k, v, window), options, want
    return (q, k, v), options, ref.attention(q, k, v, **options)


@pytest.mark.parametrize("kernel,case,dtype", ATTENTION_PARAMS)
def test_attention_kernel_matches_float64_reference(kernel, case, dtype):
    name, q_shape, kv_shape, options = ATTENTION_CASES[kernel][case]
    o = get_op(name)
    v = o.variant(kernel)
    args, kwargs, want = _attention_call(name, q_shape, kv_shape, options, dtype, seed=case)
    configs = covering(v, o.problem(*args, **kwargs).as_dict(o.dims))
    assert configs, f"{name}: no {kernel} config serves case {case}"
    # The whole parameter cover once; each other case and dtype two configs (each a compile).
    if case or dtype != mx.float16:
        configs = configs[:2]
    atol, rtol = ATTENTION_TOLERANCES[dtype]
    for cfg in configs:
        with poisoned():
            got = v.build(**cfg)(*args, **kwargs)
            mx.eval(got)
        assert got.dtype == dtype
        label = f"{name} {kernel} {case} {cfg}"
        ref.assert_close(got, want, dtype, atol=atol, rtol=rtol, label=label)


@pytest.mark.parametrize("kernel,case,dtype", sorted(UNSERVED, key=str))
def test_flash_kernel_declines_what_it_cannot_hold(kernel, case, dtype):
    name, q_shape, kv_shape, options = ATTENTION_CASES[kernel][case]
    o = get_op(name)
    args, kwargs, _ = _attention_call(name, q_shape, kv_shape, options, dtype)
    problem = o.problem(*args, **kwargs)
    assert not covering(o.variant(kernel), problem.as_dict(o.dims))
    # The dispatcher serves it another way (MLX's float32 attention on CUDA is less exact than
    # the kernels' tolerance, so only the route is checked here).
    assert dispatch.choose(o, problem).variant != kernel


@pytest.mark.parametrize("kernel", ATTENTION_CASES)
def test_attention_kernel_on_views(kernel):
    """Strided and offset views of the cache (MLX copies them to row-contiguous inputs)."""
    o = get_op("flash_attention")
    q = mx.random.normal((2, 4, 3, 64)).astype(mx.float16)
    cache = mx.random.normal((2, 2, 300, 129)).astype(mx.float16)
    k, v = cache[:, :, 7:, 1:65], cache[:, :, 7:, 65:]
    # Contiguous views 3 elements into their buffers: inputs off a 16-byte boundary.
    flat = mx.random.normal((3 + 2 * 2 * 293 * 64,)).astype(mx.float16)
    shifted = flat[3:].reshape(2, 2, 293, 64)
    variant = o.variant(kernel)
    for keys, values in ((k, v), (shifted, v), (k, shifted)):
        want = ref.attention(q, keys, values, causal=True)
        problem = o.problem(q, keys, values, causal=True).as_dict(o.dims)
        for cfg in covering(variant, problem)[:2]:
            with poisoned():
                got = variant.build(**cfg)(q, keys, values, causal=True)
            ref.assert_close(got, want, mx.float16, label=f"{kernel} view {cfg}")


@pytest.mark.parametrize("kernel", ATTENTION_CASES)
def test_attention_kernel_in_inference_mode_runs_bare(kernel):
    name, q_shape, kv_shape, options = ATTENTION_CASES[kernel][0]
    dtype = ATTENTION_DTYPES.get(kernel, (mx.float32,))[0]
    args, kwargs, _ = _attention_call(name, q_shape, kv_shape, options, dtype)
    o = get_op(name)
    variant = o.variant(kernel)
    cfg = covering(variant, o.problem(*args, **kwargs).as_dict(o.dims))[0]
    _runs_bare_in_inference_mode(variant.build(**cfg), args, kwargs, f"{name} {kernel}")


@pytest.mark.parametrize("kernel", ATTENTION_CASES)
@pytest.mark.parametrize("name", ["flash_attention", "sliding_window_attention"])
def test_attention_kernel_gradients_match_reference(name, kernel):
    cases = ATTENTION_CASES[kernel]
    _, q_shape, kv_shape, options = next(c for c in cases if c[0] == name)
    dtype = ATTENTION_DTYPES.get(kernel, (mx.float32,))[0]
    args, kwargs, _ = _attention_call(name, q_shape, kv_shape, options, dtype)
    o = get_op(name)
    variant = o.variant(kernel)
    cfg = covering(variant, o.problem(*args, **kwargs).as_dict(o.dims))[0]
    cot = mx.random.normal(args[0].shape, key=mx.random.key(9))

    def grads(f, arrays):
        def loss(q, k, v):
            return (f(q, k, v, *args[3:], **kwargs) * cot).sum()

        return mx.grad(loss, argnums=(0, 1, 2))(*arrays)

    with mx.stream(mx.cpu):  # float64 runs on the CPU only
        want = grads(o.reference, [a.astype(mx.float64) for a in args[:3]])
        mx.eval(want)
    # The kernels differentiate through MLX matmuls, which on CUDA take float32 at TF32
    # precision (10-bit mantissa): on the H200 the flash gradients were off by up to 2.7e-3.
    atol, rtol = (5e-3, 5e-3) if current_backend() == "cuda" else (1e-4, 1e-3)
    if dtype != mx.float32:  # gradients of 16-bit inputs are recomputed in 16 bits
        atol, rtol = ATTENTION_TOLERANCES[dtype]
    for g, w in zip(grads(variant.build(**cfg), args[:3]), want):
        label = f"{name} {kernel} grad"
        ref.assert_close(g, ref.f64(w), dtype, atol=atol, rtol=rtol, label=label)
