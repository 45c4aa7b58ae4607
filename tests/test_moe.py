"""Mixture of experts: the gather ops' contract with MLX's, the drop-ins for mlx-lm's layers
(mlx-lm itself, the optional ``lm`` extra), the block under ``mx.compile`` without host syncs,
gradients against float64, and the routing helpers against NumPy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_primitives as mp
from mlx_primitives.nn import switch

from . import references as ref

switch_layers = pytest.importorskip("mlx_lm.models.switch_layers")


def _routes(tokens: int, experts: int, top_k: int, seed: int = 0) -> mx.array:
    scores = mx.random.uniform(shape=(tokens, experts), key=mx.random.key(seed))
    return mx.argsort(scores, axis=-1)[:, :top_k]


def _is_switch(path, module) -> bool:
    return hasattr(module, "to_quantized") and type(module).__name__.startswith("Switch")


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
@pytest.mark.parametrize("kind", ["SwitchGLU", "SwitchMLP"])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40 x 2 pairs: past SORT_PAIRS, sorted once
def test_switch_layers_are_drop_ins_for_mlx_lms(kind, quantized, tokens):
    mx.random.seed(1)
    theirs = getattr(switch_layers, kind)(128, 192, 8)
    ours = getattr(mp, kind)(128, 192, 8)
    assert {k: v.shape for k, v in tree_flatten(ours.parameters())} == {
        k: v.shape for k, v in tree_flatten(theirs.parameters())
    }
    ours.load_weights(list(tree_flatten(theirs.parameters())), strict=True)
    if quantized:
        for model in (theirs, ours):
            nn.quantize(model, 64, 4, class_predicate=_is_switch)
        assert isinstance(ours.fc1 if kind == "SwitchMLP" else ours.up_proj,
                          mp.QuantizedSwitchLinear)  # fmt: skip
        assert {k for k, _ in tree_flatten(ours.parameters())} == {
            k for k, _ in tree_flatten(theirs.parameters())
        }
    x = mx.random.normal((tokens, 128), key=mx.random.key(2))
    indices = _routes(tokens, 8, 2)
    want = theirs(x, indices)
    got = ours(x, indices)
    assert got.shape == want.shape == (tokens, 2, 128)
    ref.assert_close(got, ref.f64(want), mx.float32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_a_decoding_switch_glu_is_one_compiled_call(monkeypatch, quantized, bias):
    """Below SORT_PAIRS pairs a SwitchGLU of three float or three quantized layers runs as one
    compiled call of its arrays, traced once per input shape: the numbers (and gradients) of
    its layers called one by one; more pairs, or calls being recorded, go layer by layer."""
    from mlx_primitives.nn import _fused

    mx.random.seed(4)
    block = mp.SwitchGLU(128, 192, 8, bias=bias)
    if quantized:
        nn.quantize(block, 64, 4, class_predicate=_is_switch)
    if bias:  # not zeros, so that a bias left out shows
        for layer in (block.gate_proj, block.up_proj, block.down_proj):
            layer.bias = mx.random.normal(layer.bias.shape)
    mx.eval(block.parameters())
    traced = []
    make = switch._block

    def spy(kind):
        forward = make(kind)
        return lambda x, idx, *arrays: traced.append(idx.shape) or forward(x, idx, *arrays)

    monkeypatch.setattr(switch, "_block", spy)
    monkeypatch.setattr(_fused, "_compiled", {})

    def layer_by_layer(x, indices):
        x = mx.expand_dims(x, (-2, -3))
        g, u, d = block.gate_proj, block.up_proj, block.down_proj
        return d(nn.silu(g(x, indices)) * u(x, indices), indices).squeeze(-2)

    most = (switch.SORT_PAIRS - 1) // 2  # tokens of two experts each below SORT_PAIRS pairs
    for tokens in (1, 3, most, most + 1, 1):
        x, indices = mx.random.normal((tokens, 128)), _routes(tokens, 8, 2)
        ref.assert_close(block(x, indices), ref.f64(layer_by_layer(x, indices)), mx.float32,
                         atol=1e-5, rtol=1e-5)  # fmt: skip
    assert traced == [(1, 2), (3, 2), (most, 2)]
    x, indices = mx.random.normal((2, 128)), _routes(2, 8, 2)
    if not quantized:  # the weights' gradients through the compiled call
        loss = nn.value_and_grad(block, lambda m, x: m(x, indices).sum())
        grads = loss(block, x)[1]
        with pytest.MonkeyPatch.context() as unfused:
            unfused.setattr(switch, "SORT_PAIRS", 0)
            want = loss(block, x)[1]
        for (_, g), (_, w) in zip(tree_flatten(grads), tree_flatten(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    g = mx.grad(lambda x: block(x, indices).sum())(x)
    np.testing.assert_allclose(g, mx.grad(lambda x: layer_by_layer(x, indices).sum())(x),
                               atol=1e-5)  # fmt: skip
    with mp.record():
        block(x, indices), block(x, indices)
        counted = dict(mp.recording.counts())
    op = "gather_qmm" if quantized else "gather_mm"
    assert sum(n for (name, _), n in counted.items() if name == op) == 2 * 3


def test_sorted_path_matches_each_pair_computed_alone(monkeypatch):
    # The block's sorted path (many pairs) against a per-pair NumPy product: a wrong inverse
    # permutation puts rows back in the wrong place.
    mx.random.seed(3)
    layer = mp.SwitchMLP(64, 32, 6, activation=nn.ReLU())
    x = mx.random.normal((50, 64))
    indices = _routes(50, 6, 3)
    w1, w2 = np.array(layer.fc1.weight), np.array(layer.fc2.weight)
    xs, idx = np.array(x), np.array(indices)
    want = np.stack(
        [
            [w2[e] @ np.maximum(w1[e] @ xs[t], 0) for e in idx[t]]
            for t in range(50)
        ]
    )  # fmt: skip
    assert indices.size >= switch.SORT_PAIRS
    ref.assert_close(layer(x, indices), want, mx.float32, atol=1e-4)


@pytest.mark.parametrize(
    "x_shape,lhs,rhs",
    [
        ((4, 1, 1, 64), None, (4, 2)),  # mlx-lm's unsorted call
        ((6, 1, 64), None, (6,)),  # one row per pair
        ((5, 1, 64), (7,), (7,)),  # both indices
        ((3, 1, 64), (3, 1), (1, 4)),  # indices that broadcast
        ((2, 3, 64), None, (2,)),  # 3 rows per block: served by MLX's op
    ],
)
@pytest.mark.parametrize("quantized", [False, True], ids=["gather_mm", "gather_qmm"])
def test_gather_ops_keep_mlxs_contract(x_shape, lhs, rhs, quantized):
    k = mx.random.split(mx.random.key(4), 4)
    x = mx.random.normal(x_shape, key=k[0])
    rows = int(np.prod(x_shape[:-2]))
    left = None if lhs is None else mx.random.randint(0, rows, lhs, key=k[1]).astype(mx.uint32)
    right = mx.random.randint(0, 5, rhs, key=k[2]).astype(mx.uint32)
    weight = mx.random.normal((5, 32, 64), key=k[3])
    if quantized:
        packed = mx.quantize(weight, 64, 4)
        got = mp.gather_qmm(x, *packed, lhs_indices=left, rhs_indices=right)
        want = mx.gather_qmm(x, *packed, lhs_indices=left, rhs_indices=right)
    else:
        got = mp.gather_mm(x, weight.swapaxes(-1, -2), left, right)
        want = mx.gather_mm(x, weight.swapaxes(-1, -2), left, right)
    assert got.shape == want.shape
    ref.assert_close(got, ref.f64(want), mx.float32, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantized", [False, True], ids=["gather_mm", "gather_qmm"])
def test_calls_the_gather_variants_do_not_model_are_kept_as_mlxs(quantized):
    """Three rows per block is not one row per pair: the problem function says so, dispatch
    keeps MLX's op (the op's ``outside``) for those marks, and the result is MLX's."""
    from mlx_primitives import dispatch
    from mlx_primitives.problem import Unmodelled
    from mlx_primitives.registry import op as get_op

    o = get_op("gather_qmm" if quantized else "gather_mm")
    x = mx.random.normal((2, 3, 64), key=mx.random.key(5))
    right = mx.array([1, 0], dtype=mx.uint32)
    weight = mx.random.normal((2, 32, 64), key=mx.random.key(6))
    if quantized:
        args, mlx_call = (x, *mx.quantize(weight, 64, 4)), mx.gather_qmm
    else:
        args, mlx_call = (x, weight.swapaxes(-1, -2)), mx.gather_mm
    with pytest.raises(Unmodelled):
        o.problem(*args, rhs_indices=right)
    dispatch.forget_calls()
    public = getattr(mp, o.name)
    for _ in range(2):
        got = public(*args, rhs_indices=right)
    assert mx.array_equal(got, mlx_call(*args, rhs_indices=right)).item()
    assert [fn for key, fn in dispatch._calls.items() if key[0] == o.name] == [o.outside]


def test_gather_qmm_rejects_what_mlx_would_miscompute():
    w, scales, biases = mx.quantize(mx.random.normal((4, 32, 128)), 64, 4)
    x = mx.random.normal((3, 1, 1, 128))
    idx = mx.zeros((3, 2), mx.uint32)
    with pytest.raises(ValueError, match=r"\[gather_qmm\] scales has shape"):
        mp.gather_qmm(x, w, scales[:, :, :1], biases, rhs_indices=idx)
    with pytest.raises(ValueError, match=r"\[gather_qmm\] x has 64 features"):
        mp.gather_qmm(x[..., :64], w, scales, biases, rhs_indices=idx)
    with pytest.raises(ValueError, match=r"\[gather_qmm\] rhs_indices must have an integer"):
        mp.gather_qmm(x, w, scales, biases, rhs_indices=idx.astype(mx.float32))
    with pytest.raises(ValueError, match=r"\[gather_qmm\] lhs_indices of shape \(3, 1\) and"):
        mp.gather_qmm(x, w, scales, biases, rhs_indices=mx.zeros((2, 5), mx.uint32))
    with pytest.raises(ValueError, match=r"\[gather_qmm\] mode must be one of"):
        mp.gather_qmm(x, w, scales, biases, rhs_indices=idx, mode="int4")


def _count_evals(monkeypatch) -> list:
    calls = []
    for name in ("eval", "async_eval"):
        real = getattr(mx, name)
        monkeypatch.setattr(mx, name, lambda *a, _real=real, **k: calls.append(a) or _real(*a))
    return calls


@pytest.mark.parametrize("tokens", [2, 40])  # both sides of SORT_PAIRS
def test_moe_block_traces_under_compile_without_host_syncs(tokens, monkeypatch):
    # A host sync (an .item(), a NumPy copy, an eval) inside the block raises while
    # mx.compile traces it; the count catches an explicit eval in eager mode too.
    mx.random.seed(5)
    moe = mp.SparseMoE(64, 96, 8, top_k=2)
    x = mx.random.normal((1, tokens, 64))
    calls = _count_evals(monkeypatch)
    eager = moe(x)
    assert calls == []
    compiled = mx.compile(lambda x: moe(x, return_aux_loss=True))
    y, aux = compiled(x)
    ref.assert_close(y, ref.f64(eager), mx.float32, atol=1e-5)
    assert calls == [] and aux.shape == ()


def _moe_reference(x, gate_w, up, gate, down, top_k):
    """The SparseMoE block in float64 MLX ops: dense routing, each expert taken per pair."""
    probs = mx.softmax(x @ gate_w.T, axis=-1)
    indices = mx.stop_gradient(mx.argsort(-probs, axis=-1)[..., :top_k])
    scores = mx.take_along_axis(probs, indices, axis=-1)
    scores = scores / scores.sum(-1, keepdims=True)
    xe = x[..., None, :, None]  # (tokens, 1, in, 1)
    h_up = (up[indices] @ xe)[..., 0]
    h_gate = (gate[indices] @ xe)[..., 0]
    h = h_gate * mx.sigmoid(h_gate) * h_up
    y = (down[indices] @ h[..., None])[..., 0]
    return (y * scores[..., None]).sum(-2)


def test_moe_gradients_match_float64():
    mx.random.seed(6)
    moe = mp.SparseMoE(32, 48, 6, top_k=2)
    x = mx.random.normal((9, 32))
    cot = mx.random.normal((9, 32))

    def ours(params, x):
        moe.update(params)
        return (moe(x) * cot).sum()

    params = moe.trainable_parameters()
    g_params, g_x = mx.grad(ours, argnums=(0, 1))(params, x)
    names = ("gate", "switch_mlp.up_proj", "switch_mlp.gate_proj", "switch_mlp.down_proj")
    with mx.stream(mx.cpu):
        f64 = [x.astype(mx.float64), cot.astype(mx.float64)]
        weights = [dict(tree_flatten(params))[f"{n}.weight"].astype(mx.float64) for n in names]

        def theirs(x, *w):
            return (_moe_reference(x, *w, top_k=2) * f64[1]).sum()

        want = mx.grad(theirs, argnums=tuple(range(5)))(f64[0], *weights)
    got = [g_x] + [dict(tree_flatten(g_params))[f"{n}.weight"] for n in names]
    for name, g, w in zip(("x", *names), got, want):
        ref.assert_close(g, np.array(w), mx.float32, atol=1e-4, rtol=1e-3, label=name)


def test_build_expert_dispatch_matches_numpy():
    indices = _routes(37, 10, 3, seed=7)
    d = mp.build_expert_dispatch(indices, 10)
    flat = np.array(indices).reshape(-1)
    order = np.array(d.order)
    assert sorted(order.tolist()) == list(range(flat.size))
    np.testing.assert_array_equal(np.array(d.experts), flat[order])
    assert (np.diff(np.array(d.experts).astype(int)) >= 0).all()
    np.testing.assert_array_equal(np.array(d.tokens), order // 3)
    np.testing.assert_array_equal(np.array(d.counts), np.bincount(flat, minlength=10))
    np.testing.assert_array_equal(
        np.array(d.offsets), np.r_[0, np.cumsum(np.bincount(flat, minlength=10))]
    )
    np.testing.assert_array_equal(order[np.array(d.inverse)], np.arange(flat.size))
    with pytest.raises(ValueError, match=r"\[build_expert_dispatch\] num_experts"):
        mp.build_expert_dispatch(indices, 0)


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
def test_load_balancing_loss_matches_numpy(z_loss_weight):
    logits = mx.random.normal((5, 7, 8), key=mx.random.key(8))
    indices = mx.argsort(-logits, axis=-1)[..., :2]
    got = mp.compute_load_balancing_loss(logits, indices, z_loss_weight=z_loss_weight)
    lg = np.array(logits).reshape(-1, 8).astype(np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    share = np.bincount(np.array(indices).reshape(-1), minlength=8) / indices.size
    want = 8 * (share * p.mean(0)).sum()
    lse = np.log(np.exp(lg).sum(-1))
    want += z_loss_weight * (lse**2).mean()
    assert abs(got.item() - want) < 1e-5
    grad = mx.grad(lambda lg: mp.compute_load_balancing_loss(lg, indices))(logits)
    assert float(mx.abs(grad).sum()) > 0  # the router learns from it
    balanced = mx.zeros((4, 4))
    assert mp.compute_load_balancing_loss(balanced, mx.arange(4)[:, None]).item() == pytest.approx(
        1
    )
    with pytest.raises(ValueError, match=r"\[compute_load_balancing_loss\] indices has shape"):
        mp.compute_load_balancing_loss(logits, indices[:2])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_selective_gather_and_scatter_add(dtype):
    k = mx.random.split(mx.random.key(9), 3)
    x = mx.random.normal((6, 5), key=k[0]).astype(dtype)
    indices = mx.array([4, 0, 4, 2])
    weights = mx.random.uniform(shape=(4,), key=k[1]).astype(dtype)
    rows = mp.selective_gather(x, indices)
    np.testing.assert_array_equal(
        np.array(rows.astype(mx.float32)), np.array(x.astype(mx.float32))[[4, 0, 4, 2]]
    )
    updates = mx.random.normal((4, 5), key=k[2]).astype(dtype)
    out = mp.selective_scatter_add(mx.zeros_like(x), updates, indices, weights)
    want = np.zeros((6, 5))
    np.add.at(want, [4, 0, 4, 2], ref.f64(updates) * ref.f64(weights)[:, None])
    ref.assert_close(out, want, dtype)
    # Gradients: a row taken twice gets both cotangents; updates get their weights.
    g_x = mx.grad(lambda x: mp.selective_gather(x, indices).astype(mx.float32).sum())(x)
    np.testing.assert_array_equal(np.array(g_x.astype(mx.float32))[:, 0], [1, 0, 1, 0, 2, 0])
    g_u = mx.grad(lambda u: mp.selective_scatter_add(mx.zeros_like(x), u, indices, weights)
                  .astype(mx.float32).sum())(updates)  # fmt: skip
    ref.assert_close(g_u[:, 0], ref.f64(weights), dtype)
    with pytest.raises(ValueError, match=r"\[selective_scatter_add\] updates has shape"):
        mp.selective_scatter_add(x, updates[:, :2], indices)
    with pytest.raises(ValueError, match=r"\[selective_gather\] x must have a floating dtype"):
        mp.selective_gather(indices, indices)


@pytest.mark.parametrize("kernel", ["qmv", "mma"])
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("sorted_indices", [False, True])
def test_gather_kernel_pairs_reach_it_as_it_reads_them(kernel, sort, sorted_indices, monkeypatch):
    """What gather_qmm's kernels are handed (launch replaced by a NumPy model of it: a run
    of equal adjacent experts is one read, row m of the run goes to y_rows[m]): the product
    of every pair, the pairs sorted by expert or as given."""
    from mlx_primitives.ops import _quantized_kernels as kernels
    from mlx_primitives.registry import op as get_op

    o = get_op("gather_qmm")
    args = o.example(((5, 256), (6, 24, 32)), mx.float16, mx.random.key(3), top_k=3,
                     sorted_indices=sorted_indices)  # fmt: skip
    x, w, scales, biases = args[:4]
    wf = np.array(mx.dequantize(w, scales, biases, 64, 4).astype(mx.float32))
    seen = []

    def launch(self, inputs, *, template, grid, threadgroup, output_shapes, output_dtypes):
        xs = np.array(inputs[0].astype(mx.float32))
        experts, x_rows, y_rows = (np.array(a) for a in inputs[4:])
        seen.append(experts)
        y = np.full(output_shapes[0], np.nan, np.float32)
        for m, e in enumerate(experts):
            y[y_rows[m]] = xs[x_rows[m]] @ wf[e].T
        return [mx.array(y).astype(output_dtypes[0])]

    monkeypatch.setattr(kernels.GpuKernel, "__call__", launch)
    v, problem = o.variant(kernel), o.problem(*args).as_dict()
    cfg = next(c for c in v.configs() if c["sort"] is sort and v.allows(problem, c))
    got = v.factory(**cfg)(*args)
    ref.assert_close(got, ref.gather_qmm(*args), mx.float16, label=f"{kernel} {sort=}")
    (experts,) = seen
    flat = np.array(args[5]).reshape(-1)
    if sort or sorted_indices:
        assert (np.diff(experts.astype(np.int64)) >= 0).all()
    else:
        np.testing.assert_array_equal(experts, flat)


@pytest.mark.parametrize("n", [1, 37, 2047, 2048, 5000])
def test_inverse_permutation_on_both_sides_of_its_switch(n):
    from mlx_primitives.ops._gather import inverse

    order = np.random.default_rng(n).permutation(n).astype(np.uint32)
    np.testing.assert_array_equal(order[np.array(inverse(mx.array(order)))], np.arange(n))


def test_quantized_switch_layers_share_routes_only_where_their_arrays_agree():
    """The layers' routes are shared: a route made for one layer is never another's whose
    biases have another dtype; that layer gives what mp.gather_qmm gives for its arrays (MLX's
    call, which raises in float64)."""
    a, b = (mp.QuantizedSwitchLinear(128, 64, 4, bias=False) for _ in range(2))
    a.set_dtype(mx.float64)
    b.set_dtype(mx.float64)
    b.biases = b.biases.astype(mx.float32)
    x = mx.random.normal((2, 1, 1, 128)).astype(mx.float64)
    idx = mx.array([[0, 1], [2, 3]], mx.uint32)
    with mx.stream(mx.cpu):
        mx.eval(a(x, idx))
        with pytest.raises(RuntimeError):
            mx.eval(mp.gather_qmm(x, b.weight, b.scales, b.biases, rhs_indices=idx))
        with pytest.raises(RuntimeError):
            mx.eval(b(x, idx))


def test_quantized_switch_linear_keeps_its_routes_until_the_dispatch_forgets_them(db, monkeypatch):
    """A layer's calls are checked and routed once per shape and order (then kept), and
    routed again once the dispatch forgets its decisions: a new record then serves them."""
    from mlx_primitives import dispatch
    from mlx_primitives.ops.gather_qmm import OP

    from .toy import record

    layer = mp.QuantizedSwitchLinear(128, 64, 4, bias=False)
    x = mx.expand_dims(mx.random.normal((3, 128), key=mx.random.key(1)), (-2, -3))
    idx = mx.array([[0, 1], [1, 2], [2, 3]], mx.uint32)  # sorted, as the sorted calls say
    want = mx.gather_qmm(x, layer.weight, layer.scales, layer.biases, rhs_indices=idx)
    routed, served = [], []
    route = dispatch.route
    monkeypatch.setattr(dispatch, "route", lambda *a: routed.append(a[0].name) or route(*a))
    take = OP.variant("take")
    factory = take.factory
    monkeypatch.setattr(take, "factory", lambda: lambda *a: served.append(1) or factory()(*a))
    monkeypatch.setattr(take, "_built", {})
    for sort in (False, False, True, True):
        np.testing.assert_allclose(layer(x, idx, sorted_indices=sort), want, atol=1e-5)
    assert routed == ["gather_qmm"] * 2 and not served  # once per order, then kept
    args = (x, layer.weight, layer.scales, layer.biases, None, idx, True, 64, 4, "affine", None,
            False)  # fmt: skip
    db.put(record(OP, args, "take", default_variant="builtin"))
    dispatch.reset()
    for _ in range(2):
        np.testing.assert_allclose(layer(x, idx), want, atol=1e-5)
    assert routed == ["gather_qmm"] * 3 and served
