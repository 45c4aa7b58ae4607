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
import warnings
from collections.abc import Callable, Iterator


class _Recorder:
    """One recording (a ``record`` block, or the process under ``MLXP_RECORD``): its
    database and its counts, ``(op, problem key) -> [calls]``, incremented in place."""

    def __init__(self, db: str | None):
        self.db = db
        self.cells: dict[tuple[str, str], list[int]] = {}

    def counts(self) -> dict[tuple[str, str], int]:
        return {key: cell[0] for key, cell in self.cells.items() if cell[0]}

    def flush(self) -> int:
        """Add the counts to the database for this chip, then start again from zero."""
        found = self.counts()
        if not found:
            return 0
        from .hardware import detect_chip
        from .store import default_user_url
        from .store.database import TuningDB

        database = TuningDB(self.db or default_user_url())
        try:
            database.add_hits(detect_chip().slug, found)
        finally:
            database.close()
        for key, calls in found.items():
            self.cells[key][0] -= calls
        return sum(found.values())


# The recordings in progress, innermost last: a call counts in the innermost only, so that
# each call is stored once, in the database of the block it ran in.
_stack: list[_Recorder] = []


def active() -> bool:
    """Whether calls are being counted now."""
    return bool(_stack)


def counted(op: str, problem: str, fn: Callable, arity: int) -> Callable:
    """``fn`` (taking ``arity`` positional arguments) counting its calls under ``(op,
    problem)`` in the innermost recording; written out for the arity, as ``*args`` cost as
    much again as the count. The dispatcher keeps it until the recordings change."""
    cell = _stack[-1].cells.setdefault((op, problem), [0])
    names = ", ".join(f"a{i}" for i in range(arity))
    scope = {"cell": cell, "fn": fn}
    source = f"def call({names}):\n    cell[0] += 1\n    return fn({names})\n"
    exec(compile(source, f"<counted {op}>", "exec"), scope)
    return scope["call"]


def _forget() -> None:
    from . import dispatch

    dispatch.forget_calls()  # cached calls take (or drop) their counting wrappers


def counts() -> dict[tuple[str, str], int]:
    """The calls the innermost recording counted and has not stored yet."""
    return _stack[-1].counts() if _stack else {}


@contextlib.contextmanager
def record(db: str | None = None) -> Iterator[None]:
    """Count the problems the calls in this block hit, and store the counts at its end.

    Calls inside ``mx.compile``'d functions count once per trace, not per call (the compiled
    graph does not come back to the dispatcher).

    Args:
        db: the tuning database (a path or SQLAlchemy URL; default ``$MLXP_TUNING_DB`` or the
            user data folder).
    """
    recorder = _Recorder(db)
    _stack.append(recorder)
    _forget()
    try:
        yield
    finally:
        _stack.remove(recorder)
        _forget()
        _store(recorder)


def _store(recorder: _Recorder) -> None:
    """Store ``recorder``'s counts; a database that cannot take them (unreadable, read-only) is
    reported, never raised into the program that recorded."""
    try:
        recorder.flush()
    except Exception as e:
        warnings.warn(
            f"[record] the counts were not stored: {e}. Run `mlxp-tune doctor` for how to recover.",
            RuntimeWarning,
            stacklevel=4,
        )


def _from_environment() -> None:
    """``MLXP_RECORD=1``: record the whole process (under any ``record`` block), stored at
    exit."""
    if os.environ.get("MLXP_RECORD", "").strip() not in ("", "0"):
        recorder = _Recorder(None)
        _stack.insert(0, recorder)
        _forget()
        atexit.register(_store, recorder)
