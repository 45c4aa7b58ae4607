"""The user's tuning database: SQLAlchemy 2 on SQLite, or PostgreSQL for a fleet of tuners
(any SQLAlchemy URL).

One row of ``records`` is a :class:`~mlx_primitives.tuning_record.TuningRecord`;
``tuner_trials`` keeps every candidate the tuner looked at, rejected ones with their reason;
``leases`` says which worker tunes which problem now (:mod:`.leases`). Optuna's own tables
(``studies``, ``trials``, ...) may live beside them. The database lives at
``MLXP_TUNING_DB`` (a path or a SQLAlchemy URL) or in the platformdirs user data folder.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timezone
from typing import TypeVar

from sqlalchemy import (
    Column,
    Connection,
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
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..tuning_record import RecordError, TuningRecord
from . import (  # noqa: F401 (the store's light names, also used from here)
    SCHEMA_VERSION,
    DatabaseError,
    EmptyDatabaseError,
    as_url,
    default_user_url,
    exists,
    path_url,
    shown_url,
    url_path,
)

_HINT = (
    ". `mlxp-tune doctor` says more; `mlxp-tune clear` moves an unusable database aside (it is "
    "never overwritten)"
)
# SQLite waits this long for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 60_000
# A PostgreSQL server that does not answer within this many seconds is unusable.
CONNECT_TIMEOUT_S = 10
# Any number, the same in every process: PostgreSQL's advisory lock that serialises changes
# of the schema (concurrent CREATE TABLEs of the same table fail there).
_SCHEMA_LOCK = 0x6D6C7870
T = TypeVar("T")


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
# Which worker tunes which (chip, op, problem) now, until when (seconds since the epoch on the
# database's clock): the claims of :mod:`.leases`, by which tuners sharing a database split it.
leases_table = Table(
    "leases",
    _Base.metadata,
    Column("chip", String(128), primary_key=True),
    Column("op", String(64), primary_key=True),
    Column("problem", String(512), primary_key=True),
    Column("owner", String(256), nullable=False),
    Column("expires_at", Float, nullable=False),
)
# Tables a database of schema 1 may lack: they are made when it is opened.
ADDED_TABLES = {"hits", "leases", "tuner_trials"}
# The trials table's name until Optuna's studies came to live in the same database (Optuna
# has a "trials" table of its own); renamed when such a database is opened for writing.
LEGACY_TRIALS = "trials"


class Trial(_Base):
    """One candidate measured (or rejected) while tuning one problem."""

    __tablename__ = "tuner_trials"

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


def _writable(folder) -> bool:
    return os.access(folder, os.W_OK)


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
            raise DatabaseError(f"{self.shown}: {detail}{_HINT}") from e

    return wrapper


def _lock_schema(conn: Connection) -> None:
    """Serialise changes of the schema for the rest of this transaction. SQLite's writers hold
    the write lock already (``BEGIN IMMEDIATE``); PostgreSQL takes an advisory lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})


def _upsert(conn: Connection, table: Table, key: dict, insert: dict, update: dict) -> None:
    """Update the row of ``key`` (``update``), or insert ``insert`` where there is none. Where
    another writer inserts that row at the same moment (PostgreSQL: our INSERT waits for theirs,
    then fails on the unique key), ours updates the row it wrote: never two rows, never an
    error."""
    where = [table.c[k] == v for k, v in key.items()]
    if conn.execute(table.update().where(*where).values(**update)).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(table.insert().values(**insert))
    except IntegrityError:
        conn.execute(table.update().where(*where).values(**update))


def _complete(conn: Connection) -> None:
    """Bring a database of schema 1 up to date: make the tables added since, and rename its
    trials table (``LEGACY_TRIALS``, the name Optuna's own tables need)."""
    _lock_schema(conn)
    found = inspect(conn)
    tables = set(found.get_table_names())
    ours = LEGACY_TRIALS in tables and Trial.__tablename__ not in tables
    if ours and "chip" in {c["name"] for c in found.get_columns(LEGACY_TRIALS)}:  # not Optuna's
        conn.execute(text(f"ALTER TABLE {LEGACY_TRIALS} RENAME TO {Trial.__tablename__}"))
        conn.execute(text(f"DROP INDEX IF EXISTS ix_{LEGACY_TRIALS}_chip"))
        for index in Trial.__table__.indexes:
            index.create(conn)
    _Base.metadata.create_all(conn)


def connect_args(backend: str) -> dict:
    """The driver's arguments for a database of ``backend`` (a URL's backend name): how long to
    wait for a lock or a server."""
    if backend == "sqlite":
        return {"timeout": BUSY_TIMEOUT_MS / 1000}
    if backend == "postgresql":
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


class TuningDB:
    """A tuning database.

    On SQLite, readers never wait (WAL); writers take the write lock when their transaction
    begins and wait up to ``BUSY_TIMEOUT_MS`` for it, so several tuning and dispatching
    processes can share one file. On PostgreSQL, the server's row locks and unique keys do
    the same for processes on many machines. Every failure of the database surfaces as
    :class:`DatabaseError`. ``shown`` is the URL as messages print it (no password).

    Args:
        url: a SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://host/db``) or a plain
            file path.
        create: create the file and tables when missing; when False a missing file raises.
    """

    def __init__(self, url: str, *, create: bool = True):
        self.url = as_url(url)
        self.shown = shown_url(self.url)
        path = url_path(self.url)
        # A file in a folder this process cannot write (a shared install) is read as it is:
        # SQLite's WAL would need to make files beside it. Its writes fail.
        self.read_only = (
            not create and path is not None and path.exists() and not _writable(path.parent)
        )
        try:
            if path is not None and not path.exists():
                if not create:
                    raise DatabaseError(f"no tuning database at {path}")
                path.parent.mkdir(parents=True, exist_ok=True)
            args = connect_args(make_url(self.url).get_backend_name())
            read = f"sqlite:///file:{path}?immutable=1&uri=true" if self.read_only else self.url
            self.engine = self._writer = create_engine(read, connect_args=args)
        except ImportError as e:  # the URL's driver is not installed
            raise DatabaseError(
                f"cannot open a tuning database at {self.shown}: {e} (PostgreSQL needs the fleet "
                "extra: pip install 'mlx-primitives[fleet]')"
            ) from e
        except (OSError, SQLAlchemyError) as e:
            raise DatabaseError(f"cannot open a tuning database at {self.shown}: {e}") from e
        if self.engine.dialect.name == "sqlite" and path is not None and not self.read_only:
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
        return f"TuningDB({self.shown!r})"

    def _prepare(self, create: bool) -> None:
        try:
            with self.engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
        except Exception as e:  # not a database at all, or unreadable
            kind = "SQLite database" if self.engine.dialect.name == "sqlite" else "database"
            raise DatabaseError(f"{self.shown} is not a readable {kind} ({e}){_HINT}") from e
        if "meta" not in tables:
            if tables - {"meta"}:
                raise DatabaseError(
                    f"{self.shown} is not a tuning database (tables: {sorted(tables)[:8]}){_HINT}"
                )
            if not create:
                raise EmptyDatabaseError(f"{self.shown} holds no tuning tables")
            self._create()
        version = self.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise DatabaseError(
                f"{self.shown} has schema version {version}, this mlx-primitives reads "
                f"{SCHEMA_VERSION}: export it with the version that wrote it, or start a new one"
                f"{_HINT}"
            )
        missing = {t.name for t in _Base.metadata.sorted_tables} - tables - {"meta"}
        if tables - {"meta"} and missing - ADDED_TABLES:
            raise DatabaseError(f"{self.shown} lacks the tables {sorted(missing)}{_HINT}")
        if missing:
            try:
                with self._writer.begin() as conn:
                    _complete(conn)
            except SQLAlchemyError:  # read-only: the records still serve; tuning fails later
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
                    _lock_schema(conn)
                    _Base.metadata.create_all(conn)
                    meta = _Meta.__table__
                    have = set(conn.execute(select(meta.c.key)).scalars())
                    rows = [
                        {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                        {"key": "created_at", "value": now()},
                    ]
                    rows = [r for r in rows if r["key"] not in have]
                    if rows:
                        conn.execute(meta.insert(), rows)
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
                        f"[mlx_primitives] ignoring row {row['id']} of {self.shown}: {e}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return out

    @_guard
    def read(self, work: Callable[[Connection], T]) -> T:
        """``work(connection)`` on a connection that reads; returns what it returns."""
        with self.engine.connect() as conn:
            return work(conn)

    @_guard
    def write(self, work: Callable[[Connection], T]) -> T:
        """``work(connection)`` in one write transaction (on SQLite holding the write lock from
        its start); returns what it returns."""
        with self._writer.begin() as conn:
            return work(conn)

    @_guard
    def put(self, record: TuningRecord, fence: Callable[[Connection], None] | None = None) -> None:
        """Insert or replace the record for its (chip, op, problem), atomically.

        Args:
            record: the record.
            fence: called first, in the same transaction; what it raises keeps the record out
                (a tuner's check that it still holds the problem's lease).
        """
        if not isinstance(record, TuningRecord):
            raise TypeError(f"[TuningDB.put] expected a TuningRecord, got {type(record).__name__}")
        row = record.to_row()
        with self._writer.begin() as conn:
            if fence is not None:
                fence(conn)
            key = {k: row[k] for k in ("chip", "op", "problem")}
            _upsert(conn, _records, key, row, row)

    @_guard
    def put_if(self, record: TuningRecord, wanted: Callable[[TuningRecord | None], bool]) -> bool:
        """Put the record where ``wanted(current)`` says so of the record now stored for its
        (chip, op, problem) (None: none, or one not well-formed), read and written in one
        transaction that holds the row: a writer in between cannot be overwritten unseen.
        Returns whether it was put."""
        row = record.to_row()
        key = {k: row[k] for k in ("chip", "op", "problem")}
        where = [_records.c[k] == v for k, v in key.items()]
        with self._writer.begin() as conn:
            found = conn.execute(select(_records).where(*where).with_for_update()).mappings()
            found = found.first()
            try:
                current = None if found is None else TuningRecord.from_row({**found})
            except RecordError:
                current = None
            if not wanted(current):
                return False
            _upsert(conn, _records, key, row, row)
        return True

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
                key = {"chip": chip, "op": op, "problem": problem}
                added = {"calls": _hits.c.calls + calls, "last_seen": stamp}
                new = {**key, "calls": calls, "first_seen": stamp, "last_seen": stamp}
                _upsert(conn, _hits, key, new, added)

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
        """SQLite's integrity check. A server (PostgreSQL) checks its own storage: there a
        readable records table passes."""
        with self.engine.connect() as conn:
            if conn.dialect.name != "sqlite":
                conn.execute(select(_records.c.id).limit(1)).all()
                return True
            return conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    def close(self) -> None:
        self.engine.dispose()
        self._writer.dispose()
