"""Where tuning records live: the user's database (:mod:`.database`, SQLAlchemy, imported
only where a database is opened) and the shipped per-chip exports (:mod:`.shipped`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

SCHEMA_VERSION = 1


class DatabaseError(RuntimeError):
    """A tuning database that cannot be used; the message says why and how to recover."""


class EmptyDatabaseError(DatabaseError):
    """An empty SQLite file: a database another process is creating right now, or nothing."""


def default_user_url() -> str:
    """``MLXP_TUNING_DB`` as a URL, else the platformdirs user data location."""
    value = os.environ.get("MLXP_TUNING_DB", "").strip()
    if value:
        return as_url(value)
    from platformdirs import user_data_dir

    return path_url(Path(user_data_dir("mlx-primitives")) / "tuning.sqlite")


def as_url(value: str) -> str:
    """A database given as a path or a URL, as a URL."""
    return value if "://" in value else path_url(value)


def shown_url(url: str) -> str:
    """``url`` as printed in messages and logs: a password in it replaced by ``***``."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


def path_url(path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def url_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for memory or another engine)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and len(url) > len(prefix):
        return Path(url[len(prefix) :])
    return None


def exists(url: str) -> bool:
    """Whether a database may be at ``url``: a SQLite file that exists, or any other URL."""
    path = url_path(url)
    return path is None or path.exists()
