"""Recording what an application hits: the calls the dispatcher serves, counted per problem.

``with mp.record():`` (or ``MLXP_RECORD=1`` for a whole process) counts each call by its
problem key; at the end the counts are added to the tuning database's ``hits`` table for this
chip, where ``mlxp-tune hits`` lists them and ``mlxp-tune tune --recorded`` tunes them. A call
with known argument marks costs one more function call and an integer increment while
recording, and nothing otherwise: the dispatcher keeps the counting wrapper only in its
per-call cache, which is emptied whenever recording starts or stops.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator

# (op, problem key) -> a one-element list of calls: the wrappers increment it in place.
_counts: dict[tuple[str, str], list[int]] = {}
_depth = 0


def active() -> bool:
    """Whether calls are being counted now."""
    return _depth > 0


def counted(op: str, problem: str, fn: Callable, arity: int) -> Callable:
    """``fn`` (taking ``arity`` positional arguments) counting its calls under ``(op,
    problem)``; written out for the arity, as ``*args`` cost as much again as the count."""
    cell = _counts.setdefault((op, problem), [0])
    names = ", ".join(f"a{i}" for i in range(arity))
    scope = {"cell": cell, "fn": fn}
    source = f"def call({names}):\n    cell[0] += 1\n    return fn({names})\n"
    exec(compile(source, f"<counted {op}>", "exec"), scope)
    return scope["call"]


def _toggle(step: int) -> None:
    from . import dispatch

    global _depth
    _depth += step
    dispatch.forget_calls()  # cached calls take (or drop) their counting wrappers


def counts() -> dict[tuple[str, str], int]:
    """The calls counted since the last flush, by ``(op, problem key)``."""
    return {key: cell[0] for key, cell in _counts.items() if cell[0]}


def flush(db: str | None = None) -> int:
    """Add the counts to the database (``db``: a path or URL; default the user database) for
    this chip and start again from zero; returns the calls written."""
    found = counts()
    if not found:
        return 0
    from .hardware import detect_chip
    from .store import default_user_url
    from .store.database import TuningDB

    database = TuningDB(db or default_user_url())
    try:
        database.add_hits(detect_chip().slug, found)
    finally:
        database.close()
    for key in found:
        _counts[key][0] -= found[key]
    return sum(found.values())


@contextlib.contextmanager
def record(db: str | None = None) -> Iterator[None]:
    """Count the problems the calls in this block hit, and store the counts at its end.

    Args:
        db: the tuning database (a path or SQLAlchemy URL; default ``$MLXP_TUNING_DB`` or the
            user data folder).
    """
    _toggle(1)
    try:
        yield
    finally:
        _toggle(-1)
        flush(db)


def _from_environment() -> None:
    """``MLXP_RECORD=1``: record the whole process, stored at exit."""
    if os.environ.get("MLXP_RECORD", "").strip() not in ("", "0"):
        _toggle(1)
        atexit.register(flush)
