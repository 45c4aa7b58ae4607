"""Every public op rejects bad input with an error naming the op and the argument."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_primitives as mp

x = mx.ones((4, 8))
w = mx.ones((8,))
h = mx.ones((2, 3, 5, 8))

CASES = [
    # rms_norm
    (mp.rms_norm, (np.ones((4, 8)), w), {}, TypeError, "[rms_norm] x must be an mlx.core.array"),
    (
        mp.rms_norm,
        (x, mx.ones((5,))),
        {},
        ValueError,
        "[rms_norm] weight has shape (5,), expected (8,)",
    ),
    (mp.rms_norm, (x, mx.ones((8, 1))), {}, ValueError, "[rms_norm] weight has shape (8, 1)"),
    (
        mp.rms_norm,
        (mx.ones((4, 8), mx.int32), w),
        {},
        ValueError,
        "[rms_norm] x must have a floating",
    ),
    (mp.rms_norm, (mx.ones((0, 8)), w), {}, ValueError, "[rms_norm] x has a zero-size dim"),
    (mp.rms_norm, (mx.array(1.0), None), {}, ValueError, "[rms_norm] x must have at least 1 dims"),
    (mp.rms_norm, (x, w, "1e-5"), {}, TypeError, "[rms_norm] eps must be a real number"),
    # layer_norm
    (
        mp.layer_norm,
        (x, w, mx.ones((7,))),
        {},
        ValueError,
        "[layer_norm] bias has shape (7,), expected (8,)",
    ),
    (mp.layer_norm, (x, mx.ones((9,)), None), {}, ValueError, "[layer_norm] weight has shape (9,)"),
    (mp.layer_norm, ([1.0], None, None), {}, TypeError, "[layer_norm] x must be an mlx.core.array"),
    (mp.layer_norm, (x, w, w, "1e-5"), {}, TypeError, "[layer_norm] eps must be a real number"),
    (
        mp.layer_norm,
        (mx.ones((3, 0)), None, None),
        {},
        ValueError,
        "[layer_norm] x has a zero-size dim",
    ),
    # rope
    (mp.rope, (x, 8), {}, ValueError, "[rope] x must have at least 3 dims"),
    (mp.rope, (h, 7), {}, ValueError, "[rope] dims must be even and at most 8, got 7"),
    (mp.rope, (h, 10), {}, ValueError, "[rope] dims must be even and at most 8, got 10"),
    (mp.rope, (h, 0), {}, ValueError, "[rope] dims must be at least 2"),
    (mp.rope, (h, 8.0), {}, TypeError, "[rope] dims must be an integer"),
    (mp.rope, (h, True), {}, TypeError, "[rope] dims must be an integer, got bool"),
    (mp.rope, (h, 8), {"layout": "SBHD"}, ValueError, "[rope] layout must be one of"),
    (
        mp.rope,
        (mx.ones((2, 3, 8)), 8),
        {"layout": "BSHD"},
        ValueError,
        "[rope] x must be (batch, seq, heads",
    ),
    (mp.rope, (h, 8), {"base": None}, ValueError, "[rope] give exactly one of base and freqs"),
    (
        mp.rope,
        (h, 8),
        {"freqs": mx.ones((4,))},
        ValueError,
        "[rope] give exactly one of base and freqs",
    ),
    (
        mp.rope,
        (h, 8),
        {"base": None, "freqs": mx.ones((3,))},
        ValueError,
        "[rope] freqs has shape (3,)",
    ),
    (mp.rope, (h, 8), {"offset": 1.5}, ValueError, "[rope] offset must be an integer"),
    (mp.rope, (h, 8), {"offset": 2**31}, ValueError, "[rope] offset must fit in int32"),
    (
        mp.rope,
        (h, 8),
        {"offset": mx.array([1.0, 2.0])},
        ValueError,
        "[rope] offset must have an integer dtype",
    ),
    (
        mp.rope,
        (h, 8),
        {"offset": mx.array([1, 2, 3])},
        ValueError,
        "[rope] offset must be a scalar or a vector of 2",
    ),
    (mp.rope, (h, 8), {"traditional": 1}, TypeError, "[rope] traditional must be a bool"),
    (
        mp.rope,
        (mx.ones((2, 3, 5, 8), mx.int32), 8),
        {},
        ValueError,
        "[rope] x must have a floating",
    ),
    # swiglu / geglu
    (
        mp.swiglu,
        (x, mx.ones((4, 7))),
        {},
        ValueError,
        "[swiglu] up has shape (4, 7), which does not broadcast with gate's (4, 8)",
    ),
    (mp.swiglu, (x, mx.ones((4, 8), mx.int32)), {}, ValueError, "[swiglu] up must have a floating"),
    (mp.swiglu, (x, None), {}, TypeError, "[swiglu] up must be an mlx.core.array"),
    (
        mp.swiglu,
        (mx.ones((0,)), mx.ones((0,))),
        {},
        ValueError,
        "[swiglu] gate has a zero-size dim",
    ),
    (mp.geglu, (x, x, "erf"), {}, ValueError, "[geglu] approximate must be one of"),
    (mp.geglu, (x, mx.ones((8, 4))), {}, ValueError, "[geglu] up has shape (8, 4)"),
    # attention sinks: a dtype that promotes to q's, as MLX requires (at every size)
    (
        mp.flash_attention,
        (*(mx.ones((1, 2, 3, 8), mx.float16),) * 3,),
        {"sinks": mx.zeros((2,))},
        ValueError,
        "[flash_attention] sinks has dtype mlx.core.float32, which does not promote to float16",
    ),
]


@pytest.mark.parametrize("fn,args,kwargs,exc,message", CASES, ids=[c[-1][:40] for c in CASES])
def test_bad_input_raises_naming_op_and_argument(fn, args, kwargs, exc, message):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert message in str(info.value)


def test_rope_module_rejects_bad_layout():
    with pytest.raises(ValueError, match=r"\[RoPE\] layout"):
        mp.RoPE(8, layout="HSBD")


@pytest.mark.parametrize(
    "build,error,message",
    [
        (lambda: mp.GeGLU(4, 8, approximate="erf"), ValueError, r"\[GeGLU\] approximate"),
        (lambda: mp.GeGLU(4, 0), ValueError, r"\[GeGLU\] hidden_dims"),
        (lambda: mp.SwiGLU(4.0, 8), TypeError, r"\[SwiGLU\] dims"),
        (lambda: mp.RoPE(7), ValueError, r"\[RoPE\] dims"),
        (lambda: mp.RoPE(8, traditional=1), TypeError, r"\[RoPE\] traditional"),
        (lambda: mp.RoPE(8, base=-1.0), ValueError, r"\[RoPE\] base"),
        (lambda: mp.RoPE(8, scale=0), ValueError, r"\[RoPE\] scale"),
        (lambda: mp.FlashAttention(True, 16), TypeError, r"\[FlashAttention\] num_heads"),
        (lambda: mp.ChunkedCrossAttention(4, 16, layout="SBHD"), ValueError, r"layout"),
    ],
)
def test_modules_validate_their_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build()


_W, _S, _B = mx.quantize(mx.random.normal((64, 256)), 64, 4)
_X = mx.ones((3, 256))

# quantized_matmul: (args, kwargs, exception, message, MLX's exception where it raises one when
# called; None where it computes on the mismatched format, crashes the process or raises only
# when evaluated).
QUANTIZED = [
    ((_X, _W.astype(mx.float32), _S, _B), {}, ValueError, "w must be packed in uint32", ValueError),
    ((_X, _W.astype(mx.int32), _S, _B), {}, ValueError, "w must be packed in uint32", ValueError),
    (
        (_X, _W, _S, _B),
        {"bits": 8},
        ValueError,
        "scales has shape (64, 4), expected (64, 2)",
        ValueError,
    ),
    ((_X, _W, _S, _B), {"group_size": 32}, ValueError, "expected (64, 8) for w", ValueError),
    ((_X, _W, _S, _B), {"group_size": 16}, ValueError, "group_size must be one of", ValueError),
    ((_X, _W, _S, _B), {"bits": 7}, ValueError, "bits must be one of", ValueError),
    ((_X, _W, _S, _B), {"bits": 0}, ValueError, "bits must be one of", None),  # MLX: SIGFPE
    ((_X, _W, _S[:32], _B[:32]), {}, ValueError, "scales has shape (32, 4)", None),
    ((_X, _W, _S[None], _B[None]), {}, ValueError, "scales has shape (1, 64, 4)", None),
    (
        (_X, _W, _S, _B[:32]),
        {},
        ValueError,
        "biases has shape (32, 4), expected (64, 4)",
        ValueError,
    ),
    ((_X, _W, _S), {}, ValueError, "biases must be given for mode='affine'", ValueError),
    ((mx.ones((3, 128)), _W, _S, _B), {}, ValueError, "x has 128 features", ValueError),
    (
        (mx.ones((3, 100)), _W, _S, _B),
        {"transpose": False},
        ValueError,
        "expected 64 from",
        ValueError,
    ),
    ((_X, _W, _S, _B), {"mode": "int4"}, ValueError, "mode must be one of", ValueError),
    ((_X, _W, _S, _B), {"mode": 3}, TypeError, "mode must be a str", TypeError),
    ((_X, _W, _S, _B), {"mode": None}, TypeError, "mode must be a str", TypeError),
    ((_X, _W, _S, _B), {"transpose": 1}, TypeError, "transpose must be a bool", TypeError),
    ((_X, _W, _S, _B), {"group_size": 64.0}, TypeError, "group_size must be an integer", TypeError),
    ((_X, _W, _S, _B), {"bits": "4"}, TypeError, "bits must be an integer", TypeError),
    (
        (np.ones((3, 256), np.float32), _W, _S, _B),
        {},
        TypeError,
        "x must be an mlx.core.array",
        TypeError,
    ),
    (
        (_X, _W, np.ones((64, 4), np.float32), _B),
        {},
        TypeError,
        "scales must be an mlx.core.array",
        TypeError,
    ),
    ((mx.ones((0, 256)), _W, _S, _B), {}, ValueError, "x has a zero-size dim", None),  # MLX: SIGFPE
    (
        (_X, _W, _S.astype(mx.int32), _B.astype(mx.int32)),
        {},
        ValueError,
        "Only real floating",
        ValueError,
    ),
    (
        (_X, _W.reshape(-1), _S, _B),
        {},
        ValueError,
        "scales has shape (64, 4), expected ()",
        ValueError,
    ),
    (
        (_X.astype(mx.int32), _W, _S, _B),
        {"mode": "mxfp4"},
        ValueError,
        "Scale type must be uint8",
        ValueError,
    ),
]


@pytest.mark.parametrize(
    "args,kwargs,error,message,mlx_error", QUANTIZED, ids=[b[3][:40] for b in QUANTIZED]
)
def test_quantized_matmul_rejects_what_mlx_rejects(args, kwargs, error, message, mlx_error):
    with pytest.raises(error) as raised:
        mx.eval(mp.quantized_matmul(*args, **kwargs))
    assert str(raised.value).startswith("[quantized_matmul] ")
    assert message in str(raised.value)
    if mlx_error is not None:  # the type MLX raises for the same call
        with pytest.raises(mlx_error):
            mx.quantized_matmul(*args, **kwargs)
