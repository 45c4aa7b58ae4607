"""Fleet tuning: tuners on many machines sharing one database, on a real PostgreSQL server
(tests/postgres.py) and on SQLite. Every command and dispatch on PostgreSQL; leases (claim,
renew, release, expiry, takeover, races); the Optuna studies in the database; ``merge``; and
eight worker processes of two chips on one server, one killed mid-problem."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import mlx.core as mx
import optuna
import pytest

import mlx_primitives as mp
from mlx_primitives import dispatch
from mlx_primitives.hardware import detect_chip
from mlx_primitives.registry import Example, Variant, op
from mlx_primitives.store import path_url, shipped
from mlx_primitives.store.database import TuningDB, leases_table
from mlx_primitives.store.leases import LeaseLost, Leases
from mlx_primitives.tuning import studies
from mlx_primitives.tuning.cli import main
from mlx_primitives.tuning.tuner import Budget, Candidate, Result, Tuner

from .cli_run import run, run_json
from .stress.harness import finish, spawn
from .toy import double, make_op, record

PROBLEM = "rms_norm|float32|rows=8,dims=64,weight=float32"
TUNE = ["tune", "--op", "rms_norm", "--shape", "8x64", "--dtype", "float32", "--preset", "quick"]
EXPLAIN = ["explain", "rms_norm", "--shape", "8x64", "--shape", "64", "--dtype", "float32"]
EX = Example(((64, 256),), "float32")
FAST = Budget(trials=64, problem_s=60, bench_s=0.02)
# A variant of 36 configurations: with 10 trials, part of the toy op's space is left to TPE.
BIG = Variant(
    "big", lambda a, b, c: double, space={"a": tuple(range(6)), "b": (1, 2, 3), "c": (0, 1)}
)
TPE = Budget(trials=10, problem_s=60, bench_s=0.01)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, user_db) -> str:
    """A new tuning database on each engine: the test's SQLite file, or a database on the
    session's PostgreSQL server."""
    if request.param == "sqlite":
        return path_url(user_db)
    return request.getfixturevalue("pg_url")


@pytest.fixture
def opened(url):
    """``url``'s database, open, closed after the test."""
    db = TuningDB(url)
    yield db
    db.close()


def _rms(variant: str = "eager", rows: int = 8, **overrides):
    """A current rms_norm record at ``rows`` x 64, of this chip."""
    args = (mx.ones((rows, 64)), mx.ones((64,)), 1e-5)
    return record(op("rms_norm"), args, variant, default_variant="builtin", **overrides)


# Every command, and dispatch, on PostgreSQL ----------------------------------------------------


def test_every_command_works_on_postgresql(capsys, postgres, pg_url, tmp_path):
    db = ["--db", pg_url]
    (made,) = run_json(capsys, *TUNE, *db)
    assert made["problem"] == PROBLEM and made["stale"] is False
    shown = [r for r in run_json(capsys, "show", *db) if r["source"] == "user"]
    assert [(r["problem"], r["variant"]) for r in shown] == [(PROBLEM, made["variant"])]
    assert run_json(capsys, *EXPLAIN, *db)["source"] == "user"
    code, out, _ = run(capsys, *TUNE, *db)
    assert code == 0 and "1 problems already tuned" in out

    with mp.record(pg_url):
        mp.rms_norm(mx.ones((3, 32)), mx.ones((32,)), 1e-5)
    (hit,) = run_json(capsys, "hits", *db)
    assert hit["problem"] == "rms_norm|float32|rows=4,dims=32,weight=float32"
    code, _, err = run(capsys, "tune", "--recorded", "--preset", "quick", *db)
    assert code == 0, err

    export = tmp_path / "fleet.json"
    code, out, _ = run(capsys, "export", str(export), *db)
    assert code == 0 and "exported 2 records" in out
    other = postgres.new_database()
    code, out, _ = run(capsys, "import", str(export), "--db", other)
    assert code == 0 and "imported 2 records" in out
    code, out, _ = run(capsys, "merge", str(export), "--db", other)
    assert code == 0 and "0 added, 0 replaced, 2 kept, 0 rejected" in out
    first, second = TuningDB(pg_url), TuningDB(other)
    assert first.records() == second.records()
    first.close()
    second.close()

    report = run_json(capsys, "doctor", *db)["user_db"]
    assert (report["status"], report["records"], report["stale"]) == ("ok", 2, 0)
    code, _, err = run(capsys, "report", *db, "-o", str(tmp_path / "report.html"))
    assert code == 0 and (tmp_path / "report.html").exists(), err
    code, out, _ = run(capsys, "clear", *db)
    assert code == 0 and "cleared 2 records" in out
    assert [r for r in run_json(capsys, "show", *db) if r["source"] == "user"] == []


def test_dispatch_serves_records_from_postgresql(pg_url, monkeypatch):
    db = TuningDB(pg_url)
    db.put(_rms("eager"))
    db.close()
    monkeypatch.setenv("MLXP_TUNING_DB", pg_url)
    dispatch.reset()
    args = (mx.ones((8, 64)), mx.ones((64,)), 1e-5)
    decision = mp.explain("rms_norm", *args)
    assert (decision.source, decision.variant) == ("user", "eager")
    assert mx.allclose(mp.rms_norm(*args), mx.fast.rms_norm(*args)).item()


def test_a_database_the_server_lacks_is_a_clean_error(capsys, postgres, monkeypatch):
    url = postgres.url("no_such_database")
    code, _, err = run(capsys, "show", "--db", url)
    assert code == 1 and "error:" in err and "Traceback" not in err
    monkeypatch.setenv("MLXP_TUNING_DB", url)
    dispatch.reset()
    with pytest.warns(RuntimeWarning, match="ignoring the tuning database"):
        decision = mp.explain("rms_norm", mx.ones((8, 64)), mx.ones((64,)), 1e-5)
    assert decision.source != "user"


def test_a_password_in_the_url_is_never_printed(capsys, postgres, pg_url, tmp_path):
    """Nor written into a report, which is made to be shared."""
    url = pg_url.replace("postgres@", "postgres:hunter2@")  # trust: the server ignores it
    missing = postgres.url("no_such_database").replace("postgres@", "postgres:hunter2@")
    page = tmp_path / "report.html"
    said = [run(capsys, *argv) for argv in ([*TUNE, "--db", url], ["doctor", "--db", url],
            ["show", "--db", missing], ["report", "--db", url, "-o", str(page)],
            ["clear", "--db", url])]  # fmt: skip
    assert [code for code, _, _ in said] == [0, 0, 1, 0, 0]
    text = "".join(out + err for _, out, err in said) + page.read_text()
    assert "postgres:***@" in text and "hunter2" not in text


def test_a_lease_under_a_second_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([*TUNE, "--lease", "0.5"])
    assert info.value.code == 2 and "--lease must be at least 1 seconds" in capsys.readouterr().err


# The store under concurrent writers -------------------------------------------------------------


def _together(n: int, work) -> None:
    """``work(i)`` in ``n`` threads started at one moment; re-raises the first failure."""
    start, failures = threading.Barrier(n), []

    def run_one(i):
        start.wait()
        try:
            work(i)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def test_concurrent_cold_starts_on_a_new_postgresql_database(pg_url):
    """Eight processes' first opens of one new database, Optuna's storage too."""
    opened = []

    def cold(i):
        opened.append(TuningDB(pg_url))
        studies.storage(pg_url).engine.dispose()

    _together(8, cold)
    assert {db.meta("schema_version") for db in opened} == {"1"}
    for db in opened:
        db.close()


def test_concurrent_puts_of_one_problem_leave_one_record(opened):
    records = [_rms(median_s=1e-5 * (1 + i / 10)) for i in range(8)]
    _together(8, lambda i: [opened.put(records[i]) for _ in range(5)])
    (kept,) = opened.records()
    assert kept in records
    _together(8, lambda i: [opened.add_hits("chip", {("rms_norm", PROBLEM): 1}) for _ in range(5)])
    assert [h["calls"] for h in opened.hits()] == [40]


# Leases -------------------------------------------------------------------------------------------


def test_a_lease_is_renewed_released_and_taken_over_once_expired(opened):
    a, b = Leases(opened, "host-a:1:aa", 1.0), Leases(opened, "host-b:2:bb", 1.0)
    key = ("chip-a", "rms_norm", PROBLEM)
    lease = a.claim(*key)
    assert lease is not None and b.claim(*key) is None and b.holder(*key) == a.owner
    assert a.claim(*key) is not None  # a worker's own lease is its own again
    assert b.claim("chip-b", *key[1:]) is not None  # another chip's problem: another lease
    with lease:
        time.sleep(1.5)  # past the lease's time: the heartbeat kept it
        assert b.claim(*key) is None
    assert b.holder(*key) is None  # released at the end
    stalled = b.claim(*key)  # taken, and never renewed (its worker died)
    time.sleep(1.1)
    assert a.claim(*key) is not None and a.holder(*key) == a.owner  # expired: taken over
    with pytest.raises(LeaseLost, match="another worker took the problem over"):
        opened.write(stalled.fence)
    assert stalled.lost


def test_a_lease_of_a_process_of_this_host_that_died_is_taken_over_at_once(opened):
    """A tuner that crashed or stopped on a hung candidate is resumed without waiting: on its
    host the pid answers (elsewhere, the lease's expiry)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    key = ("chip", "rms_norm", PROBLEM)
    assert Leases(opened, f"{host}:{int(ended.stdout)}:00", 60.0).claim(*key) is not None
    assert Leases(opened, f"{host}:{os.getpid()}:11", 60.0).claim(*key) is not None
    assert Leases(opened, seconds=60.0).claim(*key) is None  # the holder runs: this process


def test_workers_racing_for_leases_get_one_winner_each(opened):
    workers = [Leases(opened, f"host:{i}:00", 60.0) for i in range(8)]
    wins: dict[int, list[str]] = {k: [] for k in range(12)}

    def race(i):
        for k in wins:
            if workers[i].claim("chip", "rms_norm", f"p{k}") is not None:
                wins[k].append(workers[i].owner)

    _together(8, race)
    assert all(len(owners) == 1 for owners in wins.values()), wins


# The tuner and mlxp-tune with leases ---------------------------------------------------------


def test_tune_waits_for_a_held_problem_and_takes_it_over_when_its_lease_expires(capsys, url):
    db = TuningDB(url)
    dead = Leases(db, "gone:1:00", 1.0)  # a worker that died holding the problem: no heartbeat
    assert dead.claim(detect_chip().slug, "rms_norm", PROBLEM) is not None
    code, out, err = run(capsys, *TUNE, "--db", url, "--lease", "1")
    assert code == 0, err
    assert "rms_norm 8x64 float32: held by gone:1:00" in err
    assert "1 problems are held by other workers: waiting" in err
    assert [r.problem for r in db.records()] == [PROBLEM]
    assert dead.holder(detect_chip().slug, "rms_norm", PROBLEM) is None  # released
    db.close()


def test_a_problem_its_holder_finishes_is_not_tuned_again_even_with_force(capsys, url):
    db = TuningDB(url)
    holder = Leases(db, "busy:1:00", 1.0).claim(detect_chip().slug, "rms_norm", PROBLEM)
    theirs = _rms("compiled")

    def finish_it():
        with holder:
            time.sleep(1.2)
            db.put(theirs, fence=holder.fence)

    worker = threading.Thread(target=finish_it)
    worker.start()
    code, out, err = run(capsys, *TUNE, "--db", url, "--lease", "1", "--force")
    worker.join()
    assert code == 0, err
    assert db.records() == [theirs]
    assert db.trials() == []  # this worker measured nothing
    db.close()


def test_a_forced_worker_takes_over_what_a_dead_holder_left(capsys, url):
    """With --force, a problem that has a record and whose holder died (no newer record) is
    re-tuned once the holder's lease expires."""
    db = TuningDB(url)
    ours = _rms("compiled")
    db.put(ours)
    dead = Leases(db, "gone:1:00", 1.0)  # a --force worker that died holding it
    assert dead.claim(detect_chip().slug, "rms_norm", PROBLEM) is not None
    code, out, err = run(capsys, *TUNE, "--db", url, "--lease", "1", "--force")
    assert code == 0, err
    assert "held by gone:1:00" in err
    (record,) = db.records()
    assert record.created_at != ours.created_at and db.trials()  # tuned here
    db.close()


def test_a_worker_that_lost_its_lease_leaves_the_takers_record(opened):
    leases = Leases(opened, "slow:1:00", 1.0)
    tuner = Tuner(opened, FAST, leases=leases)

    def taken_over(step):  # mid-problem, another worker takes the problem over
        if step.done == 1:
            table = leases_table
            opened.write(lambda c: c.execute(table.update().values(owner="taker:2:00")))

    tuner.on_candidate = taken_over
    outcome = tuner.tune(make_op(), EX)
    assert outcome.held and outcome.record is None and "took it over" in outcome.note
    assert opened.records() == []  # the taker's record will stand alone


def test_a_worker_stops_searching_once_its_heartbeat_finds_the_lease_taken(opened):
    leases = Leases(opened, "slow:1:00", 1.0)
    tuner = Tuner(opened, FAST, leases=leases)

    def taken_over(step):
        if step.done == 1:
            table = leases_table
            opened.write(lambda c: c.execute(table.update().values(owner="taker:2:00")))
            time.sleep(0.6)  # past a heartbeat (a third of the lease)

    tuner.on_candidate = taken_over
    outcome = tuner.tune(make_op(), EX)
    assert outcome.held and outcome.record is None
    assert len(opened.trials()) == 1  # nothing measured after the heartbeat saw it


# Optuna's studies in the tuning database ----------------------------------------------------


def test_the_search_is_an_optuna_study_in_the_tuning_database(opened, url):
    toy = make_op([BIG])
    outcome = Tuner(opened, TPE).tune(toy, EX)
    name = studies.study_name(detect_chip().slug, outcome.problem)
    # What optuna-dashboard does with the URL: Optuna's storage, from the URL alone.
    first = optuna.load_study(study_name=name, storage=url).trials
    assert first and all("variant" in t.params for t in first)
    Tuner(opened, TPE, force=True).tune(toy, EX)
    assert optuna.get_all_study_names(storage=url) == [name]  # one study: the latest search
    assert len(opened.records()) == 1 and opened.trials()  # the tuner's tables beside Optuna's


def test_a_search_of_every_candidate_is_a_study_too(opened, url):
    """Where the tuner tries every candidate (no TPE), each is a finished trial of the study,
    its time the one measured, a rejected one failed with its reason."""
    outcome = Tuner(opened, FAST).tune(make_op(), EX)
    name = studies.study_name(detect_chip().slug, outcome.problem)
    trials = optuna.load_study(study_name=name, storage=url).trials
    tried = {(r.candidate.variant, r.candidate.params): r for r in outcome.results}
    assert len(trials) == len(tried) > 1
    for t in trials:
        variant = t.params["variant"]
        params = tuple(sorted((k.split(".", 1)[1], v) for k, v in t.params.items() if "." in k))
        r = tried[(variant, params)]
        if r.status == "ok":
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == r.median_s
        else:
            assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["reason"] == r.reason


def test_a_seeded_search_suggests_the_same_in_the_database_as_in_memory(opened, monkeypatch):
    """The study is emptied before each search: an earlier search of the problem in the
    database changes nothing, and a seed suggests what it does in memory."""
    space = [Candidate.of("big", {"a": a, "b": b, "c": c}) for a in range(6) for b in (1, 2, 3)
             for c in (0, 1)]  # fmt: skip

    def suggested(tuner: Tuner) -> list[Candidate]:
        seen = []

        def evaluate(c: Candidate) -> Result:
            seen.append(c)
            return Result(c, "ok", "", 1e-5 * (1 + space.index(c) % 7))

        tuner._tpe(space, 8, time.perf_counter() + 60, evaluate, "chip/toy|float32|rows=1")
        return seen

    in_database = suggested(Tuner(opened, FAST, seed=3))
    again = suggested(Tuner(opened, FAST, seed=3))
    monkeypatch.setattr(studies, "storage", lambda url: optuna.storages.InMemoryStorage())
    in_memory = suggested(Tuner(opened, FAST, seed=3))
    assert len(set(in_database)) == 8 and in_database == again == in_memory


def test_a_database_of_the_old_layout_gets_its_trials_table_renamed(user_db, open_db):
    db = open_db()
    trial = {"op": "toy", "problem": "p", "variant": "nan", "params": {}, "status": "ok"}
    db.add_trial("chip", trial)
    db.close()
    conn = sqlite3.connect(user_db)  # as schema 1 was written before leases and Optuna
    conn.executescript(
        "DROP TABLE leases; DROP INDEX ix_tuner_trials_chip;"
        "ALTER TABLE tuner_trials RENAME TO trials; CREATE INDEX ix_trials_chip ON trials (chip);"
    )
    conn.close()
    db = open_db()
    assert [t["variant"] for t in db.trials()] == ["nan"]
    studies.storage(db.url).engine.dispose()  # Optuna's own trials table now fits beside
    tables = {r[0] for r in sqlite3.connect(user_db).execute("SELECT name FROM sqlite_master")}
    assert {"tuner_trials", "leases", "trials", "studies", "ix_tuner_trials_chip"} <= tables


# merge ----------------------------------------------------------------------------------------


def test_merge_keeps_the_better_record_of_each_problem(capsys, opened, url, tmp_path):
    major, minor, *_ = mx.__version__.split(".")
    stale = {"mlx_version": f"{major}.{int(minor) + 1}.0"}
    early, late = "2026-11-26T00:00:00+00:00", "2026-11-27T00:00:00+00:00"
    opened.put(_rms("eager", rows=8))  # speedup_low 1.98
    opened.put(_rms("compiled", rows=16, **stale))
    sure = _rms("compiled", rows=8, median_s=0.5e-5)  # speedup_low 3.9
    later = dataclasses.replace(sure, created_at=late)
    fresh, lone_stale = _rms("eager", rows=16), _rms("eager", rows=64, **stale)
    new = _rms("compiled", rows=32, created_at=early)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    shipped.write(a, [sure, fresh, new])
    shipped.write(b, [later, new, lone_stale])
    junk = json.loads(b.read_text())
    junk["records"].append({**new.to_dict(), "op": "nope"})
    b.write_text(json.dumps(junk))

    code, out, err = run(capsys, "merge", str(a), str(b), str(tmp_path / "none.json"), "--db", url)
    assert code == 1 and "none.json is not a readable tuning export" in err  # the rest merged
    assert "2 added, 3 replaced, 1 kept, 1 rejected" in out
    assert f"{a}'s record over the database's: speedup_low 3.9" in out
    assert "rows=16,dims=64,weight=float32: " in out and "current over stale" in out
    assert f"{b}'s record over {a}'s: later ({late} over {early})" in out
    assert f"{a}'s record over {b}'s: a tie: the first met stays" in out
    assert "rejected: " in out and "unknown op 'nope'" in out
    assert f"added: {new.chip} {new.problem} from {a}" in out
    merged = {r.problem.split("|")[2].split(",")[0]: r for r in opened.records()}
    assert merged == {"rows=8": later, "rows=16": fresh, "rows=32": new, "rows=64": lone_stale}


def test_merge_leaves_a_better_record_written_while_it_ran(opened, monkeypatch):
    """A worker writes a better record of a problem after merge read the database and before it
    writes: the worker's stays, and the merge says so."""
    from mlx_primitives.tuning import merge

    worse, better = _rms("eager", rows=8), _rms("compiled", rows=8, median_s=0.5e-5)
    opened.put(better)  # written after merge read the database, which then held nothing:
    monkeypatch.setattr(opened, "records", lambda *a, **k: [])
    done = merge.fold(opened, [(worse, "a.json")])
    assert done.lines == [("kept", f"{worse.chip} {worse.problem}: a record written since "
                                   "ranks at least as high")]  # fmt: skip
    monkeypatch.undo()
    assert opened.records() == [better]


# Eight workers of two chips on one server, one killed -----------------------------------------


def _mid_problem(url: str, pid: int) -> list[dict]:
    """The leases the worker with ``pid`` holds while it measures a candidate (a pending trial
    of its own); none before, or while the tables are being made."""
    try:
        db = TuningDB(url, create=False)
    except Exception:
        return []
    try:
        measuring = [t for t in db.trials(status="pending") if f"pid {pid} " in t["reason"]]
        query = leases_table.select().where(leases_table.c.owner.like(f"%:{pid}:%"))
        held = [dict(r) for r in db.read(lambda c: c.execute(query).mappings().all())]
        return held if measuring else []
    finally:
        db.close()


def test_eight_workers_of_two_chips_split_the_work_and_survive_a_kill(postgres):
    """Eight worker processes, four per chip, tune the same six problems into one server with
    2 s leases; one is killed with SIGKILL while it holds a problem. Each chip ends with
    exactly one current record per problem, each problem tuned once (the killed one's twice:
    by the victim and by the worker that took it over), and no lease or pending trial left."""
    url = postgres.new_database()
    rows = ["1", "2", "4", "8", "16", "32"]
    chips = ["fleet-a"] * 4 + ["fleet-b"] * 4
    # The victim (the first) is slow, so it is surely mid-problem when it is killed.
    procs = [spawn("fleet", url, chip, "2", "1" if i == 0 else "0", *rows)
             for i, chip in enumerate(chips)]  # fmt: skip
    victim, workers = procs[0], procs[1:]
    deadline = time.time() + 120
    while not (held := _mid_problem(url, victim.pid)):
        assert time.time() < deadline and victim.poll() is None, "the victim never held a lease"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finish(workers, timeout=300)

    killed = (held[0]["chip"], held[0]["problem"])
    db = TuningDB(url, create=False)
    try:
        rms = op("rms_norm")
        slugs = {r.chip for r in db.records()}
        assert len(slugs) == 2 and all("fleet" in s for s in slugs)
        for slug in slugs:
            records = db.records(chip=slug)
            problems = [r.problem for r in records]
            assert len(problems) == len(set(problems)) == len(rows)
            assert all(r.stale(rms) is None for r in records)
            for r in records:
                tunings = [
                    t
                    for t in db.trials(chip=slug, op="rms_norm")
                    if t["problem"] == r.problem and t["variant"] == r.default_variant
                ]
                assert len(tunings) == (2 if (slug, r.problem) == killed else 1), (slug, r.problem)
        assert db.trials(status="pending") == []
        assert db.read(lambda c: c.execute(leases_table.select()).all()) == []
    finally:
        db.close()
