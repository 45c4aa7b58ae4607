"""The tuning database and the shipped exports: records, trials, export/import, versions,
broken files."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import mlx.core as mx
import pytest

from mlx_primitives.store import database, shipped
from mlx_primitives.store.database import SCHEMA_VERSION, DatabaseError
from mlx_primitives.tuning_record import FIELDS, RecordError, TuningRecord

from .toy import make_op, record

TILED = {"block": 64, "unroll": 1}


def _rec(**kw) -> TuningRecord:
    return record(make_op(), mx.ones((4, 64)), "tiled", TILED, **kw)


def _insert_row(path, **overrides) -> None:
    """Write a records row with raw SQL, as another program (or an older version) might: no
    check stands between ``overrides`` and the file."""
    row = {**_rec().to_row(), **overrides}
    conn = sqlite3.connect(path)
    conn.execute(
        f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )
    conn.commit()
    conn.close()


def test_put_replaces_the_record_for_a_problem(db):
    db.put(_rec(median_s=3e-5))
    db.put(_rec(median_s=2e-5))
    (rec,) = db.records()
    assert isinstance(rec, TuningRecord)
    assert rec == _rec(median_s=2e-5)
    assert rec.params == TILED
    assert db.integrity_ok()


def test_put_takes_only_records(db):
    with pytest.raises(TypeError, match="expected a TuningRecord, got dict"):
        db.put(_rec().to_dict())
    assert db.records() == []


def test_records_filter_by_chip_and_op(db):
    db.put(_rec(chip="a"))
    db.put(_rec(chip="b"))
    db.put(_rec(chip="b", op="other"))
    assert len(db.records(chip="b")) == 2
    assert [r.op for r in db.records(chip="b", op="toy")] == ["toy"]
    assert db.clear(chip="b") == 2
    assert [r.chip for r in db.records()] == ["a"]


def test_record_round_trips_through_json_and_rows():
    rec = _rec()
    assert TuningRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    row = rec.to_row()
    assert row["params"] == '{"block": 64, "unroll": 1}'  # sorted JSON text
    assert TuningRecord.from_row(row) == rec
    assert tuple(rec.to_dict()) == FIELDS


# The longest text each field holds (the database's column widths, for engines that enforce
# them); a change here is a schema change.
TEXT_LIMITS = {
    "chip": 128,
    "op": 64,
    "problem": 512,
    "variant": 128,
    "default_variant": 128,
    "mlx_version": 64,
    "package_version": 64,
    "source_hash": 64,
    "created_at": 64,
}


@pytest.mark.parametrize("name,limit", TEXT_LIMITS.items())
def test_text_fields_are_limited(name, limit, db):
    at_limit = dataclasses.replace(_rec(), **{name: "a" * limit})
    db.put(at_limit)  # stored whole
    assert db.records() == [at_limit]
    with pytest.raises(RecordError, match=f"^{name} is not a string of at most {limit} char"):
        dataclasses.replace(_rec(), **{name: "a" * (limit + 1)})
    assert database._records.c[name].type.length == limit


def test_every_text_field_is_limited():
    texts = {f.name for f in dataclasses.fields(TuningRecord) if f.type == "str"}
    assert texts == set(TEXT_LIMITS)


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _rec().variant = "slow"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"variant": "x" * 129}, "variant is not a string of at most 128 characters"),
        ({"chip": "Not A Slug"}, "chip 'Not A Slug' is not a slug"),
        ({"median_s": -1.0}, "median_s is not a finite non-negative number"),
        ({"params": "{"}, "params is not JSON"),
        ({"params": "[64, 1]"}, "params is not a mapping of names to scalar values"),
        ({"default_params": '{"a": {"b": 1}}'}, "default_params is not a mapping"),
    ],
)
def test_a_malformed_row_is_left_out_with_a_warning(db, user_db, overrides, message):
    db.put(_rec(chip="other-chip"))
    _insert_row(user_db, **overrides)
    with pytest.warns(RuntimeWarning, match=rf"ignoring row \d+ of .*: {message}"):
        records = db.records()
    assert [r.chip for r in records] == ["other-chip"]  # the good one is still read


def test_wal_and_schema_version(db, user_db):
    conn = sqlite3.connect(user_db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert version == str(SCHEMA_VERSION) == db.meta("schema_version")
    conn.close()


def test_newer_schema_is_refused_with_advice(open_db, user_db):
    open_db().close()
    conn = sqlite3.connect(user_db)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseError, match="schema version 99.*mlxp-tune doctor"):
        open_db()


@pytest.mark.parametrize("content", [b"garbage" * 100, b"SQLite format 3\x00" + b"\x01" * 50])
def test_garbage_file_is_a_database_error(open_db, user_db, content):
    user_db.write_bytes(content)
    with pytest.raises(DatabaseError, match="not a readable SQLite database"):
        open_db()
    assert user_db.read_bytes() == content  # never overwritten


def test_foreign_sqlite_database_is_refused(open_db, user_db):
    conn = sqlite3.connect(user_db)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseError, match="not a tuning database"):
        open_db()


def test_missing_file_with_create_false(open_db, user_db):
    with pytest.raises(DatabaseError, match="no tuning database"):
        open_db(create=False)
    assert not user_db.exists()


def test_empty_file_with_create_false_is_an_empty_database(open_db, user_db):
    """Another process may be creating it this moment: dispatch reads it as no records."""
    user_db.write_bytes(b"")
    with pytest.raises(database.EmptyDatabaseError):
        open_db(create=False)


def test_export_import_round_trip_is_sorted_text(db, open_db, tmp_path):
    db.put(_rec(chip="z"))
    db.put(_rec(chip="a"))
    out = tmp_path / "export.json"
    shipped.write(out, db.records())
    text = out.read_text()
    assert text.index('"chip": "a"') < text.index('"chip": "z"')
    assert len(text.splitlines()) == 4  # header, one line per record, footer
    assert json.loads(text)["format"] == shipped.FORMAT
    other = open_db(tmp_path / "other.sqlite")
    for entry in shipped.read(out):
        other.put(TuningRecord.from_dict(entry))
    assert other.records() == db.records()


def test_read_returns_entries_unchecked(tmp_path):
    """A bad entry costs only itself: its reader judges it."""
    path = tmp_path / "x.json"
    good = _rec().to_dict()
    body = {"format": shipped.FORMAT, "schema": SCHEMA_VERSION, "records": [good, "junk", None]}
    path.write_text(json.dumps(body))
    assert shipped.read(path) == [good, "junk", None]


@pytest.mark.parametrize(
    "body,message",
    [
        ("not json", "not a readable tuning export"),
        ('{"format": "other"}', "not an mlx-primitives tuning export"),
        ('["mlx-primitives-tuning"]', "not an mlx-primitives tuning export"),
        ('{"format": "mlx-primitives-tuning", "schema": 2, "records": []}', "schema 2"),
        ('{"format": "mlx-primitives-tuning", "schema": 1, "records": {}}', "no list of records"),
    ],
)
def test_read_rejects_bad_exports(tmp_path, body, message):
    path = tmp_path / "x.json"
    path.write_text(body)
    with pytest.raises(DatabaseError, match=message):
        shipped.read(path)


def test_read_of_a_missing_export_is_a_database_error(tmp_path):
    with pytest.raises(DatabaseError, match="not a readable tuning export"):
        shipped.read(tmp_path / "none.json")


def test_shipped_databases_are_named_by_chip():
    chips = shipped.chips()
    assert chips, "no shipped database"
    for slug in chips:
        assert shipped.path(slug).name == f"{slug}.json"
    assert shipped.path("no-such-chip") is None


def test_trials_keep_rejections_with_reasons(db):
    trial = {"op": "toy", "problem": "p", "variant": "nan", "params": {}, "status": "pending"}
    tid = db.add_trial("chip", trial)
    assert db.trials(status="pending")[0]["id"] == tid
    db.finish_trial(tid, {**trial, "status": "rejected", "reason": "NaN"})
    (t,) = db.trials()
    assert t["status"] == "rejected" and t["reason"] == "NaN"
    assert db.trials(status="pending") == []


def test_url_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXP_TUNING_DB", str(tmp_path / "x.sqlite"))
    assert database.default_user_url() == f"sqlite:///{tmp_path / 'x.sqlite'}"
    monkeypatch.setenv("MLXP_TUNING_DB", "sqlite:////tmp/y.sqlite")
    assert database.default_user_url() == "sqlite:////tmp/y.sqlite"
    monkeypatch.delenv("MLXP_TUNING_DB")
    assert database.default_user_url().endswith("mlx-primitives/tuning.sqlite")
    assert json.dumps(database.url_path("sqlite:////tmp/y.sqlite").as_posix()) == '"/tmp/y.sqlite"'
    assert database.url_path("sqlite://") is None
    assert database.exists("postgresql://fleet/db")  # another engine: may be there
    assert not database.exists(database.path_url(tmp_path / "none.sqlite"))


def test_a_database_in_a_folder_this_user_cannot_write_is_read(tmp_path):
    """A shared install, its folder read-only to the user: `show` reads its records (SQLite's
    WAL would need to make files beside it). As root, run without the capabilities that let
    root write anywhere."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "shared"
    folder.mkdir()
    db = database.TuningDB(str(folder / "t.sqlite"))
    db.put(_rec())
    db.close()
    folder.chmod(0o555)
    command = [sys.executable, "-m", "mlx_primitives.tuning.cli", "show", "--chip", "all"]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) drops root's capabilities here"
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    env = {**os.environ, "MLXP_TUNING_DB": str(folder / "t.sqlite")}
    try:
        done = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert _rec().problem in done.stdout
