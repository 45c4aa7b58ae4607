"""Every test gets its own empty user database and a fresh dispatcher; the fleet tests get a
PostgreSQL server (tests/postgres.py) shared by the session, with a new database per test."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

from mlx_primitives import dispatch
from mlx_primitives.registry import ops
from mlx_primitives.store.database import TuningDB

GPU = mx.cuda.is_available() or mx.metal.is_available()


def pytest_ignore_collect(collection_path, config):
    """tests/stress runs only when asked for by path (``pytest tests/stress``)."""
    if collection_path.name == "stress" and not any("stress" in str(a) for a in config.args):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a GPU back-end; ``cpu`` tests assume the default device is the CPU
    (what untuned dispatch picks there, the CPU's own chip records)."""
    skip = (
        pytest.mark.skip(reason="assumes a CPU-only host")
        if GPU
        else pytest.mark.skip(reason="needs a GPU back-end (CUDA or Metal)")
    )
    for item in items:
        if ("cpu" if GPU else "gpu") in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ``MLXP_FAILURES`` set (tools/gpu_tests.sh sets it per shard), each failure's report
    is appended to that file as it happens: a run cut by a time limit still tells why."""
    path = os.environ.get("MLXP_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True)
def user_db(tmp_path, monkeypatch):
    """The path of this test's user database (not created until something writes to it)."""
    path = tmp_path / "tuning.sqlite"
    monkeypatch.setenv("MLXP_TUNING_DB", str(path))
    monkeypatch.delenv("MLXP_DISPATCH", raising=False)
    dispatch.reset()
    yield path
    dispatch.reset()
    for o in ops():  # a kernel stood in for must not stay in a trace
        for v in o.variants:
            if v.traced:
                v._built.clear()


@pytest.fixture
def untraced():
    """Kernel forwards run their Python at every call, as ``mx.compile`` is off (a test of
    what a forward launches per call)."""
    mx.disable_compile()
    yield
    mx.enable_compile()


@pytest.fixture
def served(monkeypatch):
    """The patches route every call through the dispatch, as where a tuning record could
    change it (without one they hand calls to what they replaced: dispatch.idle)."""
    monkeypatch.setattr(dispatch, "_compute_idle", lambda op_name, dtype: False)
    monkeypatch.setattr(dispatch, "unused", lambda op_name: False)
    dispatch.forget_calls()  # what was found idle before (and mx.fast, where patched)


@pytest.fixture
def open_db(tmp_path):
    """``open_db(path=None, create=True)``: a TuningDB (the test's user database by default),
    closed after the test."""
    opened = []

    def open_(path=None, create: bool = True) -> TuningDB:
        db = TuningDB(str(path or tmp_path / "tuning.sqlite"), create=create)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


@pytest.fixture
def db(open_db) -> TuningDB:
    """The test's user database, open (created)."""
    return open_db()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session. Where none can start, the tests that use it are
    skipped, or fail under ``MLXP_REQUIRE_POSTGRES=1`` (CI: there they must run)."""
    from . import postgres as pg

    why = pg.unavailable()
    if why is not None:
        if os.environ.get(pg.REQUIRE) == "1":
            pytest.fail(f"{pg.REQUIRE}=1 but no PostgreSQL server can start: {why}")
        pytest.skip(f"no PostgreSQL server: {why}")
    server = pg.Server(pg.binaries())
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres.new_database()
