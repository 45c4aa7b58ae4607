"""Every variant of every op against float64 NumPy references, on odd shapes and dtypes;
gradients of every variant against the op's reference; the modules as drop-ins."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_primitives as mp
from mlx_primitives.hardware import current_backend
from mlx_primitives.registry import op as get_op

from . import references as ref
from .cases import CPU_CASES as CASES
from .cases import DTYPES, MLX_RAISES, MLX_TOLERANCES, REFERENCES


def _variants(name):
    o = get_op(name)
    return [(v, cfg) for v in o.variants if v.available() for cfg in v.configs()]


def _supported(name, v, cfg, cases) -> list[int]:
    """The cases that variant ``v`` with ``cfg`` supports (selective_scan's chunked product
    needs one decay per head)."""
    o = get_op(name)
    problems = [o.problem(*o.example(s, mx.float32, mx.random.key(0), **opt)).as_dict()
                for s, opt in cases]  # fmt: skip
    return [i for i, p in enumerate(problems) if v.allows(p, cfg)]


def _params():
    for name, cases in CASES.items():
        for v, cfg in _variants(name):
            for i in _supported(name, v, cfg, cases):
                shapes, options = cases[i]
                yield pytest.param(name, v.name, cfg, shapes, options, id=f"{name}-{v.name}-{i}")


def _tolerance(name, dtype, variant=None):
    """An op's own tolerances where it declares them, with its reason (rope: float32 angles),
    or MLX's where its own op is less exact (MLX_TOLERANCES)."""
    from mlx_primitives.problem import dtype_name

    declared = MLX_TOLERANCES.get((name, variant, current_backend(), dtype))
    declared = declared or get_op(name).tolerances.get(dtype_name(dtype))
    return {} if declared is None else {"atol": declared[0], "rtol": declared[1]}


@pytest.mark.parametrize("name,variant,cfg,shapes,options", list(_params()))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_variant_matches_float64_reference(name, variant, cfg, shapes, options, dtype):
    o = get_op(name)
    fn = o.variant(variant).build(**cfg)
    args = o.example(shapes, dtype, mx.random.key(hash((name, shapes)) % 2**31), **options)
    if (name, variant, current_backend(), dtype) in MLX_RAISES:
        with pytest.raises(RuntimeError, match="only supports float32"):
            mx.eval(fn(*args))
        return
    got, want = _outputs(fn(*args)), _outputs(REFERENCES[name](args))
    # Promoted like MLX's own ops.
    assert [g.dtype for g in got] == [r.dtype for r in _outputs(o.reference(*args))]
    tol = _tolerance(name, dtype, variant)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        ref.assert_close(g, w, dtype, label=f"{name}/{variant} output {i}", **tol)


def _outputs(out) -> list:
    """An op's outputs as a list (gated_delta returns the outputs and the state)."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.parametrize("name", list(CASES))
def test_public_function_matches_reference(name):
    o = get_op(name)
    shapes, options = CASES[name][2]
    args = o.example(shapes, mx.float32, mx.random.key(1), **options)
    # By name, but the positional-only arguments (gather_qmm's x and w, as MLX's).
    params = list(o.signature.parameters.values())
    first = sum(p.kind == p.POSITIONAL_ONLY for p in params)
    got = getattr(mp, name)(*args[:first], **dict(zip(o.params[first:], args[first:])))
    for g, w in zip(_outputs(got), _outputs(REFERENCES[name](args)), strict=True):
        ref.assert_close(g, w, mx.float32, **_tolerance(name, mx.float32))


def _grad_params():
    # The second case (past a single position), or the first the variant supports.
    for name, cases in CASES.items():
        for v, cfg in _variants(name):
            supported = _supported(name, v, cfg, cases) or [1]  # a GPU kernel: none
            i = 1 if 1 in supported else supported[0]
            yield pytest.param(name, v.name, cfg, cases[i], id=f"{name}-{v.name}")


@pytest.mark.parametrize("name,variant,cfg,case", list(_grad_params()))
def test_variant_gradients_match_reference(name, variant, cfg, case):
    """mx.grad flows through every variant the dispatcher may pick."""
    o = get_op(name)
    fn = o.variant(variant).build(**cfg)
    shapes, options = case
    args = o.example(shapes, mx.float32, mx.random.key(7), **options)
    keys = mx.random.split(mx.random.key(8), 4)
    cots = [mx.random.normal(r.shape, key=kk) for r, kk in zip(_outputs(o.reference(*args)), keys)]
    positions = [i for i in o.differentiable if args[i] is not None]

    def loss(f):
        def inner(*diff):
            full = list(args)
            for i, d in zip(positions, diff):
                full[i] = d
            return sum((out * c).sum() for out, c in zip(_outputs(f(*full)), cots, strict=True))

        return mx.grad(inner, argnums=list(range(len(positions))))

    got = loss(fn)(*[args[i] for i in positions])
    want = loss(o.reference)(*[args[i] for i in positions])
    for g, w in zip(got, want):
        ref.assert_close(
            g, ref.f64(w), mx.float32, atol=1e-4, rtol=1e-3, label=f"{name}/{variant} grad"
        )


def test_rope_per_batch_offsets():
    x = mx.random.normal((3, 2, 5, 8))
    offset = mx.array([0, 4, 9])
    got = mp.rope(x, 8, offset=offset)
    ref.assert_close(got, ref.rope(x, 8, offset=np.array([0, 4, 9])), mx.float32, atol=1e-5)


def test_rope_kernels_get_their_offset_as_the_kernel_reads_it(monkeypatch):
    """What rope's kernels are handed, launch skipped: ``PER_BATCH`` only for a per-batch
    array; cached angles with one table row unless per batch; an int offset as 16 bytes made
    once per value (MLX's CUDA back-end keeps 8 bytes or less in host memory)."""
    rope = importlib.import_module("mlx_primitives.ops._rope_kernels")
    seen = []

    def launch(kernel, x4, off, table, template, threads, total):
        seen.append((off, table, template))
        return x4

    monkeypatch.setattr(rope, "_run", launch)
    v = get_op("rope").variant("rotate")
    config = {"vec": 2, "heads_per_thread": 1, "threads": 128, "fast_math": False}
    computed = v.build(angles="computed", **config)
    cached = v.build(angles="cached", **config)
    x = mx.zeros((3, 2, 5, 8))
    for offset, per_batch in (
        (7, False),
        (np.int64(7), False),
        (mx.array(7), False),
        (mx.array([7]), False),
        (mx.array([1, 2, 3]), True),
    ):
        computed(x, 8, offset=offset)
        cached(x, 8, offset=offset)
        (off, _, template), (_, table, cached_template) = seen[-2:]
        assert template["PER_BATCH"] is cached_template["PER_BATCH"] is per_batch
        assert table.shape == (2, 3 if per_batch else 1, 5, 4)
        assert off[0].item() == (1 if per_batch else 7)
    # The computed-angles launches of 7 and np.int64(7): one array.
    assert seen[0][0].nbytes > 8 and seen[2][0] is seen[0][0]


def test_rope_kernel_vmaps_with_freqs_and_an_array_offset(monkeypatch):
    """vmap runs through the reference, arrays after non-arrays keeping their own axes (the
    launch is skipped: it needs a GPU)."""
    rope = importlib.import_module("mlx_primitives.ops._rope_kernels")
    monkeypatch.setattr(rope, "_run", lambda kernel, x4, *rest: x4)
    o = get_op("rope")
    config = {"vec": 2, "heads_per_thread": 1, "threads": 128, "fast_math": False}
    fn = o.variant("rotate").build(angles="table", **config)
    x = mx.random.normal((4, 2, 3, 5, 8))
    # freqs mapped too (one set per entry), after the non-array arguments.
    freqs, offset = mx.exp(mx.random.uniform(0.0, 3.0, (4, 4))), mx.array(3)
    got = mx.vmap(lambda x, f: fn(x, 8, base=None, freqs=f, offset=offset))(x, freqs)
    want = mx.stack(
        [o.reference(a, 8, base=None, freqs=f, offset=offset) for a, f in zip(x, freqs)]
    )
    assert mx.allclose(got, want, atol=1e-5).item()


def test_rope_layouts_agree():
    x = mx.random.normal((2, 6, 3, 16))  # BSHD
    a = mp.rope(x, 16, layout="BSHD", offset=2)
    b = mp.rope(x.swapaxes(1, 2), 16, offset=2).swapaxes(1, 2)
    assert mx.allclose(a, b, atol=1e-6)


def test_rope_kernel_configs_fit_a_group_of_registers():
    """A 512-thread group of threads each holding 8 heads of 16-byte halves failed to launch
    on an H200 ("too many resources requested"); supports() keeps such configs out."""
    rotate = get_op("rope").variant("rotate")
    problem = {"dtype": "float16", "head_dim": 128, "dims": 128, "heads": 32}
    problem.update(traditional=False, freqs=False)
    allowed = [c for c in rotate.configs() if rotate.allows(problem, c)]
    computed = {"angles": "computed", "fast_math": True}
    assert {"vec": 8, "heads_per_thread": 8, "threads": 512, **computed} not in allowed
    assert {"vec": 8, "heads_per_thread": 8, "threads": 256, **computed} in allowed
    assert {"vec": 8, "heads_per_thread": 4, "threads": 512, **computed} in allowed
    # fast_math changes how computed angles are made, so cached ones never take it.
    assert not [c for c in allowed if c["fast_math"] and c["angles"] == "cached"]


def test_rope_tiled_configs_fit_threadgroup_memory():
    """A tile's cos and sin (padded rows) must fit Metal's 32 KB and, declared twice in the
    CUDA body (both alignments), CUDA's 48 KB; tiles longer than the sequence only idle."""
    tiled = get_op("rope").variant("tiled")
    problem = {"dtype": "float16", "head_dim": 256, "dims": 256, "heads": 8, "seq": 4096}
    problem.update(traditional=False, freqs=False)
    cfg = {"vec": 8, "unroll": 2, "threads": 256, "angles": "computed", "fast_math": True}
    # 32 positions x (128 angles + 16 pad) x cos and sin x 4 bytes = 36 KB, twice on CUDA.
    assert not tiled.allows(problem, {**cfg, "positions": 32})
    assert tiled.allows(problem, {**cfg, "positions": 16})
    assert not tiled.allows({**problem, "seq": 8}, {**cfg, "positions": 16})
    assert tiled.allows({**problem, "seq": 1}, {**cfg, "positions": 1})
    # freqs need the table.
    assert not tiled.allows({**problem, "freqs": True}, {**cfg, "positions": 16})
    assert tiled.allows({**problem, "freqs": True}, {**cfg, "positions": 16, "angles": "table"})


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm"])
def test_norm_variants_give_mlxs_output_dtype(name):
    """Every variant of a norm gives the dtype MLX's gives, for every mix of x's, the weight's
    and the bias's dtypes (without a weight, MLX keeps x's dtype whatever the bias's)."""
    o = get_op(name)
    mlx = getattr(mx.fast, name)
    x = mx.random.normal((3, 8)).astype(mx.float16)
    kinds = (None, mx.float16, mx.float32, mx.bfloat16)
    vectors = (
        [(w,) for w in kinds] if name == "rms_norm" else [(w, b) for w in kinds for b in kinds]
    )
    for dtypes in vectors:
        args = (x, *(None if d is None else mx.ones((8,), d) for d in dtypes), 1e-5)
        want = mlx(*args).dtype
        assert o.reference(*args).dtype == want, dtypes
        for v, cfg in _variants(name):
            assert v.build(**cfg)(*args).dtype == want, (v.name, dtypes)


def test_gated_activations_broadcast_and_promote_as_mlx_multiplies():
    """A gate and an up of other shapes that broadcast, or of other dtypes, are computed as
    MLX's arithmetic computes them (mlx-lm's swiglu takes them)."""
    gate = mx.random.normal((3, 1, 8)).astype(mx.bfloat16)
    for up in (mx.random.normal((4, 8)), mx.random.normal((3, 1, 8)).astype(mx.float16)):
        want = nn.silu(gate) * up
        got = mp.swiglu(gate, up)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6)
        want = nn.gelu_approx(gate) * up
        np.testing.assert_allclose(np.array(mp.geglu(gate, up, "tanh")), np.array(want), rtol=1e-2)


def test_a_candidate_of_another_output_dtype_fails_its_check():
    """The tuner's check compares a candidate's output dtype with the reference's, whatever
    its values."""
    from mlx_primitives.check import run_checked

    o = get_op("layer_norm")
    args = (mx.random.normal((4, 64)).astype(mx.float16), None, mx.zeros((64,)), 1e-5)
    assert run_checked(o, o.reference, args, "float16").ok
    verdict = run_checked(o, lambda *a: o.reference(*a).astype(mx.float32), args, "float16")
    assert not verdict.ok and "dtype mlx.core.float32, expected mlx.core.float16" in verdict.reason


@pytest.mark.parametrize("dims", [7, 64])
def test_rms_norm_module_is_a_drop_in(dims):
    ours, theirs = mp.RMSNorm(dims, eps=1e-6), nn.RMSNorm(dims, eps=1e-6)
    theirs.update({"weight": mx.random.normal((dims,))})
    ours.load_weights(list(theirs.parameters().items()))
    x = mx.random.normal((3, dims))
    assert set(ours.parameters()) == set(theirs.parameters())
    assert mx.allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_module_is_a_drop_in(affine, bias):
    ours, theirs = (
        mp.LayerNorm(9, affine=affine, bias=bias),
        nn.LayerNorm(9, affine=affine, bias=bias),
    )
    theirs.update({k: mx.random.normal(v.shape) for k, v in theirs.parameters().items()})
    ours.load_weights(list(theirs.parameters().items()), strict=True)
    x = mx.random.normal((4, 9))
    assert set(ours.parameters()) == set(theirs.parameters())
    assert mx.allclose(ours(x), theirs(x), atol=1e-5)


def test_rope_module_is_a_drop_in():
    ours, theirs = mp.RoPE(8, traditional=True, base=500, scale=0.5), nn.RoPE(8, True, 500, 0.5)
    x = mx.random.normal((2, 3, 11, 12))
    assert mx.allclose(ours(x, offset=5), theirs(x, offset=5), atol=1e-5)


@pytest.mark.parametrize("cls,act", [(mp.SwiGLU, nn.silu), (mp.GeGLU, nn.gelu)])
def test_gated_feed_forward(cls, act):
    block = cls(12, 20)
    x = mx.random.normal((2, 5, 12))
    want = block.down_proj(act(block.gate_proj(x)) * block.up_proj(x))
    assert mx.allclose(block(x), want, atol=1e-5)
    grads = nn.value_and_grad(block, lambda m, x: m(x).sum())(block, x)[1]
    assert set(grads) == {"gate_proj", "up_proj", "down_proj"}


def test_every_op_has_several_variants_on_this_backend():
    backend = current_backend()
    for o in mp.registry.ops():
        assert len([v for v in o.variants if v.available(backend)]) >= 2, o.name


@pytest.mark.parametrize("kernel", ["row", "looped"])
def test_a_norm_kernel_launch_follows_each_call(untraced, monkeypatch, kernel):
    """The norm kernels keep their launch settings per shape, dtypes, eps and vectors given:
    each of these calls gets its own template and grid."""
    from mlx_primitives.dialect.kernel import GpuKernel, float_bits
    from mlx_primitives.registry import op

    launches = []

    def launch(self, inputs, plan):
        launches.append((inputs, dict(plan["template"]), plan["output_shapes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(GpuKernel, "launch", launch)
    config = {"threads_per_row": 128, "vec": 1} | ({"rows_per_group": 1} if kernel == "row" else {})
    fn = op("layer_norm").variant(kernel).build(**config)
    w, b = mx.ones((64,)), mx.zeros((64,), mx.float16)
    for shape, weight, bias, eps in (
        ((2, 3, 64), w, b, 1e-5),
        ((2, 3, 64), w, b, 1e-3),
        ((2, 3, 64), None, b, 1e-5),
        ((2, 3, 64), w, None, 1e-6),
        ((7, 64), w, b, 1e-5),
    ):
        x = mx.ones(shape)
        assert fn(x, weight, bias, eps).shape == shape
        inputs, template, shapes = launches[-1]
        assert shapes == [(shape[0] * (shape[1] if len(shape) == 3 else 1), 64)]
        assert template["HAS_W"] is (weight is not None) and template["HAS_B"] is (bias is not None)
        assert template["EPS_BITS"] == float_bits(eps)
        assert template["B_"] == (mx.float16 if bias is not None else mx.float32)


@pytest.mark.parametrize("kernel", ["blocked", "strided"])
def test_a_gated_kernel_launch_follows_each_call(untraced, monkeypatch, kernel):
    """The gated kernels keep their launch settings per size, dtype and activation."""
    from mlx_primitives.dialect.kernel import GpuKernel
    from mlx_primitives.registry import op

    launches = []

    def launch(self, inputs, plan):
        launches.append((dict(plan["template"]), plan["output_shapes"], plan["output_dtypes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(GpuKernel, "launch", launch)
    space = {"unroll": 1} if kernel == "blocked" else {"waves": 1}
    fn = op("geglu").variant(kernel).build(vec=2, threads=256, fast_math=False, **space)
    acts = set()
    for shape, dtype, approximate in (
        ((3, 64), mx.float32, "none"),
        ((3, 64), mx.float32, "tanh"),
        ((5, 64), mx.float32, "none"),
        ((3, 64), mx.float16, "none"),
    ):
        gate = mx.ones(shape, dtype)
        assert fn(gate, gate, approximate).shape == shape
        template, shapes, dtypes = launches[-1]
        assert shapes == [(gate.size,)] and dtypes == [dtype] and template["T"] == dtype
        acts.add(template["ACT"])
    assert len(acts) == 2
