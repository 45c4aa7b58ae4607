"""Helpers the stress tests and their short CI versions share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m tests.stress.workloads *args`` in the repository root."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.stress.workloads", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Wait for every process; each must exit 0 and print its JSON line."""
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        last = out.strip().splitlines()[-1] if out.strip() else "{}"
        assert p.returncode == 0, f"worker failed ({p.returncode}): {last}\n{err[-2000:]}"
        assert "database is locked" not in err, err[-2000:]
        results.append(json.loads(last))
    return results


def concurrent(db: Path, writers: int, readers: int, writes: int, read_s: float) -> list[dict]:
    """Writers and readers on one database, all started at once on a file that does not yet
    exist (concurrent cold starts)."""
    assert not db.exists()
    procs = [spawn("write", str(db), str(i), str(writes)) for i in range(writers)]
    procs += [spawn("read", str(db), str(read_s)) for _ in range(readers)]
    return finish(procs, timeout=600)


def check_database(db: Path, problems: int) -> None:
    """Integrity, WAL, and exactly one complete record per problem."""
    import sqlite3

    from mlx_primitives.registry import op
    from mlx_primitives.store.database import TuningDB

    handle = TuningDB(str(db), create=False)
    try:
        assert handle.integrity_ok()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a row that is not a well-formed record fails
            records = handle.records()
        keys = [(r.chip, r.op, r.problem) for r in records]
        assert len(keys) == len(set(keys)) == problems
        for r in records:
            r.problem_of(op(r.op))  # fits its op (RecordError otherwise)
            assert r.stale(op(r.op)) is None
        assert not handle.trials(status="pending")
    finally:
        handle.close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
