"""Leases: which worker tunes which (chip, op, problem) now, so that tuners sharing one database
(a fleet on PostgreSQL, or several processes on one SQLite file) split the work and tune
nothing twice.

A worker claims a problem before tuning it and holds the claim for ``seconds``; a heartbeat
renews it while the problem is tuned, and it is released when the problem is done. A worker
that dies stops renewing: once its lease has expired, another worker may take the problem
over; on the dead worker's own host at once, where its pid no longer runs (a tuner that
crashed or stopped on a hung candidate is resumed without waiting). Expiry times are read on
the database's clock (PostgreSQL's ``clock_timestamp()``; this machine's for SQLite, a file
on one machine), so the workers' clocks never compare.

The claim is one transaction: an UPDATE that takes the row only where it is expired or this
worker's own, then, where there is no row, an INSERT that the primary key lets only one
worker make. PostgreSQL re-checks the UPDATE's condition on the newest row after waiting for
another writer's lock, and SQLite's writers hold the write lock from their transaction's
start, so no check-then-write race is left on either.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time

from sqlalchemy import Connection, or_, select, text
from sqlalchemy.exc import IntegrityError

from .database import TuningDB, leases_table

# How long a claim holds without a heartbeat (``mlxp-tune tune --lease``).
DEFAULT_LEASE_S = 120.0
# The shortest lease: a heartbeat must fit in it several times over.
MIN_LEASE_S = 1.0


class LeaseLost(RuntimeError):
    """This worker's lease expired and another worker took the problem over."""


def worker_id() -> str:
    """This process as a lease owner: ``host:pid:random`` (the random part tells apart two
    processes that got the same pid, on one host or in two containers)."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{secrets.token_hex(4)}"


def _dead(owner: str) -> bool:
    """Whether ``owner`` (a :func:`worker_id`) was a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname()[:200] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        pass
    return False


def _match(key: dict) -> list:
    """The WHERE clauses of one problem's lease."""
    return [leases_table.c[k] == v for k, v in key.items()]


def _clock(conn: Connection) -> float:
    """Seconds since the epoch on the database's clock."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar())
    return time.time()


class Leases:
    """The leases of one worker in one database.

    Args:
        db: the tuning database the workers share.
        owner: this worker's id (default :func:`worker_id`).
        seconds: how long a claim holds without being renewed.
    """

    def __init__(self, db: TuningDB, owner: str | None = None, seconds: float = DEFAULT_LEASE_S):
        if not seconds >= MIN_LEASE_S:
            raise ValueError(f"[Leases] seconds must be at least {MIN_LEASE_S:g}, got {seconds}")
        self.db = db
        self.owner = owner or worker_id()
        self.seconds = float(seconds)

    def claim(self, chip: str, op: str, problem: str) -> Lease | None:
        """Take the problem's lease: a new one, an expired one, one of a dead process of this
        host, or this worker's own again. Returns it (not yet renewed: enter it as a
        context), or None while another worker's lease on the problem is live."""
        key = {"chip": chip, "op": op, "problem": problem}
        if self.db.write(lambda conn: self._take(conn, key)):
            return Lease(self, key)
        holder = self.holder(chip, op, problem)
        if holder is None or not _dead(holder):
            return None
        return Lease(self, key) if self.db.write(lambda c: self._take(c, key, holder)) else None

    def _take(self, conn: Connection, key: dict, dead: str | None = None) -> bool:
        """The claim's transaction: take the row where it is expired, this worker's or
        ``dead``'s; where there is none, insert it (the primary key admits one worker)."""
        table = leases_table
        now = _clock(conn)
        held = {"owner": self.owner, "expires_at": now + self.seconds}
        free = [table.c.expires_at < now, table.c.owner == self.owner]
        if dead is not None:
            free.append(table.c.owner == dead)
        if conn.execute(table.update().where(*_match(key), or_(*free)).values(**held)).rowcount:
            return True
        try:
            with conn.begin_nested():
                conn.execute(table.insert().values(**key, **held))
        except IntegrityError:  # a live lease of another worker, or one taken just now
            return False
        return True

    def holder(self, chip: str, op: str, problem: str) -> str | None:
        """Who holds the problem's lease (live or expired), for messages; None when nobody."""
        key = {"chip": chip, "op": op, "problem": problem}
        query = select(leases_table.c.owner).where(*_match(key))
        return self.db.read(lambda conn: conn.execute(query).scalar())


class Lease:
    """One claimed problem. As a context, a heartbeat thread renews it every third of its
    time, and it is released at the end; ``lost`` turns true when a renewal finds it taken.

    Args:
        leases: the worker's leases.
        key: the problem: chip, op and problem key.
    """

    def __init__(self, leases: Leases, key: dict):
        self.leases = leases
        self.key = key
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _renew(self, conn: Connection) -> bool:
        mine = [*_match(self.key), leases_table.c.owner == self.leases.owner]
        until = _clock(conn) + self.leases.seconds
        done = conn.execute(leases_table.update().where(*mine).values(expires_at=until))
        return done.rowcount == 1

    def fence(self, conn: Connection) -> None:
        """Renew the lease inside the caller's transaction (``TuningDB.put``'s), which then
        holds the lease's row until it commits; raises :class:`LeaseLost` where another worker
        has taken it over, so its record stands."""
        if not self._renew(conn):
            self.lost = True
            raise LeaseLost(
                f"[lease] {self.key['chip']} {self.key['problem']}: this worker's lease "
                "expired and another worker took the problem over"
            )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.leases.seconds / 3):
            try:
                if not self.leases.db.write(self._renew):
                    self.lost = True
                    return
            except Exception:  # a database away for a moment: the next beat tries again
                continue

    def __enter__(self) -> Lease:
        self._beat = threading.Thread(target=self._heartbeat, name="mlxp-lease", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        mine = [*_match(self.key), leases_table.c.owner == self.leases.owner]
        self.leases.db.write(lambda conn: conn.execute(leases_table.delete().where(*mine)))
