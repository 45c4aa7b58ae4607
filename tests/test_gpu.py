"""Custom kernels on a GPU back-end: every kernel variant, over its parameter space, against
float64 NumPy references on odd shapes and all float dtypes, with poisoned outputs."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_primitives import dispatch
from mlx_primitives.dialect import inference_mode, poisoned
from mlx_primitives.hardware import current_backend
from mlx_primitives.problem import dtype_name
from mlx_primitives.registry import op as get_op

from . import references as ref
from .cases import (
    ATTENTION_CASES,
    ATTENTION_DTYPES,
    ATTENTION_PARAMS,
    ATTENTION_TOLERANCES,
    DTYPES,
    KERNEL_CASES,
    REFERENCES,
    UNSERVED,
    attention_call,
    covering,
)
from .toy import record

pytestmark = pytest.mark.gpu


def _launches():
    for o in map(get_op, KERNEL_CASES):
        for v in o.variants:
            if not v.is_kernel:
                continue
            for i, (shapes, options) in enumerate(KERNEL_CASES[o.name]):
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
    args = o.example(shapes, dtype, mx.random.key(abs(hash(shapes)) % 2**31), **options)
    problem = o.problem(*args).as_dict()
    configs = covering(v, problem)
    if not configs:
        pytest.skip(f"{name}/{variant} serves no {dtype_name(dtype)} call of this case")
    if dtype != mx.float16:
        configs = configs[:2]  # the full cover in float16; each other dtype twice
    want = REFERENCES[name](args)
    tol = o.tolerances.get(dtype_name(dtype))
    extra = {} if tol is None else {"atol": tol[0], "rtol": tol[1]}
    for cfg in configs:
        with poisoned():
            got = v.build(**cfg)(*args)
            mx.eval(got)
        ref.assert_close(got, want, dtype, label=f"{name}/{variant} {cfg}", **extra)


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "swiglu", "geglu"])
def test_kernel_on_non_contiguous_input(name):
    o = get_op(name)
    args = o.example(((64, 40),), mx.float16, mx.random.key(3))
    args = (args[0].T.T[::2], *args[1:])  # a strided view: every other row
    if name in ("swiglu", "geglu"):
        args = (args[0], args[1][::2], *args[2:])
    want = REFERENCES[name](args)
    for v in o.variants:
        if v.is_kernel:
            problem = o.problem(*args).as_dict()
            for cfg in covering(v, problem)[:2]:
                with poisoned():
                    got = v.build(**cfg)(*args)
                ref.assert_close(got, want, mx.float16, label=f"{name}/{v.name} {cfg}")


def _served_cases(o, key: int = 5):
    """For each kernel variant of ``o``: the arguments of the first case past the first (a
    single row) it has a config for, float32 where it serves float32 (else float16), the
    dtype and the config."""
    for v in o.variants:
        if not v.is_kernel:
            continue
        found = None
        for dtype in (mx.float32, mx.float16):
            for shapes, options in KERNEL_CASES[o.name][1:]:
                args = o.example(shapes, dtype, mx.random.key(key), **options)
                configs = covering(v, o.problem(*args).as_dict())
                if configs and found is None:
                    found = (v, args, dtype, configs[0])
        assert found is not None, f"[{o.name}] no case serves kernel {v.name}"
        yield found


@pytest.mark.parametrize(
    "name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu", "quantized_matmul"]
)
def test_kernel_gradients_match_reference(name):
    o = get_op(name)
    for v, args, dtype, cfg in _served_cases(o):
        cot = mx.random.normal(o.reference(*args).shape, key=mx.random.key(6)).astype(dtype)
        pos = [i for i in o.differentiable if args[i] is not None]

        def grads(f, args=args, cot=cot, pos=pos):
            def loss(*diff):
                full = list(args)
                for i, d in zip(pos, diff):
                    full[i] = d
                return (f(*full) * cot).sum()

            return mx.grad(loss, argnums=list(range(len(pos))))(*[args[i] for i in pos])

        tol = {"atol": 1e-4, "rtol": 1e-3} if dtype == mx.float32 else {}
        for g, w in zip(grads(v.build(**cfg)), grads(o.reference)):
            ref.assert_close(g, ref.f64(w), dtype, label=f"{name}/{v.name} grad", **tol)


def _runs_bare_in_inference_mode(fn, args, label):
    """In inference_mode ``fn`` (a kernel variant) gives the same output without its gradient
    wrapper: a gradient or vmap through it is then MLX's error, and works again after."""

    def loss(x):
        return fn(x, *args[1:]).sum()

    wrapped = fn(*args)
    with inference_mode():
        assert mx.array_equal(fn(*args), wrapped).item(), label
        with pytest.raises(ValueError, match="vjp"):
            mx.eval(mx.grad(loss)(args[0]))
        with pytest.raises(ValueError, match="vmap"):
            mx.eval(mx.vmap(loss)(args[0][None]))
    mx.eval(mx.grad(loss)(args[0]))


@pytest.mark.parametrize(
    "name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu", "quantized_matmul"]
)
def test_kernel_in_inference_mode_runs_bare(name):
    o = get_op(name)
    for v, args, _, cfg in _served_cases(o, key=7):
        _runs_bare_in_inference_mode(v.build(**cfg), args, f"{name}/{v.name}")


def test_user_record_dispatches_a_kernel(db):
    """A tuned record naming a kernel variant serves the call (after its probe)."""
    o = get_op("rms_norm")
    x, w = mx.random.normal((8, 256)).astype(mx.float16), mx.ones((256,), mx.float16)
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
    args = o.example(shapes, mx.float16, mx.random.key(11))

    def shifted(a):
        flat = mx.concatenate([mx.zeros((1,), a.dtype), a.reshape(-1)])
        return flat[1:].reshape(a.shape)

    first = next(i for i, a in enumerate(args) if isinstance(a, mx.array))
    args = tuple(
        shifted(a) if isinstance(a, mx.array) and not (rest_only and i == first) else a
        for i, a in enumerate(args)
    )
    want = REFERENCES[name](args)
    for v in o.variants:
        if v.is_kernel:
            for cfg in covering(v, o.problem(*args).as_dict())[:3]:
                with poisoned():
                    got = v.build(**cfg)(*args)
                ref.assert_close(got, want, mx.float16, label=f"{name}/{v.name} {cfg}")


@pytest.mark.parametrize("kernel,case,dtype", ATTENTION_PARAMS)
def test_attention_kernel_matches_float64_reference(kernel, case, dtype):
    name, q_shape, kv_shape, options = ATTENTION_CASES[kernel][case]
    o = get_op(name)
    v = o.variant(kernel)
    args, want = attention_call(name, q_shape, kv_shape, options, dtype, seed=case)
    configs = covering(v, o.problem(*args).as_dict())
    assert configs, f"{name}: no {kernel} config serves case {case}"
    # The whole parameter cover once; each other case and dtype two configs (each a compile).
    if case or dtype != mx.float16:
        configs = configs[:2]
    atol, rtol = ATTENTION_TOLERANCES[dtype]
    for cfg in configs:
        with poisoned():
            got = v.build(**cfg)(*args)
            mx.eval(got)
        assert got.dtype == dtype
        label = f"{name} {kernel} {case} {cfg}"
        ref.assert_close(got, want, dtype, atol=atol, rtol=rtol, label=label)


@pytest.mark.parametrize("kernel,case,dtype", sorted(UNSERVED, key=str))
def test_flash_kernel_declines_what_it_cannot_hold(kernel, case, dtype):
    name, q_shape, kv_shape, options = ATTENTION_CASES[kernel][case]
    o = get_op(name)
    args, _ = attention_call(name, q_shape, kv_shape, options, dtype)
    problem = o.problem(*args)
    assert not covering(o.variant(kernel), problem.as_dict())
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
        problem = o.problem(q, keys, values, causal=True).as_dict()
        for cfg in covering(variant, problem)[:2]:
            with poisoned():
                got = variant.build(**cfg)(q, keys, values, causal=True)
            ref.assert_close(got, want, mx.float16, label=f"{kernel} view {cfg}")


@pytest.mark.parametrize("kernel", ATTENTION_CASES)
def test_attention_kernel_in_inference_mode_runs_bare(kernel):
    name, q_shape, kv_shape, options = ATTENTION_CASES[kernel][0]
    dtype = ATTENTION_DTYPES.get(kernel, (mx.float32,))[0]
    args, _ = attention_call(name, q_shape, kv_shape, options, dtype)
    o = get_op(name)
    variant = o.variant(kernel)
    cfg = covering(variant, o.problem(*args).as_dict())[0]
    _runs_bare_in_inference_mode(variant.build(**cfg), args, f"{name} {kernel}")


@pytest.mark.parametrize("kernel", ATTENTION_CASES)
@pytest.mark.parametrize("name", ["flash_attention", "sliding_window_attention"])
def test_attention_kernel_gradients_match_reference(name, kernel):
    cases = ATTENTION_CASES[kernel]
    _, q_shape, kv_shape, options = next(c for c in cases if c[0] == name)
    dtype = ATTENTION_DTYPES.get(kernel, (mx.float32,))[0]
    args, _ = attention_call(name, q_shape, kv_shape, options, dtype)
    o = get_op(name)
    variant = o.variant(kernel)
    cfg = covering(variant, o.problem(*args).as_dict())[0]
    cot = mx.random.normal(args[0].shape, key=mx.random.key(9))

    def grads(f, arrays):
        def loss(q, k, v):
            return (f(q, k, v, *args[3:]) * cot).sum()

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
