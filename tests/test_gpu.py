"""Custom kernels on a GPU back-end: every kernel variant, over its parameter space, against
float64 NumPy references on odd shapes and all float dtypes, with poisoned outputs."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_primitives import dispatch
from mlx_primitives.dsl import poisoned
from mlx_primitives.problem import dtype_name
from mlx_primitives.registry import op as get_op
from mlx_primitives.registry import ops
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
    for o in ops():
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


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu"])
def test_kernel_gradients_match_reference(name):
    o = get_op(name)
    shapes, options = CASES[name][1]
    args, kwargs = o.example(shapes, mx.float32, mx.random.key(5), **options)
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


def test_user_record_dispatches_a_kernel(user_db):
    """A tuned record naming a kernel variant serves the call (after its probe)."""
    o = get_op("rms_norm")
    x, w = mx.random.normal((8, 256)).astype(mx.float16), mx.ones((256,), mx.float16)
    db = TuningDB(str(user_db))
    db.put(record(o, (x, w, 1e-5), "row", {"threads_per_row": 32, "rows_per_group": 1, "vec": 8}))
    dispatch.reset()
    assert dispatch.choose(o, o.problem(x, w, 1e-5)).source == "user"
    y = o(x, w, 1e-5)
    ref.assert_close(y, ref.rms_norm(x, w, 1e-5), mx.float16)


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "swiglu", "geglu"])
def test_kernel_on_views_that_start_off_a_vector_boundary(name):
    """A row-contiguous view with an element offset reaches the kernel uncopied: its vector
    loads must fall back to elements (a misaligned 16-byte access faults on CUDA)."""
    o = get_op(name)
    args, kwargs = o.example(((64, 40),), mx.float16, mx.random.key(11))

    def shifted(a):
        flat = mx.concatenate([mx.zeros((1,), a.dtype), a.reshape(-1)])
        return flat[1:].reshape(a.shape)

    args = tuple(shifted(a) if isinstance(a, mx.array) else a for a in args)
    want = REFERENCES[name](args, kwargs)
    for v in o.variants:
        if v.is_kernel:
            for cfg in covering(v, o.problem(*args, **kwargs).as_dict(o.dims))[:3]:
                with poisoned():
                    got = v.build(**cfg)(*args, **kwargs)
                ref.assert_close(got, want, mx.float16, label=f"{name}/{v.name} {cfg}")
