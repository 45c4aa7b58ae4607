"""The user's tuning database: SQLAlchemy 2 on SQLite (or any SQLAlchemy URL).

One row of ``records`` is a :class:`~mlx_primitives.tuning_record.TuningRecord`; ``trials`` keeps
every candidate the tuner looked at, rejected ones with their reason. The database lives at
``MLXP_TUNING_DB`` (a path or a SQLAlchemy URL) or in the platformdirs user data folder.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
import warnings
from dataclasses import fields
from datetime import datetime, timezone

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
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

from ..tuning_record import RecordError, TuningRecord
from . import (  # noqa: F401 (the store's light names, also used from here)
    SCHEMA_VERSION,
    DatabaseError,
    EmptyDatabaseError,
    default_user_url,
    exists,
    path_url,
    url_path,
)

_HINT = (
    ". `mlxp-tune doctor` says more; `mlxp-tune clear` moves an unusable database aside (it is "
    "never overwritten)"
)
# SQLite waits this long for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 60_000


class _Base(DeclarativeBase):
    pass


class _Meta(_Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


def _column(f) -> Column:
    if f.type == "str":
        return Column(f.name, String(f.metadata["max"]), nullable=False)
    return Column(f.name, Float if f.type == "float" else Text, nullable=False)


# The records table has a column per field of TuningRecord, in its order.
_records = Table(
    "records",
    _Base.metadata,
    Column("id", Integer, primary_key=True),
    *(_column(f) for f in fields(TuningRecord)),
    UniqueConstraint("chip", "op", "problem"),
)
Index("ix_records_chip", _records.c.chip)

# Calls counted per problem while recording (mp.record): what an application hits.
# Added after schema 1 was written; a schema-1 database without it gets it when opened.
_hits = Table(
    "hits",
    _Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("chip", String(128), nullable=False),
    Column("op", String(64), nullable=False),
    Column("problem", String(512), nullable=False),
    Column("calls", Integer, nullable=False),
    Column("first_seen", String(64), nullable=False),
    Column("last_seen", String(64), nullable=False),
    UniqueConstraint("chip", "op", "problem"),
)
ADDED_TABLES = {"hits"}


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
        if tables - {"meta"} and missing - ADDED_TABLES:
            raise DatabaseError(f"{self.url} lacks the tables {sorted(missing)}{_HINT}")
        if missing:
            try:
                with self._writer.begin() as conn:
                    _Base.metadata.create_all(conn, tables=[_hits])
            except OperationalError:  # read-only: the records still serve; recording fails
                pass

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
    def records(self, chip: str | None = None, op: str | None = None) -> list[TuningRecord]:
        """Records, optionally of one chip and/or op, ordered by chip, op, problem. A row that
        is not a well-formed record is left out with a warning."""
        query = select(_records)
        if chip is not None:
            query = query.where(_records.c.chip == chip)
        if op is not None:
            query = query.where(_records.c.op == op)
        query = query.order_by(_records.c.chip, _records.c.op, _records.c.problem)
        out = []
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                try:
                    out.append(TuningRecord.from_row({**row}))
                except RecordError as e:
                    warnings.warn(
                        f"[mlx_primitives] ignoring row {row['id']} of {self.url}: {e}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return out

    @_guard
    def put(self, record: TuningRecord) -> None:
        """Insert or replace the record for its (chip, op, problem), atomically."""
        if not isinstance(record, TuningRecord):
            raise TypeError(f"[TuningDB.put] expected a TuningRecord, got {type(record).__name__}")
        row = record.to_row()
        with self._writer.begin() as conn:
            conn.execute(
                delete(_records).where(
                    _records.c.chip == row["chip"],
                    _records.c.op == row["op"],
                    _records.c.problem == row["problem"],
                )
            )
            conn.execute(_records.insert().values(**row))

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
    def add_hits(self, chip: str, counts: dict[tuple[str, str], int]) -> None:
        """Add ``{(op, problem key): calls}`` to the chip's counts, in one transaction (so
        processes recording at once all count)."""
        stamp = now()
        with self._writer.begin() as conn:
            for (op, problem), calls in counts.items():
                where = (_hits.c.chip == chip, _hits.c.op == op, _hits.c.problem == problem)
                done = conn.execute(
                    _hits.update()
                    .where(*where)
                    .values(calls=_hits.c.calls + calls, last_seen=stamp)
                )
                if done.rowcount == 0:
                    conn.execute(
                        _hits.insert().values(
                            chip=chip,
                            op=op,
                            problem=problem,
                            calls=calls,
                            first_seen=stamp,
                            last_seen=stamp,
                        )  # fmt: skip
                    )

    @_guard
    def hits(self, chip: str | None = None) -> list[dict]:
        """Recorded calls per problem (of one chip), the most called first."""
        query = select(_hits)
        if chip is not None:
            query = query.where(_hits.c.chip == chip)
        query = query.order_by(_hits.c.calls.desc(), _hits.c.op, _hits.c.problem)
        with self.engine.connect() as conn:
            return [
                {k: row[k] for k in ("chip", "op", "problem", "calls", "first_seen", "last_seen")}
                for row in conn.execute(query).mappings()
            ]

    @_guard
    def clear(self, op: str | None = None, chip: str | None = None) -> int:
        """Delete records and trials (of one op and/or chip); returns the records deleted."""
        with Session(self._writer) as s, s.begin():
            n = 0
            for table in (_records, Trial.__table__):
                stmt = delete(table)
                if op is not None:
                    stmt = stmt.where(table.c.op == op)
                if chip is not None:
                    stmt = stmt.where(table.c.chip == chip)
                result = s.execute(stmt)
                n = result.rowcount if table is _records else n
            return n

    @_guard
    def integrity_ok(self) -> bool:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    def close(self) -> None:
        self.engine.dispose()
        self._writer.dispose()
