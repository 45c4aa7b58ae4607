"""Recording what an application hits (mp.record, MLXP_RECORD=1), the hits table, and
``mlxp-tune hits`` / ``tune --recorded``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_primitives as mp
from mlx_primitives import dispatch, recording
from mlx_primitives.hardware import detect_chip
from mlx_primitives.patch import MLX_FAST
from mlx_primitives.tuning.cli import main as cli

RMS = "rms_norm|float32|rows=8,dims=512,weight=float32"
SWIGLU = "swiglu|float32|rows=4,dims=256"


def _norm():
    return mp.rms_norm(mx.ones((8, 512)), mx.ones((512,)), 1e-5)


def _gate():
    return mp.swiglu(mx.ones((4, 256)), mx.ones((4, 256)))


def test_calls_are_counted_per_problem_only_while_recording(user_db, open_db):
    _norm()  # served before: its cached entry must take the counting wrapper
    with mp.record():
        for _ in range(5):
            _norm()
        _gate()
        assert recording.counts() == {("rms_norm", RMS): 5, ("swiglu", SWIGLU): 1}
    _norm()
    assert recording.counts() == {}
    # Off again: the dispatcher's one cached call is the plain one (MLX's own function), no
    # counting wrapper.
    assert list(dispatch._calls.values()) == [MLX_FAST["rms_norm"]]
    hits = {h["problem"]: h["calls"] for h in open_db(user_db).hits(detect_chip().slug)}
    assert hits == {RMS: 5, SWIGLU: 1}


def test_counts_add_up_across_blocks_and_processes(user_db, open_db):
    with mp.record():
        for _ in range(3):
            _norm()
    code = "import mlx.core as mx, mlx_primitives as mp\n" + "\n".join(
        ["mp.rms_norm(mx.ones((8, 512)), mx.ones((512,)), 1e-5)"] * 4
    )
    env = {**os.environ, "MLXP_RECORD": "1", "MLXP_TUNING_DB": str(user_db)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    env["MLXP_RECORD"] = "0"  # off: nothing stored
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    with mp.record(str(user_db)):
        _norm()
    assert {h["problem"]: h["calls"] for h in open_db(user_db).hits()} == {RMS: 8}


def test_a_database_from_before_the_hits_table_gets_it(user_db, open_db):
    db = open_db(user_db)
    db.close()
    con = sqlite3.connect(user_db)
    con.execute("DROP TABLE hits")
    con.commit()
    con.close()
    with mp.record():
        _norm()
    assert [h["calls"] for h in open_db(user_db).hits()] == [1]


def test_hits_lists_the_decision_and_tune_recorded_takes_the_costliest(user_db, capsys):
    with mp.record():
        for _ in range(40):
            _norm()
        _gate()
    assert cli(["hits", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["problem"], r["calls"], r["source"]) for r in rows] == [
        (RMS, 40, "default"),
        (SWIGLU, 1, "default"),
    ]
    assert cli(["tune", "--recorded", "--top", "1", "--preset", "quick", "--json"]) in (0, 1)
    tuned = json.loads(capsys.readouterr().out)
    assert [r["problem"] for r in tuned] == [RMS]
    assert cli(["hits", "--json"]) == 0
    sources = {r["problem"]: r["source"] for r in json.loads(capsys.readouterr().out)}
    assert sources == {RMS: "user", SWIGLU: "default"}
    # Nothing left that lacks a record but swiglu: a second run tunes only it.
    assert cli(["tune", "--recorded", "--preset", "quick", "--json"]) in (0, 1)
    assert [r["problem"] for r in json.loads(capsys.readouterr().out)] == [SWIGLU]


@pytest.mark.parametrize(
    "argv", [["tune", "--top", "2"], ["tune", "--recorded", "--top", "0"],
             ["tune", "--recorded", "--op", "rms_norm"]]
)  # fmt: skip
def test_recorded_usage_errors(argv, user_db, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    assert "--recorded" in capsys.readouterr().err


def test_each_call_is_stored_once_in_the_innermost_recording(user_db, tmp_path, open_db):
    inner_db = tmp_path / "inner.sqlite"
    with mp.record():
        for _ in range(3):
            _norm()
        with mp.record(str(inner_db)):
            _norm()
        _norm()
    assert [h["calls"] for h in open_db(user_db).hits()] == [4]
    assert [h["calls"] for h in open_db(inner_db).hits()] == [1]


def test_a_failure_inside_the_block_is_not_replaced_by_the_store(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a database under a file cannot be made

    def run():
        with mp.record(str(blocker / "t.sqlite")):
            _norm()
            raise KeyError("the block's own")

    with pytest.raises(KeyError, match="the block's own"), pytest.warns(RuntimeWarning):
        run()


def test_a_database_that_cannot_store_the_counts_never_stops_the_program(tmp_path):
    """An unreadable database is reported with a warning when a block ends (the dispatch
    ignores it the same way), and when a process recording under MLXP_RECORD exits."""
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_text("garbage")
    stored = pytest.warns(RuntimeWarning, match=r"\[record\] the counts were not stored")
    with stored, mp.record(str(corrupt)):
        _norm()
    script = "import mlx.core as mx, mlx_primitives as mp\nmp.rms_norm(mx.ones((2, 8)), None)"
    env = {**os.environ, "MLXP_RECORD": "1", "MLXP_TUNING_DB": str(corrupt)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "the counts were not stored" in done.stderr


def test_hits_of_another_chip_show_that_chips_decision(user_db, open_db, capsys):
    """`hits --chip` lists what that chip's records decide (here the shipped H200 database's
    kernel for a bfloat16 gate), not this machine's."""
    problem = "swiglu|bfloat16|rows=16384,dims=14336"
    db = open_db()
    db.add_hits("nvidia-h200", {("swiglu", problem): 3})
    db.close()
    assert cli(["hits", "--chip", "nvidia-h200", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["problem"], row["variant"], row["source"]) == (problem, "blocked", "pretuned")
