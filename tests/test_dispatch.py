"""The dispatcher: lookup chain, stale and hostile records, fallbacks, the process cache."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives import dispatch
from mlx_primitives.problem import EXACT, Dim, Unmodelled, bucket, dtype_name
from mlx_primitives.registry import Op, Variant
from mlx_primitives.store import shipped as shipped_store
from mlx_primitives.tuning_record import RecordError, TuningRecord

from .toy import double, make_op, record, record_data

X = mx.random.normal((4, 64))


def _user(db, *records):
    """Replace the user database's records with ``records``."""
    db.clear()
    for r in records:
        db.put(r)
    dispatch.reset()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """Write records (or raw entries) as this chip's shipped database."""
    path = tmp_path / "shipped.json"

    def write(*records):
        entries = [r.to_dict() if isinstance(r, TuningRecord) else r for r in records]
        body = {"format": shipped_store.FORMAT, "schema": 1, "records": entries}
        path.write_text(json.dumps(body))
        monkeypatch.setattr(shipped_store, "path", lambda chip: path)
        dispatch.reset()

    return write


def test_default_without_records(user_db):
    op = make_op()
    d = dispatch.choose(op, op.problem(X))
    assert (d.variant, d.source) == ("default", "default")
    assert "no usable tuning record" in d.reason
    assert not user_db.exists()  # dispatch never creates the user database


def test_user_record_is_used(db):
    op = make_op()
    _user(db, record(op, X, "tiled", {"block": 64, "unroll": 2}))
    d = dispatch.choose(op, op.problem(X))
    assert (d.variant, d.params, d.source) == ("tiled", {"block": 64, "unroll": 2}, "user")
    assert mx.allclose(op(X), X * 2)


def test_pretuned_record_is_used_and_user_wins(db, shipped):
    op = make_op()
    shipped(record(op, X, "slow"))
    assert dispatch.choose(op, op.problem(X)).source == "pretuned"
    _user(db, record(op, X, "tiled", {"block": 32, "unroll": 1}))
    d = dispatch.choose(op, op.problem(X))
    assert (d.variant, d.source) == ("tiled", "user")


def test_shipped_records_of_another_chip_are_ignored(shipped):
    op = make_op()
    shipped(record(op, X, "slow", chip="apple-m9-ultra-99c"))
    assert dispatch.choose(op, op.problem(X)).source == "default"


def test_nearest_bucket_with_same_exact_dims(db):
    op = make_op()
    far = mx.ones((1024, 64))
    near = mx.ones((16, 64))
    other_cols = mx.ones((4, 128))
    _user(
        db,
        record(op, far, "slow"),
        record(op, near, "tiled", {"block": 32, "unroll": 1}),
        record(op, other_cols, "slow"),
    )
    d = dispatch.choose(op, op.problem(X))
    assert (d.variant, d.source) == ("tiled", "nearest")
    assert "rows=16" in d.reason
    assert dispatch.choose(op, op.problem(mx.ones((4, 32)))).source == "default"


def test_nearest_is_bounded(db, shipped):
    # A record tuned for far larger (or smaller) problems says nothing about this one: a
    # kernel that wins at 16384 rows can lose to the built-in at 1 row.
    op = make_op()
    tiled = {"block": 32, "unroll": 1}
    for write in (lambda r: _user(db, r), shipped):
        write(record(op, mx.ones((32, 64)), "tiled", tiled))
        d = dispatch.choose(op, op.problem(X))  # 4 rows: 3 buckets from 32
        assert (d.variant, d.source) == ("default", "default")
        assert "nearest tuned problem is 3 powers of two away in size (at most 2)" in d.reason
        for rows in (8, 16, 64, 128):  # 1 or 2 buckets away
            d = dispatch.choose(op, op.problem(mx.ones((rows, 64))))
            assert (d.variant, d.source) == ("tiled", "nearest"), rows
        db.clear()
        dispatch.reset()


def test_nearest_ignores_unusable_and_breaks_ties_toward_the_larger(db, shipped):
    op = make_op()
    stale = record(op, mx.ones((8, 64)), "tiled", {"block": 32, "unroll": 1}, mlx_version="0")
    _user(db, stale, record(op, mx.ones((32, 64)), "slow"))
    d = dispatch.choose(op, op.problem(X))
    assert d.source == "default" and "3 powers of two away" in d.reason
    # 16 rows: 4 and 64 are each 2 buckets away; the larger serves, whichever kept the default.
    tiled = {"block": 32, "unroll": 1}
    for small, large, want in (("tiled", "default", "default"), ("default", "tiled", "tiled")):
        _user(
            db,
            record(op, mx.ones((4, 64)), small, tiled if small == "tiled" else {}),
            record(op, mx.ones((64, 64)), large, tiled if large == "tiled" else {}),
        )
        d = dispatch.choose(op, op.problem(mx.ones((16, 64))))
        assert (d.variant, d.source) == (want, "nearest") and "rows=64" in d.reason
    # The same problem in both databases: the user's record, though the shipped kept the default.
    shipped(record(op, mx.ones((64, 64)), "default"))
    d = dispatch.choose(op, op.problem(mx.ones((16, 64))))
    assert d.variant == "tiled" and "(user record)" in d.reason


def test_nearest_is_closest_in_size_then_in_shape(db):
    # Rope's kernel tuned at batch 4 x seq 2048 beat the built-in at batch 1 x seq 4096 as it
    # did there: over several bucketed dims, the product (the work) decides, not each dim.
    base = make_op()

    def toy(x):
        return op(x)

    op = Op(
        "toy",
        signature=toy,
        dims=(Dim("batch"), Dim("rows"), Dim("cols", EXACT)),
        problem=lambda x: (
            dtype_name(x.dtype),
            (bucket(x.shape[0]), bucket(x.shape[1]), x.shape[2]),
        ),
        reference=base.reference,
        example=base._example,
        case=lambda p: (((p["batch"], p["rows"], p["cols"]),), {}),
        default=lambda p, backend: ("default", {}),
        variants=base.variants,
        presets={},
    )
    tiled = {"block": 32, "unroll": 1}
    _user(
        db,
        record(op, mx.ones((4, 4, 8)), "slow"),
        record(op, mx.ones((16, 1, 8)), "tiled", tiled),
    )

    def chosen(shape):
        return dispatch.choose(op, op.problem(mx.ones(shape)))

    # Same size as both records: the closer shape wins (2 buckets from 4x4, 6 from 16x1; the
    # problem strings would pick 16x1).
    d = chosen((2, 8, 8))
    assert (d.variant, d.source) == ("slow", "nearest") and "batch=4,rows=4" in d.reason
    # 4 buckets apart in shape but the same size: served (the old per-dim sum refused it).
    assert chosen((1, 16, 8)).source == "nearest"
    # An eighth of the size (and 7 buckets in shape): the default, with the size in the reason.
    d = chosen((1, 128, 8))
    assert d.source == "default" and "3 powers of two away in size" in d.reason
    # Level in size, a larger and a smaller record: shape decides before which is larger.
    _user(
        db,
        record(op, mx.ones((16, 2, 8)), "tiled", tiled),
        record(op, mx.ones((2, 4, 8)), "slow"),
    )
    d = chosen((4, 4, 8))  # 1 away in size from both; 3 and 1 in shape
    assert (d.variant, d.source) == ("slow", "nearest") and "batch=2,rows=4" in d.reason
    # Level in size and shape: the record that kept the default.
    _user(
        db,
        record(op, mx.ones((2, 8, 8)), "tiled", tiled),
        record(op, mx.ones((8, 2, 8)), "default"),
    )
    d = chosen((4, 4, 8))
    assert (d.variant, d.source) == ("default", "nearest") and "batch=8,rows=2" in d.reason


@pytest.mark.parametrize(
    ("default_s", "tuned_s", "served"),
    [(14e-6, 13e-6, False), (14e-6, 12.5e-6, True), (1e-3, 0.97e-3, True), (1e-3, 0.99e-3, False)],
)
def test_records_must_clear_the_noise_rule(db, default_s, tuned_s, served):
    # A record made under an older rule, whose own timings show a gain within today's noise
    # (10% under 20 us, 2% above), leaves the call to the default.
    op = make_op()
    tiled = {"block": 32, "unroll": 1}
    _user(db, record(op, X, "tiled", tiled, default_median_s=default_s, median_s=tuned_s))
    d = dispatch.choose(op, op.problem(X))
    assert (d.variant == "tiled") == served
    if not served:
        assert "within the noise" in d.reason
    # A record that kept the default is never refused for it.
    _user(db, record(op, X, "default", default_median_s=default_s, median_s=default_s))
    assert dispatch.choose(op, op.problem(X)).source == "user"


def test_mlxp_dispatch_default_bypasses_records(db, monkeypatch):
    op = make_op()
    _user(db, record(op, X, "slow"))
    monkeypatch.setenv("MLXP_DISPATCH", "default")
    d = dispatch.choose(op, op.problem(X))
    assert d.source == "default" and "MLXP_DISPATCH" in d.reason


def _series(version: str, patch: int) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{minor}.{patch}"


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"mlx_version": "0.0.1"}, "stale: tuned with MLX 0.0.1"),
        ({"mlx_version": "99.1.0"}, "stale: tuned with MLX 99.1.0"),
        ({"source_hash": "deadbeef"}, "stale: the kernel source changed"),
    ],
)
def test_stale_records_are_not_dispatched(db, overrides, reason):
    op = make_op()
    _user(db, record(op, X, "slow", **overrides))
    d = dispatch.choose(op, op.problem(X))
    assert d.source == "default" and reason in d.reason
    assert reason in record(op, X, "slow", **overrides).stale(op)


@pytest.mark.parametrize("patch", [0, 99])
def test_records_hold_across_patch_releases_of_their_mlx_series(db, patch):
    """The version rule: a record holds for the MLX minor series it was tuned on."""
    op = make_op()
    _user(db, record(op, X, "slow", mlx_version=_series(mx.__version__, patch)))
    assert dispatch.choose(op, op.problem(X)).source == "user"


# (what a hostile record changes, whether TuningRecord refuses it when written)
HOSTILE = [
    ({"variant": "no_such_variant"}, False),
    ({"variant": "__import__('os').system('echo pwned')"}, False),
    ({"variant": "x" * 10000}, True),
    ({"params": {"block": 48, "unroll": 1}}, False),
    ({"params": {"block": "64; rm -rf /", "unroll": 1}}, False),
    ({"params": {"block": [64], "unroll": 1}}, True),
    ({"params": {"block": 64}}, False),
    ({"problem": "rms_norm|float32|rows=4,cols=64"}, False),
    ({"chip": "../../etc/passwd"}, True),
    ({"median_s": float("nan")}, True),
    ({"problem": "toy|float32|rows=3,cols=64"}, False),
]


@pytest.mark.parametrize("overrides,refused", HOSTILE, ids=lambda v: str(v)[:40])
def test_hostile_records_are_refused_or_ignored_with_a_warning(db, shipped, overrides, refused):
    """A malformed record is refused on write (its field named), or, where it is well formed
    but fits no variant of the op, ignored on read with a warning; in a shipped file, where
    nothing checked it on the way in, it is ignored with a warning either way."""
    op = make_op()
    data = {**record_data(op, X, "tiled", {"block": 64, "unroll": 1}), **overrides}
    if refused:
        with pytest.raises(RecordError, match=next(iter(overrides))):
            TuningRecord.from_dict(data)
    else:
        _user(db, TuningRecord.from_dict(data))
        with pytest.warns(RuntimeWarning, match=r"\[toy\] ignoring a user tuning record"):
            d = dispatch.choose(op, op.problem(X))
        assert d.source == "default"
        db.clear()
    if "chip" in overrides:  # under this chip's name, so the shipped reader reads it
        data["chip"], data["median_s"] = record_data(op, X, "default")["chip"], float("nan")
    shipped(data)
    with pytest.warns(RuntimeWarning, match=r"\[toy\] ignoring a"):
        d = dispatch.choose(op, op.problem(X))
    assert d.source == "default"


def test_the_records_params_reach_the_code_that_runs(db):
    """Dispatch builds the tuned variant with the record's parameters, not its first config."""
    built = []

    def factory(block):
        built.append(block)
        return double

    op = make_op([Variant("echo", factory, space={"block": (1, 2, 3)})])
    _user(db, record(op, X, "echo", {"block": 3}))
    assert mx.array_equal(op(X), double(X)).item()
    assert built == [3]


@pytest.mark.parametrize("variant", ["broken_build", "raises", "nan", "wrong"])
def test_failing_tuned_variant_is_disabled_and_falls_back(db, variant):
    op = make_op()
    _user(db, record(op, X, variant))
    with pytest.warns(RuntimeWarning, match=f"variant '{variant}' failed on this machine"):
        y = op(X)
    assert mx.allclose(y, X * 2)
    assert (op.name, variant) in dispatch._disabled
    assert "disabled" in dispatch.choose(op, op.problem(X)).reason


def test_variant_for_another_backend_is_skipped(db):
    op = make_op()
    _user(db, record(op, X, "gpu_only"))
    d = dispatch.choose(op, op.problem(X))
    assert d.source == "default" and "does not run on cpu" in d.reason


def test_unsupported_params_for_the_problem_are_skipped(db):
    op = make_op()
    narrow = mx.ones((4, 16))  # tiled supports block <= max(cols, 32)
    _user(db, record(op, narrow, "tiled", {"block": 128, "unroll": 1}))
    assert dispatch.choose(op, op.problem(narrow)).source == "default"


def test_route_caches_the_choice(user_db, monkeypatch):
    op = make_op()
    calls = []
    real = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda o, p: calls.append(p) or real(o, p))
    for _ in range(3):
        op(X)
    assert len(calls) == 1
    op(mx.ones((300, 64)))
    assert len(calls) == 2


def test_corrupt_user_database_warns_and_falls_back(user_db):
    user_db.write_bytes(b"this is not sqlite" * 64)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning database"):
        y = mp.rms_norm(X, None)
    assert y.shape == X.shape
    assert user_db.read_bytes() == b"this is not sqlite" * 64


def test_bad_mlxp_dispatch_value_warns(monkeypatch):
    monkeypatch.setenv("MLXP_DISPATCH", "fastest")
    with pytest.warns(RuntimeWarning, match="MLXP_DISPATCH"):
        assert dispatch.mode() == "tuned"


def test_explain_real_op():
    d = mp.explain("rms_norm", mx.ones((3, 5)), mx.ones((5,)), 1e-6)
    assert d.op == "rms_norm" and d.problem == "rms_norm|float32|rows=4,dims=5,weight=float32"
    assert d.source == "default" and d.variant == "builtin"
    assert json.loads(json.dumps(d.to_dict()))["source"] == "default"


def test_explain_validates_arguments():
    with pytest.raises(ValueError, match=r"\[rms_norm\] weight"):
        mp.explain("rms_norm", mx.ones((3, 5)), mx.ones((4,)))


def test_dispatched_call_equals_direct_call(db):
    op = make_op()
    _user(db, record(op, X, "tiled", {"block": 64, "unroll": 1}))
    assert mx.array_equal(op(X), double(X))


def test_a_record_that_kept_the_default_serves_it_unprobed_and_unguarded(db, monkeypatch):
    """A record that chose the default (as most records of host-bound sizes do) serves the
    default's own callable: nothing to verify, nothing to fall back to."""
    op = make_op()
    probed = []
    monkeypatch.setattr(dispatch, "_probe", lambda o, p, fn: probed.append(p))
    _user(db, record(op, X, "default"))
    assert dispatch.choose(op, op.problem(X)).source == "user"
    fn = dispatch.route(op, *op._problem(X))
    assert fn.__name__ == "double" and not probed
    _user(db, record(op, X, "tiled", {"block": 64, "unroll": 1}))
    fn = dispatch.route(op, *op._problem(X))
    assert fn.__name__ == "guarded" and len(probed) == 1


def test_variant_failing_at_call_time_falls_back_for_good(db):
    """A tuned variant that passes its probe but raises on some call (a transformation it
    lacks, say) is disabled, and that call and later ones get the default."""
    from mlx_primitives.registry import Variant

    calls = []

    def picky(x):
        calls.append(x.shape)
        if x.dtype == mx.float32 and len(calls) > 1:  # the probe passes, real calls fail
            raise NotImplementedError("no vmap for this kernel")
        return double(x)

    op = make_op([Variant("picky", lambda: picky)])
    _user(db, record(op, X, "picky"))
    with pytest.warns(RuntimeWarning, match="variant 'picky' failed on this machine"):
        assert mx.allclose(op(X), X * 2).item()
    assert (op.name, "picky") in dispatch._disabled
    assert mx.allclose(op(X), X * 2).item()
    assert dispatch.choose(op, op.problem(X)).source == "default"


def test_the_fast_path_reuses_only_what_was_checked():
    """A call reuses an earlier call's checked decision only where every argument carries the
    same marks: a new value (even one equal to an old one, as 1 to True), shape or dtype is
    checked again, and rope's new offsets are checked by their own check."""
    x, w = mx.ones((2, 8)), mx.ones((8,))
    mp.rms_norm(x, w, 1e-5)
    with pytest.raises(TypeError, match=r"\[rms_norm\] eps must be a real number"):
        mp.rms_norm(x, w, "1e-5")
    with pytest.raises(ValueError, match=r"\[rms_norm\] weight has shape"):
        mp.rms_norm(x, mx.ones((4,)), 1e-5)
    h = mx.ones((1, 2, 3, 8))
    mp.rope(h, 8, traditional=True, offset=7)
    with pytest.raises(TypeError, match=r"\[rope\] traditional must be a bool"):
        mp.rope(h, 8, traditional=1, offset=7)
    mp.rope(h, 8, offset=8)  # a new offset: served without the problem function
    with pytest.raises(ValueError, match=r"\[rope\] offset must fit in int32"):
        mp.rope(h, 8, offset=2**40)
    calls = len(dispatch._calls)
    for offset in range(50):  # a decoding loop keeps one decision per shape
        mp.rope(h, 8, offset=offset)
    assert len(dispatch._calls) == calls


def test_the_fast_path_marks_each_argument_by_its_annotation():
    """An argument annotated as an array is marked by its shape and dtype; anything else there
    (None, a list, a look-alike with an array's shape and dtype) still reaches the op's own
    error after an array's call was kept."""
    x, w = mx.ones((2, 8)), mx.ones((8,))
    mp.rms_norm(x, w, 1e-5)

    class LookAlike:  # an array's shape and dtype, but not an array
        shape, dtype = x.shape, x.dtype

    for bad in (None, [[1.0] * 8], LookAlike()):
        with pytest.raises((TypeError, ValueError), match=r"\[rms_norm\] x"):
            mp.rms_norm(bad, w, 1e-5)
    kinds = [dispatch._kind(mp.registry.op("rms_norm").signature.parameters[n].annotation)
             for n in ("x", "weight", "eps")]  # fmt: skip
    assert kinds == ["array", "either", "value"]


@pytest.mark.parametrize("name", [o.name for o in mp.registry.ops()])
def test_every_op_refuses_an_array_for_a_value(name):
    """A value's mark is the value itself, so an array there would be kept by identity (and an
    array can change in place): every op's problem function refuses one, or leaves the call to
    MLX's op, which reads the value at each call."""
    o = mp.registry.op(name)
    ex = min(o.presets["quick"], key=lambda e: math.prod(e.shapes[0]))
    args = o.example(ex.shapes, mx.float32, mx.random.key(0), **dict(ex.options))
    for i, param in enumerate(o.params):
        if dispatch._kind(o.signature.parameters[param].annotation) != "value":
            continue
        value = args[i] if isinstance(args[i], (bool, int, float)) else 1
        bad = (*args[:i], mx.array(value), *args[i + 1 :])
        with pytest.raises((TypeError, ValueError)) as e:
            o.problem(*bad)
        assert isinstance(e.value, Unmodelled) or f"[{name}] {param}" in str(e.value)


def test_a_nearest_record_that_kept_the_default_serves_this_problems_default(db):
    """A record that kept its own default says "the default serves", not which variant: a
    problem served through it gets its own default (on the CPU, long attention's memory-safe
    blocked composition rather than the built-in a shorter problem kept)."""
    o = mp.registry.op("flash_attention")

    def problem(length):
        args = o.example(((1, 8, length, 8),), mx.float32, mx.random.key(0), causal=True)
        return o.problem(*args)

    short, long = problem(2048), problem(4096)
    assert o.default(short)[0] == "builtin" and o.default(long)[0] == "blocked"
    kept = {"variant": "builtin", "default_variant": "builtin", "source_hash": ""}
    data = {**record_data(make_op(), X, "default"), "op": o.name, "problem": short.key, **kept}
    _user(db, TuningRecord.from_dict(data))
    d = dispatch.choose(o, long)
    assert d.source == "nearest" and (d.variant, d.params) == o.default(long)


def test_a_bad_rope_offset_gets_the_ops_error_on_the_fast_path():
    h = mx.ones((1, 2, 3, 8))
    mp.rope(h, 8, offset=1)
    for bad, error in (("abc", TypeError), (None, TypeError), (1.5, ValueError)):
        with pytest.raises(error, match=r"\[rope\] offset"):
            mp.rope(h, 8, offset=bad)
