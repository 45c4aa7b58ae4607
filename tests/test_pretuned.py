"""The shipped (pretuned) databases: used on their chip, ignored elsewhere, valid records, and
the MLX version rule (a record holds for the MLX minor series it was tuned on)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_primitives import dispatch
from mlx_primitives.hardware import Chip, detect_chip
from mlx_primitives.problem import parse_dtype
from mlx_primitives.registry import op, ops
from mlx_primitives.store import shipped
from mlx_primitives.tuning_record import TuningRecord, mlx_series

H200 = Chip(
    "nvidia", "NVIDIA H200", "hopper", "", "cuda", "sm_90", 132, 150_000_000_000, 4800.0, 16
)


def _shipped() -> dict[str, list[TuningRecord]]:
    return {
        slug: [TuningRecord.from_dict(r) for r in shipped.read(shipped.path(slug))]
        for slug in shipped.chips()
    }


@pytest.fixture
def on_h200(monkeypatch):
    """Dispatch as on an H200 (detection patched) running the MLX series its records name, so
    the test holds whichever MLX the package index served."""
    version = _shipped()["nvidia-h200"][0].mlx_version
    monkeypatch.setattr(dispatch, "detect_chip", lambda backend=None: H200)
    monkeypatch.setattr(mx, "__version__", version)
    dispatch.reset()
    return version


def _call(o, rec: TuningRecord) -> tuple:
    """Arguments of a call of ``o`` with the record's problem."""
    p = rec.problem_of(o)
    shapes, options = o.case(p.as_dict())
    return o.example(shapes, parse_dtype(p.dtype), mx.random.key(0), **options)


def test_shipped_databases_are_valid_and_current():
    """Every shipped record is well formed, fits its op, was tuned from today's kernel sources
    and names one MLX series per file (which MLX is installed does not matter)."""
    databases = _shipped()
    assert "nvidia-h200" in databases
    for slug, records in databases.items():
        assert records
        assert len({mlx_series(r.mlx_version) for r in records}) == 1, slug
        for r in records:
            assert r.chip == slug
            o = op(r.op)
            r.problem_of(o)
            # Kernel edits make records stale; a shipped database must be re-tuned with them.
            assert r.source_hash == o.variant(r.variant).source_hash, f"stale {r.problem}"


# Ops whose default preset the shipped databases do not cover yet, and why. Strict: the entry
# must go in the change that ships their records.
UNTUNED = {
    "quantized_matmul": "#27: 5 of 30 problems tuned on an H100 (time-boxed), none on an H200",
    "gather_mm": "added by #28; not yet tuned on an H100 or an H200",
    "associative_scan": "#30: tuned on an H100, not yet on an H200",
    "linear_scan": "#30: tuned on an H100, not yet on an H200",
    "gated_delta": "#30: tuned on an H100, not yet on an H200",
    "selective_scan": "#30: 3 of 7 problems tuned on an H100 (time-boxed), none on an H200",
    "gather_qmm": "#28: 2 of 15 problems tuned on an H100 (time-boxed), none on an H200",
}


@pytest.mark.parametrize(
    "o",
    [
        pytest.param(o, marks=pytest.mark.xfail(strict=True, reason=UNTUNED[o.name]))
        if o.name in UNTUNED
        else o
        for o in ops()
    ],
    ids=lambda o: o.name,
)
def test_shipped_databases_cover_the_default_preset(o):
    # A preset problem without a record falls to the nearest one or the default; a new preset
    # problem must be tuned on every shipped chip.
    wanted = set()
    for ex in o.presets["default"]:
        args = o.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
        wanted.add(o.problem(*args).key)
    for slug, records in _shipped().items():
        have = {r.problem for r in records if r.op == o.name}
        assert wanted <= have, f"{slug} lacks {sorted(wanted - have)}"


@pytest.mark.cpu
def test_another_chips_database_is_ignored_here():
    assert detect_chip().slug not in shipped.chips()
    o = op("rms_norm")
    x, w = mx.ones((16384, 4096), mx.float16), mx.ones((4096,), mx.float16)
    d = dispatch.choose(o, o.problem(x, w, 1e-5))
    assert d.source == "default"


@pytest.mark.cpu
def test_the_chips_own_database_is_used(on_h200):
    """Dispatch on an H200 (simulated) reads tuning_db/nvidia-h200.json."""
    records = _shipped()["nvidia-h200"]
    rec = next(r for r in records if r.op == "rms_norm" and r.variant == "builtin")
    o = op("rms_norm")
    d = dispatch.choose(o, o.problem(*_call(o, rec)))
    assert (d.source, d.variant, d.chip) == ("pretuned", "builtin", "nvidia-h200")
    # A record of a CUDA kernel cannot serve the CPU back-end: skipped, with the reason.
    kernel = next(r for r in records if op(r.op).variant(r.variant).is_kernel)
    ko = op(kernel.op)
    kd = dispatch.choose(ko, ko.problem(*_call(ko, kernel)))
    assert kd.source != "pretuned" or not ko.variant(kd.variant).is_kernel
    assert "does not run on cpu" in kd.reason or kd.source == "nearest"


@pytest.mark.cpu
def test_shipped_records_of_another_mlx_series_are_not_used(on_h200, monkeypatch):
    """On a newer MLX than the shipped records name, the defaults (MLX's built-ins) serve
    until ``mlxp-tune`` runs; a patch release of the same series keeps them."""
    records = _shipped()["nvidia-h200"]
    rec = next(r for r in records if r.op == "rms_norm" and r.variant == "builtin")
    o = op("rms_norm")
    major, minor = (int(v) for v in on_h200.split(".")[:2])
    for version, source in ((f"{major}.{minor}.99", "pretuned"), (f"{major}.{minor + 1}.0", "")):
        monkeypatch.setattr(mx, "__version__", version)
        dispatch.reset()
        d = dispatch.choose(o, o.problem(*_call(o, rec)))
        if source:
            assert d.source == source
        else:
            assert d.source == "default" and f"tuned with MLX {on_h200}" in d.reason


@pytest.mark.gpu
def test_pretuned_kernel_serves_on_its_chip():
    slug = detect_chip().slug
    if slug not in shipped.chips():
        pytest.skip(f"no shipped database for {slug}")
    rec = next(r for r in _shipped()[slug] if op(r.op).variant(r.variant).is_kernel)
    o = op(rec.op)
    d = dispatch.explain(o.name, *_call(o, rec))
    assert (d.source, d.variant, d.params, d.chip) == ("pretuned", rec.variant, rec.params, slug)


@pytest.mark.cpu
def test_a_malformed_shipped_record_costs_only_itself(tmp_path, monkeypatch, on_h200):
    records = _shipped()["nvidia-h200"]
    good = next(r for r in records if r.op == "rms_norm" and r.variant == "builtin").to_dict()
    path = tmp_path / "nvidia-h200.json"
    body = {
        "format": shipped.FORMAT,
        "schema": 1,
        "records": ["junk", {**good, "params": [1]}, good],
    }
    path.write_text(json.dumps(body))
    monkeypatch.setattr(shipped, "path", lambda chip: path)
    dispatch.reset()
    o = op("rms_norm")
    with pytest.warns(RuntimeWarning) as caught:
        d = dispatch.choose(o, o.problem(*_call(o, TuningRecord.from_dict(good))))
    messages = " ".join(str(w.message) for w in caught)
    assert "that is not a record" in messages and "ignoring a record of" in messages
    assert d.source == "pretuned"
