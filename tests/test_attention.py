"""Attention ops: every variant against a float64 NumPy reference on odd shapes, GQA ratios,
both layouts, masks and windows; gradients; O(n) memory; modules; bad input."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives.hardware import detect_chip
from mlx_primitives.ops import _attention as att
from mlx_primitives.registry import op

from . import references as ref

DTYPES = {getattr(mx, name): tol for name, tol in att.TOLERANCES.items()}


def qkv(b, hq, hkv, lq, lk, d, dtype=mx.float32, layout="BHSD", seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    shapes = [(b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)]
    arrays = [mx.random.normal(s, key=k).astype(dtype) for s, k in zip(shapes, keys)]
    return [a.swapaxes(1, 2) for a in arrays] if layout == "BSHD" else arrays


def configs(name):
    o = op(name)
    for v in (v for v in o.variants if v.available()):
        cfgs = v.configs()
        # The blocked compositions with small blocks (many blocks, edges inside blocks) and
        # with their first configuration.
        small = [c for c in cfgs if set(c.values()) <= {64, 128, 256}][:1]
        for cfg in [cfgs[0], *small]:
            yield pytest.param(v.name, cfg, id=f"{v.name}-{'-'.join(map(str, cfg.values()))}")


SHAPES = [  # b, hq, hkv, lq, lk, d
    (1, 2, 2, 1, 1, 32),
    (2, 4, 1, 5, 5, 64),
    (1, 8, 2, 37, 37, 80),
    (1, 8, 1, 1000, 1000, 16),
    (2, 4, 4, 1, 300, 96),
    (1, 4, 4, 37, 1000, 32),
]


@pytest.mark.parametrize("variant,cfg", list(configs("flash_attention")))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_flash_attention_variants(variant, cfg, shape, causal, layout):
    fn = op("flash_attention").variant(variant).build(**cfg)
    q, k, v = qkv(*shape, layout=layout)
    got = fn(q, k, v, causal=causal, layout=layout)
    want = ref.attention(q, k, v, causal=causal, layout=layout)
    ref.assert_close(got, want, mx.float32, atol=2e-5, rtol=1e-4, label=f"{variant} {cfg}")


@pytest.mark.parametrize("variant,cfg", list(configs("flash_attention")))
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_flash_attention_half_precision(variant, cfg, dtype):
    q, k, v = qkv(1, 8, 2, 130, 130, 64, dtype)
    got = op("flash_attention").variant(variant).build(**cfg)(q, k, v, causal=True)
    assert got.dtype == dtype
    atol, rtol = DTYPES[dtype]
    ref.assert_close(got, ref.attention(q, k, v, causal=True), dtype, atol=atol, rtol=rtol)


@pytest.mark.parametrize("variant,cfg", list(configs("flash_attention")))
@pytest.mark.parametrize("kind", ["bool", "additive", "bool-per-head", "key-padding", "per-query"])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_masks(variant, cfg, kind, causal):
    q, k, v = qkv(2, 4, 2, 37, 50, 32)
    key = mx.random.key(9)
    if kind == "bool":
        mask = mx.random.uniform(shape=(37, 50), key=key) > 0.3
    elif kind == "bool-per-head":
        mask = mx.random.uniform(shape=(2, 4, 37, 50), key=key) > 0.3
    elif kind == "key-padding":  # broadcast over heads and queries
        mask = mx.random.uniform(shape=(2, 1, 1, 50), key=key) > 0.3
    elif kind == "per-query":  # broadcast over keys
        mask = mx.random.normal((37, 1), key=key)
    else:
        mask = mx.random.normal((1, 4, 37, 50), key=key)
    got = op("flash_attention").variant(variant).build(**cfg)(q, k, v, causal=causal, mask=mask)
    want = ref.attention(q, k, v, causal=causal, mask=mask)
    ref.assert_close(got, want, mx.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 1, 1, 300), (150, 1)], ids=["key-padding", "per-query"])
def test_blocked_attention_broadcast_masks_over_several_blocks(shape):
    """A mask with size-1 dims is broadcast within each block, not sliced past its end."""
    q, k, v = qkv(2, 4, 2, 150, 300, 32)
    mask = mx.random.uniform(shape=shape, key=mx.random.key(3)) > 0.3
    fn = op("flash_attention").variant("blocked").build(block_q=64, block_k=128)
    want = ref.attention(q, k, v, causal=True, mask=mask)
    ref.assert_close(fn(q, k, v, causal=True, mask=mask), want, mx.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant,cfg", list(configs("sliding_window_attention")))
@pytest.mark.parametrize("window", [1, 16, 5000])
@pytest.mark.parametrize(
    "shape",
    [(1, 4, 1, 37, 37, 32), (1, 8, 2, 1000, 1000, 16), (2, 4, 4, 5, 40, 64)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_sliding_window_variants(variant, cfg, window, shape, layout):
    q, k, v = qkv(*shape, layout=layout)
    fn = op("sliding_window_attention").variant(variant).build(**cfg)
    got = fn(q, k, v, window, layout=layout)
    want = ref.attention(q, k, v, window=window, layout=layout)
    ref.assert_close(got, want, mx.float32, atol=2e-5, rtol=1e-4, label=f"{variant} {cfg}")


@pytest.mark.parametrize("variant,cfg", list(configs("chunked_cross_attention")))
@pytest.mark.parametrize(
    "shape",
    [(1, 4, 4, 1, 1000, 32), (2, 8, 1, 77, 3000, 64), (1, 2, 2, 5, 5, 128)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_chunked_cross_attention_variants(variant, cfg, shape, layout):
    q, k, v = qkv(*shape, layout=layout)
    got = op("chunked_cross_attention").variant(variant).build(**cfg)(q, k, v, layout=layout)
    ref.assert_close(got, ref.attention(q, k, v, layout=layout), mx.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunk_size_argument_runs_the_chunked_composition(chunk):
    q, k, v = qkv(1, 4, 2, 9, 100, 32)
    got = mp.chunked_cross_attention(q, k, v, chunk_size=chunk)
    ref.assert_close(got, ref.attention(q, k, v), mx.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("flash_attention", {"causal": True}),
        ("sliding_window_attention", {}),
        ("chunked_cross_attention", {}),
    ],
)
def test_gradients_of_every_variant(name, extra):
    o = op(name)
    q, k, v = qkv(1, 4, 2, 33, 33, 16, seed=3)
    args = (q, k, v, 8) if name == "sliding_window_attention" else (q, k, v)
    cot = mx.random.normal(q.shape, key=mx.random.key(4))

    def grads(fn):
        def loss(q, k, v):
            return (fn(q, k, v, *args[3:], **extra) * cot).sum()

        return mx.grad(loss, argnums=(0, 1, 2))(q, k, v)

    want = grads(o.reference)
    for variant in (v for v in o.variants if v.available()):
        for cfg in variant.configs()[:2]:
            for g, w in zip(grads(variant.build(**cfg)), want):
                ref.assert_close(
                    g,
                    ref.f64(w),
                    mx.float32,
                    atol=1e-4,
                    rtol=1e-3,
                    label=f"{name}/{variant.name} {cfg}",
                )


def _extra_memory(q_len: int, kv_len: int, block_q: int, block_k: int) -> int:
    """Bytes the blocked composition holds beyond its inputs and output, at its peak."""
    q, k, v = qkv(1, 1, 1, q_len, kv_len, 64)
    mx.eval(q, k, v)
    fn = op("flash_attention").variant("blocked").build(block_q=block_q, block_k=block_k)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = fn(q, k, v)
    mx.eval(out)
    return mx.get_peak_memory() - before - out.nbytes


def test_blocked_attention_memory_does_not_grow_with_the_keys():
    """One block of queries holds a bounded number of key blocks' scores whatever the number
    of keys, never a whole row of them (16 MiB at 16384 keys: what it held while the running
    sum stayed off the dependency chain). The full-size check, 1.5x of q, k, v and the
    output at 16384 positions, is in tests/stress."""
    short, long = _extra_memory(256, 4096, 256, 512), _extra_memory(256, 16384, 256, 512)
    assert long <= 1.25 * short + 2**20, (short, long)
    assert long < 256 * 16384 * 4 / 3, long


@pytest.mark.parametrize("name", ["flash_attention", "sliding_window_attention"])
def test_untuned_long_attention_runs_blocked_on_the_cpu(name):
    """Without a record, a problem of LONG_SCORES or more runs the blocked composition on the CPU
    (MLX's CPU attention would form every score); a short one runs the built-in."""
    o = op(name)
    options = {"causal": True} if name == "flash_attention" else {}
    for heads, seq, expected in ((1, 2048, o.variants[0].name), (2, 8192, "blocked")):
        shapes = att.qkv_shapes(1, heads, heads, seq, seq, 64, "BHSD")
        args = o.example(shapes, mx.float32, mx.random.key(0), **options)
        problem = o.problem(*args)
        variant, params = o.default(problem, "cpu")
        assert variant == expected, (name, seq)
        assert o.variant(variant).allows(problem.as_dict(), params)
    # From LONG_SCORES on, wide blocks are left out: the scheduler would hold several at once.
    blocked, long = o.variant("blocked"), problem.as_dict()
    assert not blocked.allows(long, {"block_q": 512, "block_k": 512})
    assert blocked.allows(long, {"block_q": 512, "block_k": 128})


def test_modules():
    q, k, v = qkv(1, 4, 2, 20, 20, 16, layout="BSHD")
    fa = mp.FlashAttention(4, 16, causal=True, layout="BSHD")
    ref.assert_close(
        fa(q, k, v), ref.attention(q, k, v, causal=True, layout="BSHD"), mx.float32, atol=2e-5
    )
    sw = mp.SlidingWindowAttention(4, 16, 5, layout="BSHD")
    ref.assert_close(
        sw(q, k, v), ref.attention(q, k, v, window=5, layout="BSHD"), mx.float32, atol=2e-5
    )
    ca = mp.ChunkedCrossAttention(4, 16, chunk_size=8, layout="BSHD")
    ref.assert_close(ca(q, k, v), ref.attention(q, k, v, layout="BSHD"), mx.float32, atol=2e-5)
    with pytest.raises(ValueError, match=r"\[FlashAttention\] q has shape"):
        mp.FlashAttention(8, 16)(q, k, v)
    with pytest.raises(ValueError, match=r"\[SlidingWindowAttention\] window_size"):
        mp.SlidingWindowAttention(4, 16, 0)


BAD = [
    (
        lambda q, k, v: mp.flash_attention(q[0], k, v),
        ValueError,
        "[flash_attention] q must have at least 4 dims",
    ),
    (
        lambda q, k, v: mp.flash_attention(q[None], k, v),
        ValueError,
        "[flash_attention] q must be 4-D",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k.astype(mx.float16), v),
        TypeError,
        "[flash_attention] q, k and v must share a dtype",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v[:, :, :3]),
        ValueError,
        "[flash_attention] v has shape",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k[..., :8], v[..., :8]),
        ValueError,
        "[flash_attention] k has head_dim 8",
    ),
    (
        lambda q, k, v: mp.flash_attention(q[:, :3], k, v),
        ValueError,
        "[flash_attention] q has 3 heads, not a multiple of k's 2",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, layout="SBHD"),
        ValueError,
        "[flash_attention] layout must be one of",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, causal=1),
        TypeError,
        "[flash_attention] causal must be a bool",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, scale=-1.0),
        ValueError,
        "[flash_attention] scale",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, sinks=mx.ones((3,))),
        ValueError,
        "[flash_attention] sinks has shape (3,), expected (4,)",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, mask=mx.ones((1, 1, 1, 9, 9), mx.bool_)),
        ValueError,
        "[flash_attention] mask must have at most 4 dims",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, mask=mx.ones((5, 5))),
        ValueError,
        "[flash_attention] mask of shape (5, 5) does not broadcast",
    ),
    (
        lambda q, k, v: mp.flash_attention(q, k, v, mask=mx.ones((9, 9), mx.float64)),
        ValueError,
        "[flash_attention] mask has dtype mlx.core.float64, which does not promote to float32",
    ),
    (
        lambda q, k, v: mp.sliding_window_attention(q, k, v, 0),
        ValueError,
        "[sliding_window_attention] window_size must be at least 1",
    ),
    (
        lambda q, k, v: mp.sliding_window_attention(q, k, v, 2.0),
        TypeError,
        "[sliding_window_attention] window_size must be an integer",
    ),
    (
        lambda q, k, v: mp.chunked_cross_attention(q, k, v, chunk_size=0),
        ValueError,
        "[chunked_cross_attention] chunk_size must be at least 1",
    ),
    (
        lambda q, k, v: mp.chunked_cross_attention(q, None, v),
        TypeError,
        "[chunked_cross_attention] k must be an mlx.core.array",
    ),
]


@pytest.mark.parametrize("call,exc,message", BAD, ids=[b[2][:50] for b in BAD])
def test_bad_input(call, exc, message):
    q, k, v = qkv(1, 4, 2, 9, 9, 16)
    with pytest.raises(exc) as info:
        call(q, k, v)
    assert message in str(info.value)


def test_explain_attention():
    q, k, v = qkv(1, 32, 8, 1, 8192, 128, mx.float16)
    d = mp.explain("flash_attention", q, k, v, causal=True)
    assert d.problem == (
        "flash_attention|float16|batch=1,q_heads=32,group=4,q_len=1,"
        "kv_len=8192,head_dim=128,layout=BHSD,causal=true,mask=none"
    )
    assert d.source == "default" and d.variant == "builtin"


SLICED = [
    ("flash_attention", ((1, 4, 100, 32), (1, 2, 130, 32)), {"causal": True}),
    ("flash_attention", ((1, 100, 4, 32), (1, 70, 2, 32)), {"layout": "BSHD"}),
    ("flash_attention", ((1, 4, 100, 32), (1, 2, 130, 32)), {"causal": True, "mask": "bool"}),
    ("flash_attention", ((1, 4, 100, 32), (1, 2, 130, 32)), {"mask": "additive"}),
    ("sliding_window_attention", ((1, 4, 100, 32), (1, 2, 130, 32)), {"window": 7}),
    (
        "sliding_window_attention",
        ((1, 99, 4, 32), (1, 99, 2, 32)),
        {"window": 500, "layout": "BSHD"},
    ),
    ("chunked_cross_attention", ((1, 4, 100, 32), (1, 2, 130, 32)), {}),
]


@pytest.mark.parametrize("name,shapes,options", SLICED)
def test_large_calls_are_checked_on_slices_of_query_rows(name, shapes, options, monkeypatch):
    from mlx_primitives.check import TOLERANCES, check_outputs, expected
    from mlx_primitives.ops import _attention

    monkeypatch.setattr(_attention, "CHECK_SCORES", 0)  # every call counts as large
    o = op(name)
    args = o.example(shapes, mx.float32, mx.random.key(1), **options)
    want = expected(o, args)
    assert len(want) == 3 and all(select is not None for select, _ in want)
    whole = o.reference(*args)
    # Each slice's own reference is that slice of the whole call's.
    for select, part in want:
        ref.assert_close(select([whole])[0], ref.f64(part[0]), mx.float32, label=name)
    tolerance = TOLERANCES["float32"]
    assert check_outputs([whole], want, tolerance).ok
    axis = 1 if options.get("layout") == "BSHD" else 2
    for row, value, reason in ((50, 5.0, "mismatch"), (30, float("nan"), "NaN")):
        bad = mx.array(whole)
        index = [slice(None)] * 4
        index[axis] = row  # 50: in the middle slice; 30: in no slice
        bad[tuple(index)] = value
        verdict = check_outputs([bad], want, tolerance)
        assert not verdict.ok and reason in verdict.reason


def test_flash_kernel_supports_what_its_tile_holds(monkeypatch):
    from mlx_primitives.ops import _attention_kernels as k

    base = {"dtype": "float16", "head_dim": 128, "q_len": 4096, "kv_len": 4096, "mask": "none"}
    small = {"warps": 2, "rows": 2, "keys": 1}
    big = {"warps": 8, "rows": 8, "keys": 2}
    monkeypatch.setattr(k, "current_backend", lambda: "cuda")
    configs = op("flash_attention").variant("flash").configs()
    assert k.flash_supports(base, small)
    assert not k.flash_supports(base, big)  # 64 x 64 tiles: over CUDA's 48 KB
    assert k.flash_shared_bytes(128, 2, 2, 2, 1) <= k.SHARED["metal"]
    for change in ({"mask": "bool"}, {"head_dim": 130}, {"head_dim": 512}, {"dtype": "float64"}):
        assert not k.flash_supports({**base, **change}, small), change
    # float32 keys and values of head dim 256 never fit; 128 does.
    assert not any(
        k.flash_supports({**base, "dtype": "float32", "head_dim": 256}, c) for c in configs
    )
    # A one-query problem gets only the smallest query tiles.
    one = {**base, "q_len": 1}
    assert {c["warps"] * c["rows"] for c in configs if k.flash_supports(one, c)} == {4}


def test_tensor_core_decode_supports_what_its_tiles_hold(monkeypatch):
    from mlx_primitives.ops import _attention_kernels as k

    base = {
        "dtype": "bfloat16",
        "head_dim": 128,
        "group": 4,
        "q_len": 1,
        "kv_len": 8192,
        "mask": "none",
    }
    variant = op("flash_attention").variant("decode_mma")
    assert variant.backends == {"cuda"}  # tensor-core intrinsics: no Metal rendering
    config = {"split": 2048, "warps": 4}
    assert k.mma_supports(base, config)
    assert k.mma_supports({**base, "group": 8, "q_len": 2}, config)  # 16 rows: the whole tile
    for change in (
        {"dtype": "float32"},  # tensor cores here take 16-bit operands
        {"head_dim": 80},  # not whole 32-dim spans
        {"head_dim": 256},  # accumulators and operands past the register budget
        {"group": 8, "q_len": 3},  # 24 rows: more than one tile
        {"mask": "bool"},
    ):
        assert not k.mma_supports({**base, **change}, config), change
    # Every warp gets keys; a split past the visible keys repeats the one-split plan.
    assert not k.mma_supports(base, {"split": 256, "warps": 32})
    assert not k.mma_supports({**base, "kv_len": 300}, {"split": 4096, "warps": 4})
    assert not k.mma_supports({**base, "window": 100}, {"split": 1024, "warps": 4})
    # m16n8k16 in bfloat16 and movmatrix need sm_80: a Turing GPU is declined up front.
    turing = dataclasses.replace(detect_chip(), arch="sm_75")
    monkeypatch.setattr(k, "detect_chip", lambda: turing)
    assert not k.mma_supports(base, config)
    monkeypatch.setattr(k, "detect_chip", lambda: dataclasses.replace(turing, arch="sm_90"))
    assert k.mma_supports(base, config)


@pytest.mark.parametrize("window", [0, 7])
def test_flash_kernel_gradients_go_through_the_blocked_composition(window):
    """The flash kernel differentiates through ``_blocked_reference`` (run on the GPU by
    tests/test_gpu.py); here that function's gradients against the dense reference's."""
    from mlx_primitives.ops import _attention, _attention_kernels

    q, k, v = (
        mx.random.normal(s, key=mx.random.key(i))
        for i, s in enumerate(((1, 300, 4, 32), (1, 300, 2, 32), (1, 300, 2, 32)))
    )
    cot = mx.random.normal(q.shape, key=mx.random.key(5))

    def grads(f):
        return mx.grad(lambda *a: (f(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)

    mine = grads(
        lambda q, k, v: _attention_kernels._blocked_reference(q, k, v, True, 0.3, "BSHD", window)
    )
    want = grads(
        lambda q, k, v: _attention.reference(
            q, k, v, scale=0.3, causal=True, window=window or None, layout="BSHD"
        )
    )
    for g, w in zip(mine, want):
        ref.assert_close(g, ref.f64(w), mx.float32, atol=1e-5, rtol=1e-4, label="flash vjp")


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_a_decode_kernel_launch_follows_the_growing_kv_cache(monkeypatch, layout):
    """The split-KV decode kernels keep their templates per query shape; the splits (grid and
    partial outputs) follow each call's KV length, as a decoding step's cache grows."""
    from mlx_primitives.dialect.kernel import GpuKernel

    launches = []

    def launch(self, inputs, plan):
        launches.append((self.name, dict(plan["template"]), plan["grid"], plan["output_shapes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(GpuKernel, "launch", launch)
    o = op("flash_attention")
    fn = o.variant("decode_mma").build(split=256, warps=4)
    for b, lk in ((2, 100), (2, 3000), (1, 257)):  # and a new batch: a new query shape
        q, k, v, *rest = o.example(
            att.qkv_shapes(b, 8, 2, 1, lk, 64, layout), mx.float16, mx.random.key(lk),
            causal=True, layout=layout,
        )  # fmt: skip
        assert fn(q, k, v, *rest).shape == q.shape
        (_, main, grid, parts), (_, combine, _, out) = launches[-2:]
        splits = -(-lk // 256)
        assert parts == [(b * 2, splits, 4, 64), (b * 2, splits, 4, 2)]
        assert grid == (b * 2 * splits * 128, 1, 1) and out == [q.shape]
        assert main["G"] == combine["G"] == 4 and main["LQ"] == 1 and main["WARPS"] == 4


def test_a_flash_kernel_launch_follows_each_call(monkeypatch):
    """The flash kernel keeps its launch settings per query shape and flags: another query
    length or mask kind gets its own grid and template."""
    from mlx_primitives.dialect.kernel import GpuKernel

    launches = []

    def launch(self, inputs, plan):
        launches.append((dict(plan["template"]), plan["grid"], plan["output_shapes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    monkeypatch.setattr(GpuKernel, "launch", launch)
    o = op("flash_attention")
    fn = o.variant("flash").build(warps=2, rows=2, keys=1)
    for lq, lk, causal in ((5, 5, True), (64, 64, True), (64, 64, False), (5, 9, True)):
        q, k, v, _, *rest = o.example(
            att.qkv_shapes(1, 4, 2, lq, lk, 64, "BHSD"), mx.float32, mx.random.key(lq),
            causal=causal,
        )  # fmt: skip
        assert fn(q, k, v, causal, *rest).shape == q.shape
        template, grid, shapes = launches[-1]
        assert grid == (4 * -(-lq // 4) * 64, 1, 1) and shapes == [q.shape]
        assert template["CAUSAL"] is causal
