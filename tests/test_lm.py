"""mlx_primitives.lm against mlx-lm itself (the ``lm`` extra): models of each family built by
mlx-lm from their ModelArgs, patched and unpatched, dense and 4-bit, on this machine."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

import mlx_primitives as mp  # noqa: E402
from mlx_primitives import dispatch, lm  # noqa: E402
from mlx_primitives.patch import patched  # noqa: E402

from . import references as ref  # noqa: E402

# One small configuration for every family: each ModelArgs takes the fields it knows.
CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 97,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "num_experts": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "sliding_window": 8,
    "query_pre_attn_scalar": 16,
    "rope_scaling": None,
    "sliding_window_pattern": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "attention_bias": False,
    # Qwen3-Next's gated delta (linear attention) layers.
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "shared_expert_intermediate_size": 64,
    "partial_rotary_factor": 0.25,
    "full_attention_interval": 2,
}
# Mamba-2's SSM layers (Mamba-2 itself, and Nemotron-H's hybrid of SSM, attention and MLP).
_SSM = {"head_dim": 16, "n_groups": 2, "conv_kernel": 4, "layer_norm_epsilon": 1e-5,
        "use_bias": False, "use_conv_bias": True, "time_step_limit": (0.001, 100.0)}  # fmt: skip
FAMILY_CONFIG = {
    "mamba2": {**_SSM, "num_heads": 4, "state_size": 16, "time_step_rank": "auto"},
    "nemotron_h": {**_SSM, "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16,
                   "mamba_proj_bias": False, "mlp_bias": False,
                   "hybrid_override_pattern": ["M", "*", "-"], "layer_types": None},
}  # fmt: skip
FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma3_text", "gpt_oss",
    "qwen3_next", "mamba2", "nemotron_h",
]  # fmt: skip
# The families whose SSM layers call mlx-lm's ssm_update.
SSM = {"mamba2", "nemotron_h"}
MOE = {"qwen3_moe", "mixtral", "gpt_oss", "qwen3_next"}


def _model(model_type: str, quantized: bool) -> nn.Module:
    from mlx_lm.utils import MODEL_REMAPPING

    module = importlib.import_module("mlx_lm.models." + MODEL_REMAPPING.get(model_type, model_type))
    mx.random.seed(sum(map(ord, model_type)))
    config = {"model_type": model_type, **CONFIG, **FAMILY_CONFIG.get(model_type, {})}
    model = module.Model(module.ModelArgs.from_dict(config))
    if quantized:
        nn.quantize(model, 64, 4)
    model.eval()  # as mlx-lm's load leaves it
    mx.eval(model.parameters())
    return model


def _greedy(model, prompt: mx.array, tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(prompt, model, max_tokens=tokens, sampler=lambda p: mx.argmax(p, -1))
    return [int(t) for t, _ in steps]


@pytest.fixture(autouse=True)
def _nothing_left_patched():
    yield
    for model in [entry[0] for entry in lm.patch.__globals__["_PATCHED"].values()]:
        lm.unpatch(model)
    assert not patched()


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4-bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_gives_stock_logits_and_tokens(served, family, quantized):
    _check_patched_model(family, quantized)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "qwen3_next", "gpt_oss", "mamba2"])
def test_patched_model_on_the_gpu(served, family):
    """On a GPU the patched layers run custom kernels where records name them: the patched
    model gives the stock model's logits and tokens, computed on the CPU (MLX's own float32
    quantized matmul gave NaN on CUDA: docs/notes/2026-12-08-cuda-first-calls-and-float32-qmm.md),
    within the precision of MLX's float32 matmuls there (TF32 on CUDA)."""
    _check_patched_model(family, quantized=True, stock_on=mx.cpu)


# Where the stock model runs on the CPU and the patched one on a GPU: the logits' tolerance
# (MLX's float32 matmuls run at TF32 on CUDA).
DEVICES_TOLERANCE = {"atol": 1e-2, "rtol": 1e-2}


def _stock_on(device, model, prompt: mx.array, tokens: int) -> tuple:
    """The stock model's logits of ``prompt`` and greedy tokens on ``device``, each token with
    its margin over the next best (mlx-lm's loop keeps a stream of the default device)."""
    from mlx_lm.models.cache import make_prompt_cache

    with mx.stream(device):
        logits = model(prompt[None])
        cache = make_prompt_cache(model)
        last = model(prompt[None], cache=cache)[0, -1]
        out = []
        for _ in range(tokens):
            top = mx.sort(last)[-2:]
            out.append((int(mx.argmax(last).item()), (top[1] - top[0]).item()))
            last = model(mx.array([[out[-1][0]]]), cache=cache)[0, -1]
        mx.eval(logits)
    return logits, out


def _check_patched_model(family: str, quantized: bool, stock_on=None) -> None:
    model = _model(family, quantized)
    before = dict(tree_flatten(model.parameters()))
    prompt = mx.array([5, 17, 3, 88, 41, 2, 9, 60, 33, 71, 12])
    if stock_on is None:
        stock_logits = model(prompt[None])
        stock_tokens = _greedy(model, prompt, 12)
    else:
        stock_logits, margins = _stock_on(stock_on, model, prompt, 12)
    report = lm.patch(model)
    assert patched()
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the same arrays: nothing copied
    if quantized:
        assert report.swapped.get("QuantizedLinear", 0) > 0
    if family == "qwen3_next":  # its linear attention through mp.gated_delta
        assert "mlx_lm.models.qwen3_next.gated_delta_update" in report.functions
    if family in SSM:  # its SSM through mp.selective_scan
        assert f"mlx_lm.models.{family}.ssm_update" in report.functions
    if family in MOE:
        assert report.swapped.get("SwitchGLU", 0) == CONFIG["num_hidden_layers"]
        # mlx-lm's SwiGLU activation module, so that a decoding SwitchGLU runs compiled
        # (gpt-oss's experts have an activation of their own).
        swiglus = 0 if family == "gpt_oss" else CONFIG["num_hidden_layers"]
        assert report.swapped.get("SwiGLU", 0) == swiglus
        assert any(isinstance(m, mp.SwitchGLU) for _, m in model.named_modules())
    if stock_on is None:
        ref.assert_close(model(prompt[None]), ref.f64(stock_logits), mx.float32, atol=2e-4,
                         rtol=1e-3)  # fmt: skip
        assert _greedy(model, prompt, 12) == stock_tokens
    else:
        ref.assert_close(model(prompt[None]), ref.f64(stock_logits), mx.float32,
                         **DEVICES_TOLERANCE)  # fmt: skip
        # The same tokens, up to one where the stock model's two best were closer than the
        # tolerance lets the gap between them move (either may be picked; then others follow).
        top = mx.abs(stock_logits).max().item()
        tie = 2 * (DEVICES_TOLERANCE["atol"] + DEVICES_TOLERANCE["rtol"] * top)
        for got, (want, margin) in zip(_greedy(model, prompt, 12), margins):
            if got != want:
                assert margin < tie, (got, want, margin)
                break
    lm.unpatch(model)
    assert not any(
        type(m).__module__.startswith("mlx_primitives") for _, m in model.named_modules()
    )
    if stock_on is None:
        np.testing.assert_array_equal(np.array(model(prompt[None])), np.array(stock_logits))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "qwen3_next", "mamba2"])
def test_a_patched_models_forward_decides_nothing_the_second_time(served, family, monkeypatch):
    """Once a patched model's calls were routed, a forward over the same shapes (a prefill of
    the same length, with a fresh KV cache) reaches no decision again: every call hits a kept
    route, so nothing is chosen, probed or built per forward."""
    from mlx_lm.models.cache import make_prompt_cache

    model = _model(family, quantized=True)
    lm.patch(model)
    prompt = mx.array([[5, 17, 3, 88, 41, 2, 9, 60, 33, 71, 12]])
    mx.eval(model(prompt, cache=make_prompt_cache(model)))
    missed = []  # calls that found no kept route and were checked and routed again
    route = dispatch.route
    monkeypatch.setattr(dispatch, "route", lambda *a: missed.append(a[0].name) or route(*a))
    mx.eval(model(prompt, cache=make_prompt_cache(model)))
    assert missed == []


def test_the_gated_mlp_is_swapped_where_its_forward_is_mlx_lms():
    """mlx-lm's gated MLP becomes mp.SwiGLU (and comes back); a subclass with a forward of its
    own is left as it is."""
    from mlx_lm.models import llama

    class Scaled(llama.MLP):
        def __call__(self, x):
            return 2 * super().__call__(x)

    Scaled.__module__ = llama.__name__  # as if mlx-lm defined it

    model = _model("llama", quantized=True)
    model.model.layers[0].mlp = Scaled(model.args)
    report = lm.patch(model)
    assert report.swapped["MLP"] == 1
    assert [type(layer.mlp) for layer in model.model.layers] == [Scaled, mp.SwiGLU]
    lm.unpatch(model)
    assert [type(layer.mlp) for layer in model.model.layers] == [Scaled, llama.MLP]


def test_report_says_what_was_left_and_why():
    model = _model("gpt_oss", quantized=False)
    report = lm.patch(model)
    assert "Linear" in report.left and "SwigluOAI" in report.left
    assert "mx.fast.scaled_dot_product_attention" in report.functions
    text = str(report).splitlines()
    assert f"swapped {CONFIG['num_hidden_layers']} x SwitchGLU" in text
    assert any(line.startswith("left    SwigluOAI: ") for line in text)


def test_functions_stay_patched_while_any_model_is():
    a, b = _model("llama", False), _model("qwen3", False)
    lm.patch(a)
    lm.patch(b)
    lm.patch(a)  # a second call changes nothing
    lm.unpatch(a)
    assert patched()
    lm.unpatch(b)
    assert not patched()
    lm.unpatch(b)  # not patched: nothing happens


def test_patch_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"\[lm.patch\] model must be an mlx.nn.Module"):
        lm.patch("llama")


def test_layers_nested_at_any_depth_are_swapped_and_restored():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.grid = [[nn.QuantizedLinear(64, 64), nn.QuantizedLinear(64, 64)], []]
            self.named = {"a": [nn.QuantizedLinear(64, 64)], "b": {"c": nn.QuantizedLinear(64, 64)}}

    model = Holder()
    originals = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    report = lm.patch(model)
    assert report.swapped == {"QuantizedLinear": 4}
    assert isinstance(model.named["b"]["c"], mp.QuantizedLinear)
    # Weights loaded while patched stay after unpatch.
    fresh = mx.ones_like(model.grid[0][1].scales)
    model.grid[0][1].scales = fresh
    lm.unpatch(model)
    restored = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert sorted(map(id, restored)) == sorted(map(id, originals))
    assert model.grid[0][1].scales is fresh


def test_swiglu_is_served_where_models_call_it_and_mx_fast_left_as_the_user_had_it():
    from mlx_lm.models import activations, qwen3, switch_layers

    model = _model("qwen3_moe", quantized=False)
    mp.patch_mlx()  # the user's own
    lm.patch(model)
    assert activations.swiglu is lm.patch.__globals__["GLOBALS"]["swiglu"][0]  # home unchanged
    assert switch_layers.swiglu.__wrapped__ is mp.swiglu
    lm.unpatch(model)
    assert patched() and switch_layers.swiglu is activations.swiglu
    assert qwen3.swiglu is activations.swiglu
    mp.unpatch_mlx()


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
def test_layers_replaced_while_patched_are_unpatched_to_mlx_lms(family):
    """nn.quantize on a patched model makes quantized layers of this library's from its
    swapped-in ones: unpatch makes them mlx-lm's and MLX's (not the float originals, holding
    packed weights), and the model gives the same logits."""
    model = _model(family, quantized=False)
    lm.patch(model)
    nn.quantize(model, 64, 4)
    prompt = mx.array([[5, 17, 3]])
    want = model(prompt)
    lm.unpatch(model)
    assert not any(
        type(m).__module__.startswith("mlx_primitives") for _, m in model.named_modules()
    )
    np.testing.assert_allclose(np.array(model(prompt)), np.array(want), atol=1e-5)


def test_lora_takes_a_patched_quantized_model():
    """mp.QuantizedLinear is an nn.QuantizedLinear, so mlx-lm's LoRA converts it; a LoRA
    wrapper put in while patched stays after unpatch, and the model still runs."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _model("llama", quantized=True)
    lm.patch(model)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                     "keys": ["self_attn.q_proj"]})  # fmt: skip
    prompt = mx.array([[5, 17, 3]])
    want = model(prompt)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    lm.unpatch(model)
    np.testing.assert_allclose(np.array(model(prompt)), np.array(want), atol=1e-5)


def test_a_patched_swiglu_takes_what_mlx_lms_takes(served):
    """mlx-lm's swiglu broadcasts and promotes: Mamba-2's gated norm multiplies a float32
    output (its skip weights kept in float32) by a bfloat16 gate. Patched, with the calls
    going through the dispatch (served) and while they are recorded, the model gives the
    stock logits."""
    model = _model("mamba2", quantized=False)
    model.set_dtype(mx.bfloat16)
    for layer in model.layers:
        layer.mixer.D = layer.mixer.D.astype(mx.float32)
    prompt = mx.array([[5, 17, 3, 88, 41]])
    want = ref.f64(model(prompt))
    lm.patch(model)
    ref.assert_close(model(prompt), want, mx.bfloat16)
    with mp.record():
        ref.assert_close(model(prompt), want, mx.bfloat16)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_gated_delta_update_keeps_a_float64_state(use_kernel):
    """float64 in, float64 arithmetic throughout, as mlx-lm's own steps (use_kernel=False
    included: its compiled steps must not round the state to float32)."""
    from mlx_lm.models import gated_delta as theirs

    keys = mx.random.split(mx.random.key(0), 8)
    q, k = (mx.random.normal((1, 9, 2, 32), key=kk).astype(mx.float64) * 0.1 for kk in keys[:2])
    v = mx.random.normal((1, 9, 4, 32), key=keys[2]).astype(mx.float64)
    a, b = (mx.random.normal((1, 9, 4), key=kk).astype(mx.float64) for kk in keys[3:5])
    A_log, dt_bias = (mx.random.normal((4,), key=kk).astype(mx.float64) for kk in keys[5:7])
    state = (mx.random.normal((1, 4, 32, 32), key=keys[7]) * 0.1).astype(mx.float64) + 1e-9
    with mx.stream(mx.cpu):
        args = (q, k, v, a, b, A_log, dt_bias, state, None)
        want = theirs.gated_delta_update(*args, use_kernel=False)
        got = mp.gated_delta_update(*args, use_kernel=use_kernel)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == mx.float64
            assert mx.abs(g - w).max().item() < 1e-12


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "tokens,options", [(1, {}), (9, {"mask": True}), (5, {"lower_bound": -5.0}),
                       (4, {"allow_neg_eigval": True, "use_kernel": False})]
)  # fmt: skip
def test_gated_delta_update_is_mlx_lms(tokens, options, dtype):
    """Equal to mlx-lm's, the decays kept in float32 as mlx-lm keeps them (a model's inputs are
    bfloat16)."""
    from mlx_lm.models import gated_delta as theirs

    keys = mx.random.split(mx.random.key(tokens), 8)
    q, k = (mx.random.normal((2, tokens, 2, 64), key=kk) for kk in keys[:2])
    q, k = theirs.normalize_qk(q, k, inv_scale=64**-0.5, eps=1e-6)
    v = mx.random.normal((2, tokens, 4, 32), key=keys[2])
    a, b = (mx.random.normal((2, tokens, 4), key=kk) for kk in keys[3:5])
    A_log, dt_bias = (mx.random.normal((4,), key=kk) for kk in keys[5:7])
    mask = (
        mx.random.uniform(shape=(2, tokens), key=keys[7]) > 0.3 if options.pop("mask", 0) else None
    )
    q, k, v, a, b = (x.astype(dtype) for x in (q, k, v, a, b))
    want = theirs.gated_delta_update(q, k, v, a, b, A_log, dt_bias, None, mask, **options)
    got = mp.gated_delta_update(q, k, v, a, b, A_log, dt_bias, None, mask, **options)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        tol = 1e-5 if g.dtype == mx.float32 else 1e-2  # the state is float32 either way
        ref.assert_close(g, ref.f64(w), mx.float32, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "tokens,options", [(1, {"state": True}), (300, {}), (37, {"state": True, "mask": True}),
                       (20, {"state": True, "mask": True, "lengths": True}),
                       (9, {"state": "bfloat16"})]
)  # fmt: skip
def test_ssm_update_is_mlx_lms(tokens, options, dtype):
    """Decoding and prefill (past mlx-lm's 256-position chunk), a carried state, a left-padding
    mask, and right-padded lengths with their mask, as mlx-lm's Mamba-2 layers call it."""
    from mlx_lm.models import ssm as theirs

    keys = mx.random.split(mx.random.key(tokens), 8)
    batch, heads, head_dim, groups, states = 2, 4, 8, 2, 16
    x = mx.random.normal((batch, tokens, heads, head_dim), key=keys[0]).astype(dtype)
    B, C = (mx.random.normal((batch, tokens, groups, states), key=k).astype(dtype)
            for k in keys[1:3])  # fmt: skip
    dt = mx.random.normal((batch, tokens, heads), key=keys[3]).astype(dtype)
    A_log = mx.random.uniform(shape=(heads,), key=keys[4])
    dt_bias = 0.5 * mx.random.normal((heads,), key=keys[7])
    D = mx.random.uniform(shape=(heads,), key=keys[5]).astype(dtype)
    state = None
    if options.get("state"):  # float32, as mlx-lm's cache holds it, or another dtype
        state = 0.1 * mx.random.normal((batch, heads, head_dim, states), key=keys[6])
        if isinstance(options["state"], str):
            state = state.astype(getattr(mx, options["state"]))
    lengths = mx.array([tokens, tokens // 2]) if options.get("lengths") else None
    mask = None
    if lengths is not None:
        mask = mx.arange(tokens)[None] < lengths[:, None]
    elif options.get("mask"):
        mask = mx.arange(tokens)[None] >= mx.array([0, 5])[:, None]
    args = (x, A_log, B, C, D, dt, dt_bias, state, (0.001, 100.0), mask, lengths)
    want, got = theirs.ssm_update(*args), mp.ssm_update(*args)
    real = np.ones((batch, tokens), bool) if mask is None else np.array(mask)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape
        g, w = (ref.f64(a) for a in (g, w))
        tol = {"atol": 1e-4, "rtol": 1e-4}
        if i == 0:  # a hidden position's own output is padding
            g, w = g[real], w[real]
            if dtype == mx.bfloat16:  # mlx-lm rounds the scan's and the skip's terms apart, so
                tol = {"atol": 1e-2 * np.abs(w).max()}  # a sum is off by the terms' ulps
        ref.assert_close(mx.array(g), w, mx.float32, **tol)


def test_ssm_update_names_the_argument_at_fault():
    x = mx.zeros((1, 3, 4, 8))
    B = mx.zeros((1, 3, 2, 16))
    good = dict(hidden_states=x, A_log=mx.zeros((4,)), B=B, C=B, D=mx.ones((4,)),
                dt=mx.zeros((1, 3, 4)), dt_bias=mx.zeros((4,)))  # fmt: skip
    for name, bad, message in [
        (
            "dt",
            mx.zeros((1, 3, 5)),
            r"\[ssm_update\] dt has shape \(1, 3, 5\), expected \(1, 3, 4\)",
        ),
        ("A_log", mx.zeros((5,)), r"\[ssm_update\] A_log has shape \(5,\), expected \(4,\)"),
        ("C", mx.zeros((1, 3, 2, 8)), r"\[ssm_update\] C has shape \(1, 3, 2, 8\)"),
        ("B", mx.zeros((1, 3, 3, 16)), r"\[ssm_update\] C has shape"),
        ("state", mx.zeros((1, 4, 8, 17)), r"\[ssm_update\] state has shape \(1, 4, 8, 17\)"),
        ("mask", mx.zeros((1, 4), mx.bool_), r"\[ssm_update\] mask has shape \(1, 4\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            mp.ssm_update(**{**good, name: bad})
    with pytest.raises(ValueError, match=r"\[ssm_attn\] B has 3 groups, which do not split 4"):
        mp.ssm_attn(x, good["A_log"], mx.zeros((1, 3, 3, 16)), mx.zeros((1, 3, 3, 16)),
                    good["D"], good["dt"], good["dt_bias"])  # fmt: skip
