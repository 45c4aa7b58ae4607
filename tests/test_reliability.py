"""The tuning path under concurrency, crashes, corruption, hostile records and faulty
candidates: the short versions of tests/stress, which run in CI."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import warnings

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives import dispatch, registry
from mlx_primitives.hardware import Chip, detect_chip
from mlx_primitives.registry import Example, Variant
from mlx_primitives.store import shipped
from mlx_primitives.store.database import SCHEMA_VERSION, DatabaseError
from mlx_primitives.tuning.cli import main
from mlx_primitives.tuning.tuner import EXIT_HUNG, Budget, Tuner
from mlx_primitives.tuning_record import RecordError, TuningRecord

from .stress.harness import ROOT, check_database, concurrent
from .toy import double, make_op, record, record_data

FAST = Budget(trials=64, problem_s=60, bench_s=0.02)


# 1. Concurrency ----------------------------------------------------------------------------


def test_writers_and_readers_share_a_database(tmp_path):
    db = tmp_path / "shared.sqlite"
    results = concurrent(db, writers=3, readers=3, writes=30, read_s=4)
    assert sum(r.get("written", 0) for r in results) == 90
    assert all(r["calls"] > 0 for r in results if "calls" in r)
    check_database(db, problems=16)


# 2. Crash safety ---------------------------------------------------------------------------


def test_killed_tuner_leaves_a_whole_database_and_the_next_run_resumes(tmp_path, open_db):
    db = tmp_path / "crash.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "mlx_primitives.tuning.cli",
        "tune",
        "--preset",
        "quick",
        "--op",
        "rms_norm",
        "--op",
        "layer_norm",
        "--db",
        str(db),
    ]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill it once it has finished at least one problem and is busy with the next.
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            handle = open_db(db, create=False)
        except DatabaseError:  # not created yet, or being created this moment
            continue
        finished = handle.records()
        handle.close()
        if finished:
            break
    time.sleep(random.uniform(0.0, 1.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    handle = open_db(db, create=False)
    assert handle.integrity_ok()
    finished = len(handle.records())
    assert 1 <= finished <= 8
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{finished} problems already tuned" in done.stdout
    check_database(db, problems=8)


# 3. Corruption -----------------------------------------------------------------------------


def _tuned_db(path, open_db):
    db = open_db(path)
    db.put(record(make_op(), mx.ones((4, 64)), "slow"))
    db.close()


def _sql(path, statement: str) -> None:
    # Closing the connection checkpoints the WAL: the corruption is all in the main file.
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()


def _truncated(path, open_db):
    _tuned_db(path, open_db)
    _sql(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path, open_db=None):
    path.write_bytes(os.urandom(20000))


def _foreign(path, open_db):
    _sql(path, "CREATE TABLE notes (body TEXT)")


def _newer(path, open_db):
    _tuned_db(path, open_db)
    _sql(path, "UPDATE meta SET value='2' WHERE key='schema_version'")


def _missing_table(path, open_db):
    _tuned_db(path, open_db)
    _sql(path, "DROP TABLE records")


CORRUPTIONS = [_truncated, _garbage, _foreign, _newer, _missing_table]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_user_database_warns_once_and_dispatch_falls_back(corrupt, user_db, open_db):
    corrupt(user_db, open_db)
    before = user_db.read_bytes()
    code = """
import warnings, mlx.core as mx, mlx_primitives as mp
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for rows in (3, 64, 1000):
        x, w = mx.random.normal((rows, 32)), mx.ones((32,))
        y = mp.rms_norm(x, w, 1e-5)
        assert mx.allclose(y, x * mx.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5)).item()
print(len([w for w in caught if "tuning database" in str(w.message)]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "MLXP_TUNING_DB": str(user_db)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert user_db.read_bytes() == before


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_user_database_falls_back_to_the_shipped_one(
    corrupt, user_db, open_db, monkeypatch
):
    corrupt(user_db, open_db)
    h200 = Chip("nvidia", "NVIDIA H200", "hopper", "", "cuda", "sm_90", 132, None, None, 16)
    monkeypatch.setattr(dispatch, "detect_chip", lambda backend=None: h200)
    x, w = mx.ones((16384, 4096), mx.float16), mx.ones((4096,), mx.float16)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning database"):
        d = mp.explain("rms_norm", x, w, 1e-5)
    assert d.source == "pretuned"


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize(
    "command",
    [
        ["tune", "--op", "rms_norm", "--shape", "4x8", "--dtype", "float32", "--preset", "quick"],
        ["show"],
        ["doctor"],
        ["export", "out.json"],
        ["import", "in.json"],
    ],
)
def test_cli_explains_a_corrupt_database_without_touching_it(
    corrupt, command, user_db, open_db, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    shipped.write(tmp_path / "in.json", [])
    corrupt(user_db, open_db)
    before = user_db.read_bytes()
    code = main(command)
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    assert user_db.read_bytes() == before
    text = out + err
    assert "unusable" in text or "error:" in text
    assert "mlxp-tune clear" in text


def test_clear_is_the_one_command_that_moves_a_corrupt_database(user_db, capsys):
    _garbage(user_db)
    assert main(["clear"]) == 0
    assert "moved it to" in capsys.readouterr().out
    assert not user_db.exists()
    assert (
        main(
            [
                "tune",
                "--op",
                "rms_norm",
                "--shape",
                "4x8",
                "--dtype",
                "float32",
                "--preset",
                "quick",
            ]
        )
        == 0
    )


# 4. Hostile records ------------------------------------------------------------------------
#
# Every hostile record has one fate, asserted: a malformed one is refused on write (building
# the record raises RecordError naming the field); a well-formed one that does not fit the op
# it names is stored (the store cannot judge it) but ignored on read with a warning saying
# why. Either way `mlxp-tune import` skips it saying why, and where no write checked it (a
# shipped export, a row another program wrote) dispatch ignores it with a warning; the call
# runs the default.

X = mx.ones((4, 64))
TILED = {"block": 64, "unroll": 1}
SENTINEL = "/tmp/mlxp-pwned"
MISSING = object()  # an override that removes the field


def _hostile(toy, overrides: dict) -> dict:
    """The JSON form of a good record of ``toy(X)`` (served by the tiled variant), with
    ``overrides``."""
    data = record_data(toy, X, "tiled", TILED)
    for key, value in overrides.items():
        if value is MISSING:
            del data[key]
        else:
            data[key] = value
    return data


# Well formed, so the store keeps them, but not fitting the toy op: ignored on read, saying why.
UNFIT = {
    "code-as-variant": (
        {"variant": f"__import__('os').system('touch {SENTINEL}')"},
        "no variant named",
    ),
    "shell-in-param": (
        {"params": {"block": f"64; touch {SENTINEL}", "unroll": 1}},
        re.escape(f"block='64; touch {SENTINEL}' is not one of [32, 64, 128]"),
    ),
    "extra-param": ({"params": {**TILED, "__class__": "x"}}, "do not match the space"),
    "missing-param": ({"params": {"block": 64}}, "do not match the space"),
    "huge-param": (
        {"params": {"block": 10**30, "unroll": 1}},
        re.escape(f"block={10**30} is not one of"),
    ),
    "bool-for-int": (
        {"params": {"block": 64, "unroll": True}},
        re.escape("unroll=True is not one of [1, 2]"),
    ),
    "float-for-int": (
        {"params": {"block": 64.0, "unroll": 1}},
        re.escape("block=64.0 is not one of"),
    ),
    "unknown-default": ({"default_variant": "nope"}, "no variant named 'nope'"),
    "default-params": ({"default_params": {"x": 1}}, "do not match the space"),
    "sql-in-problem": (
        {"problem": "toy|float32|rows=4,cols=64;DROP TABLE records"},
        "has a value outside",
    ),
    "problem-of-another-op": ({"problem": "rms_norm|float32|rows=4,cols=64"}, "is not of toy"),
    "missing-dim": ({"problem": "toy|float32|rows=4"}, "does not name the dims"),
    "unbucketed-dim": ({"problem": "toy|float32|rows=3,cols=64"}, "rows=3 is not a power of two"),
    "unknown-dtype": ({"problem": "toy|int4|rows=4,cols=64"}, "unknown dtype 'int4'"),
    "malformed-problem": ({"problem": "toy"}, "malformed problem key"),
}
# Malformed: refused on write, naming the field; where no write checked them, ignored on read.
MALFORMED = {
    "nested-param": (
        {"params": {"block": {"nested": 1}, "unroll": 1}},
        "params is not a mapping of names to scalar values",
    ),
    "params-list": ({"params": [64, 1]}, "params is not a mapping of names to scalar values"),
    "null-default-params": ({"default_params": None}, "default_params is not a mapping"),
    "huge-variant": (
        {"variant": "x" * 100_000},
        "variant is not a string of at most 128 characters",
    ),
    "variant-one-over": (
        {"variant": "t" * 129},
        "variant is not a string of at most 128 characters",
    ),
    "huge-problem": (
        {"problem": "toy|float32|rows=4,cols=64" + "," * 10_000},
        "problem is not a string of at most 512 characters",
    ),
    "huge-created-at": (
        {"created_at": "2026-11-26T00:00:00+00:00" + " " * 40},
        "created_at is not a string of at most 64 characters",
    ),
    "text-time": ({"median_s": "fast"}, "median_s is not a number"),
    "bool-time": ({"median_s": True}, "median_s is not a number"),
    "nan-time": ({"median_s": float("nan")}, "median_s is not a finite non-negative number"),
    "inf-spread": ({"spread_s": float("inf")}, "spread_s is not a finite non-negative number"),
    "negative-time": (
        {"default_median_s": -1.0},
        "default_median_s is not a finite non-negative number",
    ),
    "null-error": ({"error": None}, "error is not a number"),
    "list-version": ({"mlx_version": ["0.32.4"]}, "mlx_version is not a string"),
    "int-version": ({"package_version": 1}, "package_version is not a string"),
    "null-hash": ({"source_hash": None}, "source_hash is not a string"),
    "missing-field": ({"error": MISSING}, re.escape("missing fields ['error']")),
}
# Malformed, and naming another chip or op: refused on write, and never read for the toy on
# this chip (not even to warn).
NOT_OURS = {
    "huge-op": ({"op": "toy" + "y" * 62}, "op is not a string of at most 64 characters"),
    "path-as-chip": (
        {"chip": "../../etc/passwd"},
        re.escape("chip '../../etc/passwd' is not a slug"),
    ),
    "name-as-chip": ({"chip": "NVIDIA H200"}, "chip 'NVIDIA H200' is not a slug"),
}
HOSTILE = (
    [pytest.param(o, None, why, id=k) for k, (o, why) in UNFIT.items()]
    + [pytest.param(o, why, why, id=k) for k, (o, why) in MALFORMED.items()]
    + [pytest.param(o, why, None, id=k) for k, (o, why) in NOT_OURS.items()]
)


def _default_serves(toy, warning: str | None) -> None:
    """Dispatch of ``toy(X)`` falls back to the default, warning with ``warning`` (or with no
    warning at all, for a record it never reads)."""
    dispatch.reset()
    if warning is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            d = dispatch.choose(toy, toy.problem(X))
    else:
        with pytest.warns(RuntimeWarning, match=warning):
            d = dispatch.choose(toy, toy.problem(X))
    assert (d.source, d.variant, d.params) == ("default", "default", {})
    assert mx.array_equal(toy(X), double(X)).item()
    assert not os.path.exists(SENTINEL)


def _ship(monkeypatch, path, entries: list) -> None:
    """``entries`` as this chip's shipped database."""
    body = {"format": shipped.FORMAT, "schema": SCHEMA_VERSION, "records": entries}
    path.write_text(json.dumps(body))
    slug = detect_chip().slug
    monkeypatch.setattr(shipped, "path", lambda chip: path if chip == slug else None)


@pytest.mark.parametrize("store", ["user", "pretuned"])
def test_the_record_the_hostile_cases_start_from_is_served(store, db, tmp_path, monkeypatch):
    """Without the hostile change the record serves: what the cases below see is their
    change, not a record that was never usable."""
    toy = make_op()
    data = _hostile(toy, {})
    if store == "user":
        db.put(TuningRecord.from_dict(data))
    else:
        _ship(monkeypatch, tmp_path / "shipped.json", [data])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = dispatch.choose(toy, toy.problem(X))
    assert (d.source, d.variant, d.params) == (store, "tiled", TILED)
    assert mx.array_equal(toy(X), double(X)).item()


@pytest.mark.parametrize("overrides,refused,ignored", HOSTILE)
def test_hostile_record_is_refused_on_write_or_ignored_on_read(
    overrides, refused, ignored, db, tmp_path, monkeypatch, capsys
):
    toy = make_op()
    data = _hostile(toy, overrides)
    # Written: refused if malformed; else stored, and ignored by dispatch with a warning.
    if refused is not None:
        with pytest.raises(RecordError, match=refused):
            TuningRecord.from_dict(data)
    else:
        rec = TuningRecord.from_dict(data)
        with pytest.raises(RecordError, match=ignored):
            rec.problem_of(toy)
        db.put(rec)
        assert db.records() == [rec]  # the store keeps it (a stray SQL string did nothing)
        _default_serves(toy, f"ignoring a user tuning record: .*{ignored}")
        assert db.clear() == 1
    # Imported: skipped, saying why.
    monkeypatch.setitem(registry._REGISTRY, "toy", toy)
    export = tmp_path / "in.json"
    _ship(monkeypatch, export, [data])
    capsys.readouterr()
    assert main(["import", str(export)]) == 0
    out, err = capsys.readouterr()
    assert "imported 0 records" in out
    assert re.search(f"skipped 1 malformed records, e.g.: .*{refused or ignored}", err), err
    assert db.records() == []
    # Shipped (no write checked it): ignored with a warning, unless it is not even read here.
    _default_serves(toy, None if ignored is None else f"ignoring a .*{ignored}")


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("variant", "x" * 100_000, "variant is not a string of at most 128 characters"),
        ("problem", "toy|float32|rows=4,cols=64" + "," * 600, "problem is not a string of at"),
        ("median_s", -1.0, "median_s is not a finite non-negative number"),
        ("median_s", "fast", "median_s is not a number"),
        ("params", "[64, 1]", "params is not a mapping of names to scalar values"),
        ("params", "{", "params is not JSON"),
        ("default_params", "null", "default_params is not a mapping"),
    ],
)
def test_hostile_row_written_behind_the_stores_back_is_ignored_with_a_warning(
    column, value, message, db, user_db
):
    """Another program (or an older version) wrote a row that no record check saw."""
    toy = make_op()
    row = {**record(toy, X, "tiled", TILED).to_row(), column: value}
    conn = sqlite3.connect(user_db)
    conn.execute(
        f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )
    conn.commit()
    conn.close()
    _default_serves(toy, rf"ignoring row \d+ of .*: {message}")


def test_a_record_of_another_chip_is_kept_but_never_used_here(db, tmp_path, monkeypatch):
    """Another chip's records, in the user database or in this chip's shipped file, are not
    used on this chip, not even for a nearby problem; the same record of this chip is."""
    toy = make_op()
    here = record(toy, X, "tiled", TILED)
    other = next(c for c in shipped.chips() if c != here.chip)
    theirs = [
        dataclasses.replace(here, chip=other),
        record(toy, mx.ones((8, 64)), "tiled", TILED, chip=other),  # nearest, were it ours
    ]
    for rec in theirs:
        db.put(rec)
    assert db.records(chip=other) == sorted(theirs, key=lambda r: r.problem)
    _ship(monkeypatch, tmp_path / "shipped.json", [r.to_dict() for r in theirs])
    _default_serves(toy, None)
    assert "no usable tuning record" in dispatch.choose(toy, toy.problem(X)).reason

    db.put(here)
    dispatch.reset()
    d = dispatch.choose(toy, toy.problem(X))
    assert (d.source, d.variant, d.chip) == ("user", "tiled", here.chip)


def test_a_shipped_entry_that_is_not_a_record_costs_only_itself(tmp_path, monkeypatch):
    toy = make_op()
    good = _hostile(toy, {})
    _ship(monkeypatch, tmp_path / "shipped.json", ["junk", None, [good], good])
    with pytest.warns(RuntimeWarning, match="ignoring an entry of .*shipped.json that is not a"):
        d = dispatch.choose(toy, toy.problem(X))
    assert (d.source, d.variant, d.params) == ("pretuned", "tiled", TILED)


def test_a_shipped_file_that_is_not_an_export_is_ignored_with_a_warning(tmp_path, monkeypatch):
    toy = make_op()
    _ship(monkeypatch, tmp_path / "shipped.json", [_hostile(toy, {})])
    (tmp_path / "shipped.json").write_text('{"format": "mlx-primitives-tuning", "schema": 99}')
    _default_serves(toy, "ignoring the shipped tuning database .*schema 99")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"op": "rms_norm"}, "names op 'rms_norm', not 'toy'"),
        ({"problem": "rms_norm|float32|rows=4,cols=64"}, "is not of toy"),
        ({"variant": "nope"}, "no variant named 'nope'"),
        ({"params": {"block": 64, "unroll": 3}}, re.escape("unroll=3 is not one of [1, 2]")),
    ],
)
def test_a_record_fits_only_the_op_it_names(overrides, message):
    toy = make_op()
    rec = TuningRecord.from_dict(_hostile(toy, overrides))  # well formed
    with pytest.raises(RecordError, match=message):
        rec.problem_of(toy)
    assert record(toy, X, "tiled", TILED).problem_of(toy) == toy.problem(X)


def test_import_skips_malformed_records(tmp_path, db, capsys):
    good = record_data(
        mp.registry.op("rms_norm"),
        (mx.ones((4, 8)), mx.ones((8,)), 1e-5),
        "eager",
        default_variant="builtin",
    )
    bad = [
        {**good, "op": "nope"},
        {**good, "variant": "nope"},
        {**good, "params": {"x": 1}},
        {**good, "median_s": "fast"},
        "junk",
        None,
    ]
    path = tmp_path / "in.json"
    path.write_text(
        json.dumps({"format": "mlx-primitives-tuning", "schema": 1, "records": [good, *bad]})
    )
    assert main(["import", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "imported 1 records" in out
    assert "skipped 6 malformed records, e.g.: unknown op 'nope'" in err
    assert db.records() == [TuningRecord.from_dict(good)]


# 5. Stale records --------------------------------------------------------------------------


def test_stale_records_are_shown_as_stale_and_retuned(db, capsys):
    """A record holds for the MLX minor series it was tuned on: another patch release keeps
    it, another series makes it stale and the next `mlxp-tune` re-tunes it."""
    major, minor, *_ = mx.__version__.split(".")
    argv = ["--op", "rms_norm", "--shape", "4x8", "--dtype", "float32", "--preset", "quick"]
    assert main(["tune", *argv]) == 0
    (rec,) = db.records()
    x, w = mx.ones((4, 8)), mx.ones((8,))

    db.put(dataclasses.replace(rec, mlx_version=f"{major}.{minor}.999"))
    dispatch.reset()
    assert mp.explain("rms_norm", x, w, 1e-5).source == "user"
    capsys.readouterr()
    assert main(["tune", *argv]) == 0
    assert "1 problems already tuned" in capsys.readouterr().out

    db.put(dataclasses.replace(rec, mlx_version=f"{major}.{int(minor) + 1}.0"))
    assert main(["show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["stale"] is True
    dispatch.reset()
    d = mp.explain("rms_norm", x, w, 1e-5)
    assert d.source == "default" and "stale: tuned with MLX" in d.reason
    assert main(["tune", *argv]) == 0
    assert "already tuned" not in capsys.readouterr().out
    assert db.records()[0].mlx_version == mx.__version__


# 6. Faulty candidates: hangs and crashes ---------------------------------------------------

FAULTY = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests.toy import make_op, double
from mlx_primitives.registry import Example, Variant
from mlx_primitives.store.database import TuningDB
from mlx_primitives.tuning.tuner import Budget, Tuner

def hang(x):
    time.sleep(600)
    return double(x)

def crash(x):
    os._exit(139)  # as a segfault in a kernel would

faults = [Variant("hangs", lambda: hang), Variant("crashes", lambda: crash)]
op = make_op(faults)
tuner = Tuner(TuningDB(sys.argv[1]), Budget(64, 60, 0.02), candidate_timeout_s=2.0)
out = tuner.tune(op, Example(((64, 256),), "float32"))
print("winner", out.record.variant)
"""


def test_hung_and_crashing_candidates_are_recorded_and_skipped(tmp_path, open_db):
    db = tmp_path / "faulty.sqlite"
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY.format(root=str(ROOT)))

    def run():
        return subprocess.run(
            [sys.executable, str(script), str(db)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    first = run()
    # The first faulty candidate stops the run: a hang with EXIT_HUNG, a crash with its code.
    assert first.returncode in (EXIT_HUNG, 139), first.stderr[-2000:]
    runs = [first]
    while runs[-1].returncode != 0 and len(runs) < 4:
        runs.append(run())
    assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
    assert len(runs) == 3  # one stop per faulty candidate, then a clean finish
    trials = {t["variant"]: t for t in open_db(db, create=False).trials()}
    assert trials["hangs"]["status"] == "rejected" and "hung" in trials["hangs"]["reason"]
    assert trials["crashes"]["status"] == "rejected"
    assert "did not finish in an earlier run" in trials["crashes"]["reason"]
    assert "winner" in runs[-1].stdout


# 8. Agreement ------------------------------------------------------------------------------


def test_two_runs_agree_where_candidates_tie(tmp_path, open_db):
    """Identical candidates are within noise of each other by construction: the fixed order,
    not the measurement, picks among them, so two runs agree."""
    tied = [Variant("same_a", lambda: double), Variant("same_b", lambda: double)]
    winners = []
    for i in range(2):
        op = make_op(tied)
        op._default = lambda p, backend: ("slow", {})  # the tied ones clearly beat the default
        db = open_db(tmp_path / f"run{i}.sqlite")
        winners.append(Tuner(db, FAST, seed=i).tune(op, Example(((256, 256),), "float32")).record)
    assert winners[0].variant == winners[1].variant
    # Everything here but the default ("slow") and the faulty ones computes y = 2x as fast.
    assert winners[0].variant in ("default", "tiled", "gpu_only", "same_a", "same_b")


def test_an_interrupted_candidate_is_tried_again(db):
    calls = []

    def interrupt(x):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return double(x)

    op = make_op([Variant("flaky", lambda: interrupt)])
    with pytest.raises(KeyboardInterrupt):
        Tuner(db, FAST).tune(op, Example(((64, 256),), "float32"))
    (trial,) = [t for t in db.trials() if t["variant"] == "flaky"]
    assert trial["reason"] == "interrupted by the user"
    out = Tuner(db, FAST).tune(op, Example(((64, 256),), "float32"))
    assert any(r.candidate.variant == "flaky" and r.status == "ok" for r in out.results)


def test_a_candidate_another_live_tuner_is_measuring_is_left_alone(db):
    """Two tuners on one database: a pending trial of a live process is not reclaimed, one of
    a process that is gone is rejected."""
    import socket

    op = make_op([Variant("same", lambda: double)])
    key = op.problem(mx.ones((64, 256))).key
    host = socket.gethostname()
    live = {
        "op": "toy",
        "problem": key,
        "variant": "same",
        "params": {},
        "status": "pending",
        "reason": f"started by pid {os.getppid()} on {host}",
    }  # our parent: alive
    dead = {**live, "variant": "nan", "reason": f"started by pid 999999 on {host}"}
    live_id = db.add_trial(detect_chip().slug, live)
    db.add_trial(detect_chip().slug, dead)
    out = Tuner(db, FAST).tune(op, Example(((64, 256),), "float32"))
    by_variant = {r.candidate.variant: r for r in out.results}
    assert "did not finish" in by_variant["nan"].reason
    assert by_variant["same"].status == "ok"  # measured here too, not taken for dead
    assert next(t for t in db.trials() if t["id"] == live_id)["status"] == "pending"


def test_a_candidate_pending_on_another_host_is_taken_for_crashed(db):
    """A pending trial of another host's worker, however young: this tuner holds the problem's
    lease, which that worker has lost, so it died in it or is no longer wanted; the candidate
    is rejected, not run again (it may crash this worker too)."""
    op = make_op([Variant("same", lambda: double)])
    key = op.problem(mx.ones((64, 256))).key
    elsewhere = {"op": "toy", "problem": key, "variant": "same", "params": {},
                 "status": "pending", "reason": "started by pid 1 on some-other-host"}  # fmt: skip
    db.add_trial(detect_chip().slug, elsewhere)
    out = Tuner(db, FAST).tune(op, Example(((64, 256),), "float32"))
    (same,) = [r for r in out.results if r.candidate.variant == "same"]
    assert same.status == "rejected" and "did not finish" in same.reason
