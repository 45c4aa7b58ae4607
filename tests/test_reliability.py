"""The tuning path under concurrency, crashes, corruption, hostile records and faulty
candidates: the short versions of tests/stress, which run in CI."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives import dispatch
from mlx_primitives.hardware import Chip, detect_chip
from mlx_primitives.registry import Example, Variant
from mlx_primitives.tuning.cli import main
from mlx_primitives.tuning.db import DatabaseError, TuningDB
from mlx_primitives.tuning.tuner import EXIT_HUNG, Budget, Tuner

from .stress.harness import ROOT, check_database, concurrent
from .toy import double, make_op, record

FAST = Budget(trials=64, problem_s=60, bench_s=0.02)


# 1. Concurrency ----------------------------------------------------------------------------


def test_writers_and_readers_share_a_database(tmp_path):
    db = tmp_path / "shared.sqlite"
    results = concurrent(db, writers=3, readers=3, writes=30, read_s=4)
    assert sum(r.get("written", 0) for r in results) == 90
    assert all(r["calls"] > 0 for r in results if "calls" in r)
    check_database(db, problems=16)


# 2. Crash safety ---------------------------------------------------------------------------


def test_killed_tuner_leaves_a_whole_database_and_the_next_run_resumes(tmp_path):
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
            handle = TuningDB(str(db), create=False)
        except DatabaseError:  # not created yet, or being created this moment
            continue
        finished = handle.records()
        handle.close()
        if finished:
            break
    time.sleep(random.uniform(0.0, 1.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    handle = TuningDB(str(db), create=False)
    assert handle.integrity_ok()
    finished = len(handle.records())
    assert 1 <= finished <= 8
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{finished} problems already tuned" in done.stdout
    check_database(db, problems=8)


# 3. Corruption -----------------------------------------------------------------------------


def _tuned_db(path):
    db = TuningDB(str(path))
    op = make_op()
    db.put(record(op, mx.ones((4, 64)), "slow"))
    db.close()


def _sql(path, statement: str) -> None:
    # Closing the connection checkpoints the WAL: the corruption is all in the main file.
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()


def _truncated(path):
    _tuned_db(path)
    _sql(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(os.urandom(20000))


def _foreign(path):
    _sql(path, "CREATE TABLE notes (body TEXT)")


def _newer(path):
    _tuned_db(path)
    _sql(path, "UPDATE meta SET value='2' WHERE key='schema_version'")


def _missing_table(path):
    _tuned_db(path)
    _sql(path, "DROP TABLE records")


CORRUPTIONS = [_truncated, _garbage, _foreign, _newer, _missing_table]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_user_database_warns_once_and_dispatch_falls_back(corrupt, user_db):
    corrupt(user_db)
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
def test_corrupt_user_database_falls_back_to_the_shipped_one(corrupt, user_db, monkeypatch):
    corrupt(user_db)
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
    corrupt, command, user_db, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    TuningDB(str(tmp_path / "src.sqlite")).export(tmp_path / "in.json")
    corrupt(user_db)
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

X = mx.ones((4, 64))
SENTINEL = "/tmp/mlxp-pwned"
HOSTILE = [
    {"variant": f"__import__('os').system('touch {SENTINEL}')"},
    {"variant": "tiled", "params": {"block": f"64; touch {SENTINEL}", "unroll": 1}},
    {"variant": "tiled", "params": {"block": 64, "unroll": 1, "__class__": "x"}},
    {"variant": "tiled", "params": {"block": 10**30, "unroll": 1}},
    {"variant": "tiled", "params": {"block": {"nested": 1}, "unroll": 1}},
    {"variant": "tiled", "params": [64, 1]},
    {"variant": "x" * 100_000},
    {"median_s": "fast"},
    {"median_s": float("nan")},
    {"default_median_s": -1.0},
    {"mlx_version": ["0.32.4"]},
    {"problem": "toy|float32|rows=4,cols=64;DROP TABLE records"},
    {"problem": "toy|float32|rows=4,cols=64" + "," * 10_000},
    {"chip": "../../etc/passwd"},
    {"source_hash": None},
]


@pytest.mark.parametrize("overrides", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_record_is_ignored_with_a_warning(overrides, user_db):
    op = make_op()
    rec = {**record(op, X, "tiled", {"block": 64, "unroll": 1}), **overrides}
    rec["chip"] = overrides.get("chip", rec["chip"])
    db = TuningDB(str(user_db))
    try:
        db.put(rec)
    except Exception:  # some values cannot even be stored; then they cannot do harm either
        return
    db.close()
    dispatch.reset()
    if "chip" in overrides:  # another chip's record: not even read, so nothing to warn of
        d = dispatch.choose(op, op.problem(X))
    else:
        with pytest.warns(RuntimeWarning, match="ignoring"):
            d = dispatch.choose(op, op.problem(X))
    assert d.source == "default"
    assert mx.array_equal(op(X), double(X)).item()
    assert not os.path.exists(SENTINEL)


def test_import_skips_malformed_records(tmp_path, user_db, capsys):
    good = record(
        mp.registry.op("rms_norm"),
        (mx.ones((4, 8)), mx.ones((8,)), 1e-5),
        "eager",
        default_variant="builtin",
    )
    bad = [
        {**good, "variant": "nope"},
        {**good, "params": {"x": 1}},
        {**good, "op": "nope"},
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
    assert "imported 1 records" in out and "skipped 6 malformed records" in err
    assert [r["variant"] for r in TuningDB(str(user_db)).records()] == ["eager"]


# 5. Stale records --------------------------------------------------------------------------


def test_stale_records_are_shown_as_stale_and_retuned(user_db, capsys):
    argv = ["--op", "rms_norm", "--shape", "4x8", "--dtype", "float32", "--preset", "quick"]
    assert main(["tune", *argv]) == 0
    db = TuningDB(str(user_db))
    rec = db.records()[0]
    db.put({**rec, "mlx_version": "0.1.0"})
    capsys.readouterr()
    assert main(["show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["stale"] is True
    x, w = mx.ones((4, 8)), mx.ones((8,))
    assert "stale" in mp.explain("rms_norm", x, w, 1e-5).reason
    assert main(["tune", *argv]) == 0
    assert TuningDB(str(user_db)).records()[0]["mlx_version"] == mx.__version__


# 6. Faulty candidates: hangs and crashes ---------------------------------------------------

FAULTY = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests.toy import make_op, double
from mlx_primitives.registry import Example, Variant
from mlx_primitives.tuning.db import TuningDB
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
print("winner", out.record["variant"])
"""


def test_hung_and_crashing_candidates_are_recorded_and_skipped(tmp_path):
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
    trials = {t["variant"]: t for t in TuningDB(str(db)).trials()}
    assert trials["hangs"]["status"] == "rejected" and "hung" in trials["hangs"]["reason"]
    assert trials["crashes"]["status"] == "rejected"
    assert "did not finish in an earlier run" in trials["crashes"]["reason"]
    assert "winner" in runs[-1].stdout


# 8. Agreement ------------------------------------------------------------------------------


def test_two_runs_agree_where_candidates_tie(tmp_path):
    """Identical candidates are within noise of each other by construction: the fixed order,
    not the measurement, picks among them, so two runs agree."""
    tied = [Variant("same_a", lambda: double), Variant("same_b", lambda: double)]
    winners = []
    for i in range(2):
        op = make_op(tied)
        op._default = lambda p, backend: ("slow", {})  # the tied ones clearly beat the default
        db = TuningDB(str(tmp_path / f"run{i}.sqlite"))
        winners.append(Tuner(db, FAST, seed=i).tune(op, Example(((256, 256),), "float32")).record)
    assert winners[0]["variant"] == winners[1]["variant"]
    assert winners[0]["variant"] in ("default", "tiled", "same_a", "same_b")


def test_an_interrupted_candidate_is_tried_again(tmp_path):
    calls = []

    def interrupt(x):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return double(x)

    op = make_op([Variant("flaky", lambda: interrupt)])
    db = TuningDB(str(tmp_path / "i.sqlite"))
    with pytest.raises(KeyboardInterrupt):
        Tuner(db, FAST).tune(op, Example(((64, 256),), "float32"))
    (trial,) = [t for t in db.trials() if t["variant"] == "flaky"]
    assert trial["reason"] == "interrupted by the user"
    out = Tuner(db, FAST).tune(op, Example(((64, 256),), "float32"))
    assert any(r.candidate.variant == "flaky" and r.status == "ok" for r in out.results)


def test_a_candidate_another_live_tuner_is_measuring_is_left_alone(tmp_path):
    """Two tuners on one database: a pending trial of a live process is not reclaimed, one of
    a process that is gone is rejected."""
    import socket

    op = make_op([Variant("same", lambda: double)])
    db = TuningDB(str(tmp_path / "two.sqlite"))
    key = op.problem(mx.ones((64, 256))).key(op.dims)
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
