"""A throwaway PostgreSQL server for the fleet tests, started from Debian's binaries
(``/usr/lib/postgresql/<version>/bin``): a cluster in a temporary folder, trust
authentication, listening only on a unix socket in that folder, stopped at the end.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user
(Debian's package makes it) and the server runs as that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

# CI sets it: there a missing server fails the fleet tests instead of skipping them.
REQUIRE = "MLXP_REQUIRE_POSTGRES"
PORT = 5432  # names the socket file only: the server listens on no TCP port


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    found = [b for b in found if (b / "initdb").exists() and (b / "pg_ctl").exists()]
    return found[-1] if found else None


def unavailable() -> str | None:
    """Why no server can be started here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[dev]')"
    if binaries() is None:
        return "no PostgreSQL binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


class Server:
    """A PostgreSQL cluster in a temporary folder, running until :meth:`stop`.

    Args:
        bin_dir: the folder of ``initdb``, ``pg_ctl`` and ``postgres``.
    """

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="mlxp-postgres-"))
        self.data = self.root / "data"
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--locale=C", "-E", "UTF8"
        )
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.root}' -c port={PORT} "
            # A throwaway cluster: durability buys nothing and costs seconds.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = self.root / "server.log"
        self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-o", options, "start")

    def _run(self, tool: str, *args) -> None:
        cmd = [str(self.bin / tool), *map(str, args)]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        # From the cluster's folder: the postgres user may not enter the caller's.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"[postgres] {tool} failed: {done.stderr[-2000:]}{tail}")

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={PORT}"

    def new_database(self) -> str:
        """A new, empty database on this server; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=str(self.root), port=PORT, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
