"""Ops and variants: parameter spaces, validation, memoised builds, lookup."""

from __future__ import annotations

import inspect
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives.registry import Variant, op, ops

from .toy import make_op


def test_op_lookup_and_listing():
    names = [o.name for o in ops()]
    assert {"rms_norm", "layer_norm", "rope", "swiglu", "geglu"} <= set(names)
    assert op("rms_norm") is mp.registry.op("rms_norm")
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        op("nope")


def test_every_op_has_presets_and_a_default_it_declares():
    for o in ops():
        assert o.presets["quick"] and o.presets["default"] and o.presets["full"]
        for ex in o.presets["quick"]:
            import mlx.core as mx

            from mlx_primitives.problem import parse_dtype

            args = o.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
            problem = o.problem(*args)
            name, params = o.default(problem)
            o.variant(name).validate(params)


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "swiglu", "geglu"])
def test_row_presets_list_the_largest_shapes_first(name):
    # So a tuning run cut short by --time-budget has covered the shapes where kernels win.
    rows = [ex.shapes[0][0] for ex in op(name).presets["default"]]
    assert rows == sorted(rows, reverse=True) and rows[0] > rows[-1]


def test_configs_cover_the_space():
    v = make_op().variant("tiled")
    configs = v.configs()
    assert len(configs) == 6
    assert {"block": 64, "unroll": 2} in configs


@pytest.mark.parametrize(
    "params,message",
    [
        ({"block": 48, "unroll": 1}, "block=48 is not one of"),
        ({"block": 64}, "do not match the space"),
        ({"block": 64, "unroll": 1, "extra": 1}, "do not match the space"),
        ({"block": "64", "unroll": 1}, "block='64' is not one of"),
        ({"block": 64, "unroll": True}, "unroll=True is not one of"),
        ({"block": 64.0, "unroll": 1}, "block=64.0 is not one of"),
        ([("block", 64)], "params must be a mapping"),
    ],
)
def test_validate_rejects_params_outside_the_space(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_op().variant("tiled").validate(params)


def test_build_is_memoised_and_validated():
    calls = []
    v = Variant("v", lambda k: calls.append(k) or (lambda x: x), space={"k": (1, 2)})
    assert v.build(k=1) is v.build(k=1)
    assert calls == [1]
    with pytest.raises(ValueError):
        v.build(k=3)


def test_variant_space_must_hold_scalars():
    with pytest.raises(ValueError, match="scalar allowed values"):
        Variant("v", lambda: None, space={"k": ([1],)})


def test_source_hash_is_empty_for_compositions():
    assert op("rms_norm").variant("builtin").source_hash == ""
    assert not op("rms_norm").variant("eager").is_kernel


def test_gpu_only_variant_is_unavailable_on_cpu():
    v = make_op().variant("gpu_only")
    assert not v.available("cpu")
    assert v.available("cuda")


def test_duplicate_variant_names_rejected():
    with pytest.raises(ValueError, match="duplicate variant"):
        make_op([Variant("default", lambda: None)])


def test_routing_loads_nothing_of_the_tuner():
    """The dispatcher routes from stores and records alone: importing it (and making a call)
    loads no module of mlx_primitives.tuning (tuner, timing, CLI), and without a user database
    neither SQLAlchemy, Optuna nor NumPy (import time)."""
    code = (
        "import sys, mlx.core as mx\n"
        "import mlx_primitives.dispatch\n"
        "import mlx_primitives as mp\n"
        "mp.rms_norm(mx.ones((2, 8)), None)\n"
        "heavy = ('mlx_primitives.tuning.', 'sqlalchemy', 'optuna', 'numpy')\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.startswith(heavy) or m == 'mlx_primitives.tuning'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("o", ops(), ids=lambda o: o.name)
def test_each_op_states_its_signature_once(o):
    """The op's signature is its public function's; calls bind to it by name or position."""
    public = inspect.signature(getattr(mp, o.name))
    assert o.signature == public
    # stream sets the call's default stream: the op's arguments are the others.
    assert o.params == tuple(p for p in public.parameters if p != "stream")


def test_calls_bind_to_one_canonical_form():
    o = op("rope")
    x = mx.ones((1, 2, 3, 8))
    full = (x, 8, False, 10000.0, 1.0, 3, None, "BHSD")
    assert o.bind(x, 8, offset=3) == full
    assert o.bind(*full) == full
    assert o.problem(x, 8, offset=3) == o.problem(*full)
    with pytest.raises(TypeError, match=r"\[rope\] .*unexpected keyword argument 'ofset'"):
        o.bind(x, 8, ofset=3)
    with pytest.raises(TypeError, match=r"\[rope\] missing a required argument: 'dims'"):
        o(x)
