"""The shipped (pretuned) databases: used on their chip, ignored elsewhere, valid records."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_primitives import dispatch
from mlx_primitives.hardware import Chip, detect_chip
from mlx_primitives.problem import parse_dtype, parse_key
from mlx_primitives.registry import op, ops
from mlx_primitives.tuning import db as tdb

H200 = Chip(
    "nvidia", "NVIDIA H200", "hopper", "", "cuda", "sm_90", 132, 150_000_000_000, 4800.0, 16
)


def _shipped():
    return [(slug, tdb.read_json(tdb.shipped_path(slug))) for slug in tdb.shipped_chips()]


def test_shipped_databases_are_valid_and_current():
    shipped = _shipped()
    assert any(slug == "nvidia-h200" for slug, _ in shipped)
    for slug, records in shipped:
        assert records
        for r in records:
            assert r["chip"] == slug
            o = op(r["op"])
            o.variant(r["variant"]).validate(r["params"])
            parse_key(r["problem"], o.dims)
            # Kernel edits make records stale; a shipped database must be re-tuned with them.
            assert not dispatch.is_stale(o, r), f"stale shipped record {r['problem']}"


@pytest.mark.parametrize("o", ops(), ids=lambda o: o.name)
def test_shipped_databases_cover_the_default_preset(o):
    # A preset problem without a record falls to the nearest one or the default; a new preset
    # problem must be tuned on every shipped chip.
    wanted = set()
    for ex in o.presets["default"]:
        args, kwargs = o.example(
            ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options)
        )
        wanted.add(o.problem(*args, **kwargs).key(o.dims))
    for slug, records in _shipped():
        have = {r["problem"] for r in records if r["op"] == o.name}
        assert wanted <= have, f"{slug} lacks {sorted(wanted - have)}"


def test_another_chips_database_is_ignored_here():
    assert detect_chip().slug != "nvidia-h200"
    o = op("rms_norm")
    x, w = mx.ones((16384, 4096), mx.float16), mx.ones((4096,), mx.float16)
    d = dispatch.choose(o, o.problem(x, w, 1e-5))
    assert d.source == "default"


def test_the_chips_own_database_is_used(monkeypatch):
    """Dispatch on an H200 (simulated: detection patched) reads tuning_db/nvidia-h200.json."""
    monkeypatch.setattr(dispatch, "detect_chip", lambda backend=None: H200)
    dispatch.reset()
    records = dict(_shipped())["nvidia-h200"]
    rec = next(r for r in records if r["op"] == "rms_norm" and r["variant"] == "builtin")
    o = op("rms_norm")
    p = parse_key(rec["problem"], o.dims)
    shapes, options = o.case(p.as_dict(o.dims))
    args, kwargs = o.example(shapes, p.dtype, mx.random.key(0), **options)
    d = dispatch.choose(o, o.problem(*args, **kwargs))
    assert (d.source, d.variant, d.chip) == ("pretuned", "builtin", "nvidia-h200")
    # A record of a CUDA kernel cannot serve the CPU back-end: skipped, with the reason.
    kernel = next(r for r in records if op(r["op"]).variant(r["variant"]).is_kernel)
    ko = op(kernel["op"])
    kp = parse_key(kernel["problem"], ko.dims)
    shapes, options = ko.case(kp.as_dict(ko.dims))
    args, kwargs = ko.example(shapes, kp.dtype, mx.random.key(0), **options)
    kd = dispatch.choose(ko, ko.problem(*args, **kwargs))
    assert kd.source != "pretuned" or not ko.variant(kd.variant).is_kernel
    assert "does not run on cpu" in kd.reason or kd.source == "nearest"


@pytest.mark.gpu
def test_pretuned_kernel_serves_on_its_chip():
    if detect_chip().slug not in tdb.shipped_chips():
        pytest.skip(f"no shipped database for {detect_chip().slug}")
    records = tdb.read_json(tdb.shipped_path(detect_chip().slug))
    rec = next(r for r in records if op(r["op"]).variant(r["variant"]).is_kernel)
    o = op(rec["op"])
    p = parse_key(rec["problem"], o.dims)
    shapes, options = o.case(p.as_dict(o.dims))
    args, kwargs = o.example(shapes, p.dtype, mx.random.key(0), **options)
    d = dispatch.explain(o.name, *args, **kwargs)
    assert (d.source, d.variant, d.params, d.chip) == (
        "pretuned",
        rec["variant"],
        rec["params"],
        detect_chip().slug,
    )


def test_a_malformed_shipped_record_costs_only_itself(tmp_path, monkeypatch):
    from mlx_primitives.tuning import db as tdb

    records = dict(_shipped())["nvidia-h200"]
    good = next(r for r in records if r["op"] == "rms_norm" and r["variant"] == "builtin")
    path = tmp_path / "nvidia-h200.json"
    path.write_text(
        json.dumps(
            {
                "format": "mlx-primitives-tuning",
                "schema": 1,
                "records": ["junk", {**good, "params": [1]}, good],
            }
        )
    )
    monkeypatch.setattr(tdb, "shipped_path", lambda chip: path)
    monkeypatch.setattr(dispatch, "detect_chip", lambda backend=None: H200)
    dispatch.reset()
    o = op("rms_norm")
    p = parse_key(good["problem"], o.dims)
    shapes, options = o.case(p.as_dict(o.dims))
    args, kwargs = o.example(shapes, p.dtype, mx.random.key(0), **options)
    with pytest.warns(RuntimeWarning) as caught:
        d = dispatch.choose(o, o.problem(*args, **kwargs))
    messages = " ".join(str(w.message) for w in caught)
    assert "that are not records" in messages and "ignoring a tuning record" in messages
    assert d.source == "pretuned"
