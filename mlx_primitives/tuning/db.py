"""The tuning database: SQLAlchemy 2 models on SQLite.

One row of ``records`` is the tuned choice for one (chip, op, problem); ``trials`` keeps every
candidate the tuner looked at, rejected ones with their reason. The user database lives at
``MLXP_TUNING_DB`` (a path or a SQLAlchemy URL) or in the platformdirs user data folder. Shipped
databases are exports: JSON text in ``tuning_db/<chip-slug>.json`` (reviewable in a diff), read
by the dispatcher as they are and never written by it.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
    text,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SCHEMA_VERSION = 1
FORMAT = "mlx-primitives-tuning"
_HINT = (
    ". `mlxp-tune doctor` says more; `mlxp-tune clear` moves an unusable database aside (it is "
    "never overwritten)"
)
# SQLite waits this long for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 60_000

RECORD_FIELDS = (
    "chip",
    "op",
    "problem",
    "variant",
    "params",
    "median_s",
    "spread_s",
    "default_variant",
    "default_params",
    "default_median_s",
    "error",
    "mlx_version",
    "package_version",
    "source_hash",
    "created_at",
)


class DatabaseError(RuntimeError):
    """A tuning database that cannot be used; the message says why and how to recover."""


class EmptyDatabaseError(DatabaseError):
    """An empty SQLite file: a database another process is creating right now, or nothing."""


class _Base(DeclarativeBase):
    pass


class _Meta(_Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class TuningRecord(_Base):
    """The tuned choice for one problem on one chip."""

    __tablename__ = "records"
    __table_args__ = (UniqueConstraint("chip", "op", "problem"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chip: Mapped[str] = mapped_column(String(128), index=True)
    op: Mapped[str] = mapped_column(String(64))
    problem: Mapped[str] = mapped_column(String(512))
    variant: Mapped[str] = mapped_column(String(128))
    params: Mapped[str] = mapped_column(Text)
    median_s: Mapped[float] = mapped_column(Float)
    spread_s: Mapped[float] = mapped_column(Float)
    default_variant: Mapped[str] = mapped_column(String(128))
    default_params: Mapped[str] = mapped_column(Text)
    default_median_s: Mapped[float] = mapped_column(Float)
    error: Mapped[float] = mapped_column(Float)
    mlx_version: Mapped[str] = mapped_column(String(64))
    package_version: Mapped[str] = mapped_column(String(64))
    source_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(64))

    def to_dict(self) -> dict:
        out = {f: getattr(self, f) for f in RECORD_FIELDS}
        for f in ("params", "default_params"):
            out[f] = _loads(out[f])
        return out


class Trial(_Base):
    """One candidate measured (or rejected) while tuning one problem."""

    __tablename__ = "trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chip: Mapped[str] = mapped_column(String(128), index=True)
    op: Mapped[str] = mapped_column(String(64))
    problem: Mapped[str] = mapped_column(String(512))
    variant: Mapped[str] = mapped_column(String(128))
    params: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    median_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[str] = mapped_column(String(64))

    def to_dict(self) -> dict:
        fields = (
            "id",
            "op",
            "problem",
            "variant",
            "status",
            "reason",
            "median_s",
            "error",
            "created_at",
        )
        return {"params": _loads(self.params), **{f: getattr(self, f) for f in fields}}


def _loads(text_: str):
    try:
        return json.loads(text_)
    except (TypeError, ValueError):
        return text_


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_user_url() -> str:
    """``MLXP_TUNING_DB`` as a URL, else the platformdirs user data location."""
    value = os.environ.get("MLXP_TUNING_DB", "").strip()
    if value:
        return value if "://" in value else path_url(value)
    from platformdirs import user_data_dir

    return path_url(Path(user_data_dir("mlx-primitives")) / "tuning.sqlite")


def path_url(path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def url_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for memory or another engine)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and len(url) > len(prefix):
        return Path(url[len(prefix) :])
    return None


def _on_connect(dbapi_conn, _record):
    # Every connection waits for locks (busy timeout) before anything else happens on it.
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _writer_connect(dbapi_conn, record):
    _on_connect(dbapi_conn, record)
    # SQLAlchemy, not the sqlite3 module, opens transactions on the writer (see _writer_begin).
    dbapi_conn.isolation_level = None


def _writer_begin(conn):
    # A deferred transaction that later writes fails at once with "database is locked" when
    # another process writes, whatever the busy timeout; IMMEDIATE takes the write lock first
    # and waits for it.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _guard(method):
    """Turn any SQLAlchemy or sqlite error of ``method`` into a DatabaseError with advice."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except DatabaseError:
            raise
        except (SQLAlchemyError, sqlite3.Error) as e:
            detail = getattr(e, "orig", None) or e
            raise DatabaseError(f"{self.url}: {detail}{_HINT}") from e

    return wrapper


class TuningDB:
    """A tuning database.

    Readers never wait (WAL); writers take the write lock when their transaction begins and
    wait up to ``BUSY_TIMEOUT_MS`` for it, so several tuning and dispatching processes can
    share one file. Every failure of the database surfaces as :class:`DatabaseError`.

    Args:
        url: a SQLAlchemy URL (``sqlite:///path``) or a plain file path.
        create: create the file and tables when missing; when False a missing file raises.
    """

    def __init__(self, url: str, *, create: bool = True):
        self.url = url if "://" in url else path_url(url)
        path = url_path(self.url)
        try:
            if path is not None and not path.exists():
                if not create:
                    raise DatabaseError(f"no tuning database at {path}")
                path.parent.mkdir(parents=True, exist_ok=True)
            args = {"timeout": BUSY_TIMEOUT_MS / 1000} if self.url.startswith("sqlite") else {}
            self.engine = self._writer = create_engine(self.url, connect_args=args)
        except (OSError, SQLAlchemyError) as e:
            raise DatabaseError(f"cannot open a tuning database at {self.url}: {e}") from e
        if self.engine.dialect.name == "sqlite" and path is not None:
            event.listen(self.engine, "connect", _on_connect)
            self._writer = create_engine(self.url, connect_args=args)
            event.listen(self._writer, "connect", _writer_connect)
            event.listen(self._writer, "begin", _writer_begin)
        try:
            self._prepare(create)
        except Exception:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"TuningDB({self.url!r})"

    def _prepare(self, create: bool) -> None:
        try:
            with self.engine.connect() as conn:
                tables = set(
                    conn.exec_driver_sql(
                        "SELECT name FROM sqlite_master WHERE type='table'"
                    ).scalars()
                )
        except Exception as e:  # not a database at all, or unreadable
            raise DatabaseError(f"{self.url} is not a readable SQLite database ({e}){_HINT}") from e
        if "meta" not in tables:
            if tables - {"meta"}:
                raise DatabaseError(
                    f"{self.url} is not a tuning database (tables: {sorted(tables)[:8]}){_HINT}"
                )
            if not create:
                raise EmptyDatabaseError(f"{self.url} holds no tuning tables")
            self._create()
        version = self.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise DatabaseError(
                f"{self.url} has schema version {version}, this mlx-primitives reads "
                f"{SCHEMA_VERSION}: export it with the version that wrote it, or start a new one"
                f"{_HINT}"
            )
        missing = {t.name for t in _Base.metadata.sorted_tables} - tables - {"meta"}
        if tables - {"meta"} and missing:
            raise DatabaseError(f"{self.url} lacks the tables {sorted(missing)}{_HINT}")

    def _create(self) -> None:
        # WAL first, once, at creation: switching needs a moment with no other writer, and
        # concurrent cold starts of several processes retry until they get it.
        for attempt in range(100):
            try:
                if url_path(self.url) is not None:
                    # Outside any transaction: inside one, SQLite keeps the old journal mode.
                    raw = self._writer.raw_connection()
                    try:
                        raw.cursor().execute("PRAGMA journal_mode=WAL")
                    finally:
                        raw.close()
                with self._writer.begin() as conn:
                    _Base.metadata.create_all(conn)
                    conn.execute(
                        text("INSERT OR IGNORE INTO meta (key, value) VALUES (:k, :v)"),
                        [
                            {"k": "schema_version", "v": str(SCHEMA_VERSION)},
                            {"k": "created_at", "v": now()},
                        ],
                    )
                return
            except OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.02 * (1 + attempt % 10))

    @_guard
    def meta(self, key: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(_Meta, key)
            return row.value if row else None

    @_guard
    def records(self, chip: str | None = None, op: str | None = None) -> list[dict]:
        """Records as dicts, optionally for one chip and/or op, ordered by chip, op, problem."""
        query = select(TuningRecord)
        if chip is not None:
            query = query.where(TuningRecord.chip == chip)
        if op is not None:
            query = query.where(TuningRecord.op == op)
        query = query.order_by(TuningRecord.chip, TuningRecord.op, TuningRecord.problem)
        with Session(self.engine) as s:
            return [r.to_dict() for r in s.scalars(query)]

    @_guard
    def put(self, record: dict) -> None:
        """Insert or replace the record for its (chip, op, problem), atomically."""
        row = {f: record[f] for f in RECORD_FIELDS}
        for f in ("params", "default_params"):
            row[f] = json.dumps(row[f], sort_keys=True)
        with Session(self._writer) as s, s.begin():
            s.execute(
                delete(TuningRecord).where(
                    TuningRecord.chip == row["chip"],
                    TuningRecord.op == row["op"],
                    TuningRecord.problem == row["problem"],
                )
            )
            s.add(TuningRecord(**row))

    @_guard
    def add_trial(self, chip: str, trial: dict) -> int:
        """Store one trial; returns its id (to finish a ``pending`` one later)."""
        with Session(self._writer) as s, s.begin():
            row = Trial(
                chip=chip,
                op=trial["op"],
                problem=trial["problem"],
                variant=trial["variant"],
                params=json.dumps(trial["params"], sort_keys=True),
                status=trial["status"],
                reason=trial.get("reason", ""),
                median_s=trial.get("median_s"),
                error=trial.get("error"),
                created_at=now(),
            )
            s.add(row)
            s.flush()
            return row.id

    @_guard
    def finish_trial(self, trial_id: int, trial: dict) -> None:
        """Give a pending trial its outcome."""
        with Session(self._writer) as s, s.begin():
            row = s.get(Trial, trial_id)
            if row is not None:
                row.status = trial["status"]
                row.reason = trial.get("reason", "")
                row.median_s = trial.get("median_s")
                row.error = trial.get("error")

    @_guard
    def trials(
        self, chip: str | None = None, op: str | None = None, status: str | None = None
    ) -> list[dict]:
        query = select(Trial)
        if chip is not None:
            query = query.where(Trial.chip == chip)
        if op is not None:
            query = query.where(Trial.op == op)
        if status is not None:
            query = query.where(Trial.status == status)
        with Session(self.engine) as s:
            return [t.to_dict() for t in s.scalars(query.order_by(Trial.id))]

    @_guard
    def clear(self, op: str | None = None, chip: str | None = None) -> int:
        """Delete records and trials (of one op and/or chip); returns the records deleted."""
        with Session(self._writer) as s, s.begin():
            n = 0
            for model in (TuningRecord, Trial):
                stmt = delete(model)
                if op is not None:
                    stmt = stmt.where(model.op == op)
                if chip is not None:
                    stmt = stmt.where(model.chip == chip)
                result = s.execute(stmt)
                n = result.rowcount if model is TuningRecord else n
            return n

    @_guard
    def integrity_ok(self) -> bool:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    def export(self, path, chip: str | None = None) -> int:
        """Write the records (of one chip) as JSON text; returns how many."""
        records = self.records(chip=chip)
        write_json(path, records)
        return len(records)

    def close(self) -> None:
        self.engine.dispose()
        self._writer.dispose()


def exists(url: str) -> bool:
    """Whether a database may be at ``url``: a SQLite file that exists, or any other URL."""
    path = url_path(url)
    return path is None or path.exists()


def shipped_path(chip: str) -> Path | None:
    """The pretuned database shipped for ``chip`` (a slug), if there is one."""
    from .._paths import data_dir

    path = data_dir("tuning_db") / f"{chip}.json"
    return path if path.is_file() else None


def shipped_chips() -> list[str]:
    from .._paths import data_dir

    return sorted(p.stem for p in data_dir("tuning_db").glob("*.json"))


def write_json(path, records: list[dict]) -> None:
    """One record per line, sorted, so a change to a shipped database reads well in a diff."""
    records = sorted(records, key=lambda r: (r["chip"], r["op"], r["problem"]))
    lines = ",\n".join("  " + json.dumps(r, sort_keys=True) for r in records)
    body = f'{{"format": "{FORMAT}", "schema": {SCHEMA_VERSION}, "records": [\n{lines}\n]}}\n'
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(body)
    os.replace(tmp, path)


def read_json(path) -> list[dict]:
    """The records of a JSON export, unchecked; DatabaseError when the file is not an export
    this version reads."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatabaseError(f"{path} is not a readable tuning export ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatabaseError(f"{path} is not an mlx-primitives tuning export")
    if data.get("schema") != SCHEMA_VERSION:
        raise DatabaseError(f"{path} has schema {data.get('schema')}, expected {SCHEMA_VERSION}")
    records = data.get("records")
    if not isinstance(records, list):
        raise DatabaseError(f"{path} has no list of records")
    # Each record is judged by its reader (dispatch.invalid): one bad record costs only itself.
    return records
