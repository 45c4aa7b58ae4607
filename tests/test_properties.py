"""Property tests of every public op's argument checking: any input either raises ValueError or
TypeError naming the op and an argument, or is valid and gives the reference's answer (or,
where the variants do not model it but MLX's function takes it, MLX's)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_primitives as mp

from . import references as ref

FLOATS = [mx.float32, mx.float16, mx.bfloat16]
DTYPES = [*FLOATS, mx.int32, mx.uint8, mx.bool_]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def arrays(draw, max_rank=4):
    rank = draw(st.integers(0, max_rank))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from(DTYPES))
    return (mx.random.normal(shape) * 2).astype(dtype)


def not_arrays():
    return st.sampled_from([None, 1.0, [1.0, 2.0], np.ones((2, 3), np.float32), "x"])


scalars = st.sampled_from([1e-5, 0.0, 1, -1.0, math.nan, math.inf, "1e-5", None, True, 1e300])


def _valid_array(a, min_ndim=1) -> bool:
    return isinstance(a, mx.array) and a.dtype in FLOATS and a.ndim >= min_ndim and a.size > 0


def _valid_eps(e) -> bool:
    return isinstance(e, (int, float)) and not isinstance(e, bool) and 0 <= e < math.inf


def _mlx_takes(e) -> bool:
    """A number MLX's norms and rope take (any int, float or bool)."""
    return isinstance(e, (int, float))


def _mlx_vector(v, size: int) -> bool:
    """A vector MLX's norms take for a weight or bias: any dtype, ``size`` elements."""
    return v is None or (isinstance(v, mx.array) and v.shape == (size,))


def _check(op: str, call, args: tuple, valid: bool, reference, names: tuple[str, ...]):
    try:
        out = call(*args)
    except (ValueError, TypeError) as e:
        message = str(e)
        assert message.startswith(f"[{op}]"), message
        assert any(n in message for n in names), message
        assert not valid, f"valid input rejected: {message}"
        return
    assert valid, f"[{op}] accepted invalid input {[getattr(a, 'shape', a) for a in args]}"
    with np.errstate(all="ignore"):  # a constant row with eps=0 is 0/0 in the reference too
        want = reference(*args)
    got = ref.f64(out)
    assert np.isfinite(got).all() or not np.isfinite(want).all()
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)


@SETTINGS
@given(
    x=st.one_of(arrays(), not_arrays()),
    w=st.one_of(arrays(1), st.none(), not_arrays()),
    eps=scalars,
)
def test_rms_norm_inputs(x, w, eps):
    modelled = _valid_eps(eps) and (w is None or _valid_array(w))
    valid = _valid_array(x) and _mlx_takes(eps) and _mlx_vector(w, x.shape[-1])
    theirs = ref.rms_norm if modelled else _mlx("rms_norm")
    _check("rms_norm", mp.rms_norm, (x, w, eps), valid, theirs, ("x", "weight", "eps"))


def _mlx(name: str):
    """MLX's own function, in float64 like the references (NaN where it gives NaN)."""
    from mlx_primitives.patch import MLX_FAST

    return lambda *args, **kwargs: ref.f64(MLX_FAST[name](*args, **kwargs))


@SETTINGS
@given(
    x=st.one_of(arrays(), not_arrays()),
    w=st.one_of(arrays(1), st.none()),
    b=st.one_of(arrays(1), st.none(), not_arrays()),
    eps=scalars,
)
def test_layer_norm_inputs(x, w, b, eps):
    modelled = _valid_eps(eps) and all(v is None or _valid_array(v) for v in (w, b))
    valid = (
        _valid_array(x)
        and _mlx_takes(eps)
        and _mlx_vector(w, x.shape[-1])
        and _mlx_vector(b, x.shape[-1])
    )
    _check(
        "layer_norm",
        mp.layer_norm,
        (x, w, b, eps),
        valid,
        ref.layer_norm if modelled else _mlx("layer_norm"),
        ("x", "weight", "bias", "eps"),
    )


@SETTINGS
@given(
    gate=st.one_of(arrays(), not_arrays()),
    up=st.one_of(arrays(), not_arrays()),
    name=st.sampled_from(["swiglu", "geglu"]),
)
def test_gated_inputs(gate, up, name):
    def broadcast(a, b) -> bool:
        try:
            return mx.broadcast_shapes(a.shape, b.shape) is not None
        except ValueError:
            return False

    valid = _valid_array(gate) and _valid_array(up) and broadcast(gate, up)
    _check(name, getattr(mp, name), (gate, up), valid, getattr(ref, name), ("gate", "up"))


@SETTINGS
@given(
    x=st.one_of(arrays(5), not_arrays()),
    dims=st.sampled_from([2, 3, 4, 0, -2, 8.0, 6]),
    traditional=st.sampled_from([False, True, 1, None]),
    base=st.sampled_from([10000.0, 500, -1.0, 0.0, None, math.nan]),
    scale=st.sampled_from([1.0, 0.5, -1.0, math.inf, "1"]),
    offset=st.sampled_from([0, 5, -3, 1.5, mx.array(2), mx.array([1, 2]), mx.array([1.0])]),
    layout=st.sampled_from(["BHSD", "BSHD", "bshd", 3]),
)
def test_rope_inputs(x, dims, traditional, base, scale, offset, layout):
    kwargs = dict(traditional=traditional, base=base, scale=scale, offset=offset, layout=layout)
    valid = (
        layout in ("BHSD", "BSHD")
        and _valid_array(x, 3)
        and (layout == "BHSD" or x.ndim == 4)
        and isinstance(dims, int)
        and dims >= 2
        and dims % 2 == 0
        and dims <= x.shape[-1]
        and isinstance(traditional, bool)
        and _mlx_takes(scale)
        and _mlx_takes(base)
        and (
            not isinstance(offset, mx.array)
            or (mx.issubdtype(offset.dtype, mx.integer) and offset.size in (1, x.shape[0]))
        )
        and isinstance(offset, (int, mx.array))
    )
    names = ("x", "dims", "traditional", "base", "scale", "offset", "layout", "freqs")
    modelled = _valid_eps(scale) and _valid_eps(base) and base > 0

    def mlxs(x, d):  # MLX's rope, in the layout given
        options = {k: v for k, v in kwargs.items() if k != "layout"}
        bshd = layout == "BSHD"
        y = _mlx("rope")(x.swapaxes(1, 2) if bshd else x, d, **options)
        return y.swapaxes(1, 2) if bshd else y

    _check(
        "rope",
        lambda *a: mp.rope(*a, **kwargs),
        (x, dims),
        valid,
        (lambda x, d: ref.rope(x, d, **{**kwargs, "offset": np.array(offset)}))
        if modelled
        else mlxs,
        names,
    )
