"""The tuning database: records, trials, export/import, versions, broken files."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mlx_primitives.tuning import db as tdb
from mlx_primitives.tuning.db import DatabaseError, TuningDB

from .toy import make_op, record


def _rec(**kw):
    import mlx.core as mx

    op = make_op()
    return record(op, mx.ones((4, 64)), "tiled", {"block": 64, "unroll": 1}, **kw)


def test_put_replaces_the_record_for_a_problem(tmp_path):
    db = TuningDB(str(tmp_path / "a.sqlite"))
    db.put(_rec(median_s=3e-5))
    db.put(_rec(median_s=2e-5))
    recs = db.records()
    assert len(recs) == 1 and recs[0]["median_s"] == 2e-5
    assert recs[0]["params"] == {"block": 64, "unroll": 1}
    assert db.integrity_ok()


def test_records_filter_by_chip_and_op(tmp_path):
    db = TuningDB(str(tmp_path / "a.sqlite"))
    db.put(_rec(chip="a"))
    db.put(_rec(chip="b"))
    db.put(_rec(chip="b", op="other"))
    assert len(db.records(chip="b")) == 2
    assert len(db.records(chip="b", op="toy")) == 1
    assert db.clear(chip="b") == 2
    assert [r["chip"] for r in db.records()] == ["a"]


def test_wal_and_schema_version(tmp_path):
    path = tmp_path / "a.sqlite"
    TuningDB(str(path))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"


def test_newer_schema_is_refused_with_advice(tmp_path):
    path = tmp_path / "a.sqlite"
    TuningDB(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    with pytest.raises(DatabaseError, match="schema version 99"):
        TuningDB(str(path))


@pytest.mark.parametrize("content", [b"garbage" * 100, b"SQLite format 3\x00" + b"\x01" * 50])
def test_garbage_file_is_a_database_error(tmp_path, content):
    path = tmp_path / "a.sqlite"
    path.write_bytes(content)
    with pytest.raises(DatabaseError):
        TuningDB(str(path))
    assert path.read_bytes() == content  # never overwritten


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "a.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    with pytest.raises(DatabaseError, match="not a tuning database"):
        TuningDB(str(path))


def test_missing_file_with_create_false(tmp_path):
    with pytest.raises(DatabaseError, match="no tuning database"):
        TuningDB(str(tmp_path / "none.sqlite"), create=False)
    assert not (tmp_path / "none.sqlite").exists()


def test_export_import_round_trip_is_sorted_text(tmp_path):
    a = TuningDB(str(tmp_path / "a.sqlite"))
    a.put(_rec(chip="z"))
    a.put(_rec(chip="a"))
    out = tmp_path / "export.json"
    assert a.export(out) == 2
    text = out.read_text()
    assert text.index('"chip": "a"') < text.index('"chip": "z"')
    assert len(text.splitlines()) == 4  # header, one line per record, footer
    b = TuningDB(str(tmp_path / "b.sqlite"))
    for r in tdb.read_json(out):
        b.put(r)
    assert b.records() == a.records()


@pytest.mark.parametrize(
    "body,message",
    [
        ("not json", "not a readable tuning export"),
        ('{"format": "other"}', "not an mlx-primitives tuning export"),
        ('{"format": "mlx-primitives-tuning", "schema": 2, "records": []}', "schema 2"),
        ('{"format": "mlx-primitives-tuning", "schema": 1, "records": {}}', "no list of records"),
    ],
)
def test_read_json_rejects_bad_exports(tmp_path, body, message):
    path = tmp_path / "x.json"
    path.write_text(body)
    with pytest.raises(DatabaseError, match=message):
        tdb.read_json(path)


def test_trials_keep_rejections_with_reasons(tmp_path):
    db = TuningDB(str(tmp_path / "a.sqlite"))
    trial = {"op": "toy", "problem": "p", "variant": "nan", "params": {}, "status": "pending"}
    tid = db.add_trial("chip", trial)
    assert db.trials(status="pending")[0]["id"] == tid
    db.finish_trial(tid, {**trial, "status": "rejected", "reason": "NaN"})
    (t,) = db.trials()
    assert t["status"] == "rejected" and t["reason"] == "NaN"


def test_url_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXP_TUNING_DB", str(tmp_path / "x.sqlite"))
    assert tdb.default_user_url() == f"sqlite:///{tmp_path / 'x.sqlite'}"
    monkeypatch.setenv("MLXP_TUNING_DB", "sqlite:////tmp/y.sqlite")
    assert tdb.default_user_url() == "sqlite:////tmp/y.sqlite"
    monkeypatch.delenv("MLXP_TUNING_DB")
    assert tdb.default_user_url().endswith("mlx-primitives/tuning.sqlite")
    assert json.dumps(tdb.url_path("sqlite:////tmp/y.sqlite").as_posix()) == '"/tmp/y.sqlite"'
