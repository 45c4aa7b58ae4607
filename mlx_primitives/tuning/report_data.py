"""What ``mlxp-tune report`` shows: per chip and op, the problems with a record of their own
(the user's runs or the shipped file) and the problems the nearest rule serves.

The records are those dispatch reads (:func:`mlx_primitives.dispatch.entries`); the problems
the nearest rule serves are the op's ``default`` preset problems and the problems recorded on
the chip (``mp.record``) that have no record of their own, decided by dispatch's own rule
(:func:`mlx_primitives.dispatch.nearest`) for the chip's back-end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .. import dispatch
from ..hardware.chip import slug_backend
from ..problem import EXACT, Problem, parse_dtype
from ..registry import Op
from ..tuning_record import TuningRecord

# Where the record shown for a problem comes from, as the page names it.
SOURCES = {"user": "user", "pretuned": "shipped", "nearest": "nearest"}


@dataclass(frozen=True)
class Entry:
    """One problem of the report and the record that serves it.

    Args:
        problem: the problem.
        record: its own record, or (``source`` ``nearest``) the record of the problem that
            serves it by the nearest rule.
        source: ``user``, ``pretuned`` or ``nearest``.
        stale: why the record no longer describes this installation, or None.
    """

    problem: Problem
    record: TuningRecord
    source: str
    stale: str | None

    @property
    def measured(self) -> bool:
        """Whether the record's times are this problem's own."""
        return self.source != "nearest"

    def to_dict(self) -> dict:
        """The numbers shown for the problem, as the page embeds them."""
        rec = self.record
        return {
            "problem": self.problem.key,
            "source": self.source,
            "via": None if self.measured else rec.problem,
            "variant": rec.variant,
            "params": rec.params,
            "kept_default": rec.kept_default,
            "median_s": rec.median_s,
            "default_median_s": rec.default_median_s,
            "speedup": finite(rec.speedup),
            "speedup_low": finite(rec.speedup_low),
            "stale": self.stale is not None,
        }


@dataclass(frozen=True)
class OpReport:
    """The entries of one op on one chip, ordered by dtype, exact dims, then size.

    Args:
        chip: the chip's slug.
        op: the op.
        entries: the problems with a record that serves them.
        untuned: the ``default`` preset and recorded problems that no record serves.
    """

    chip: str
    op: Op
    entries: tuple[Entry, ...]
    untuned: tuple[str, ...]

    @property
    def shared(self) -> list[str]:
        """The problem fields that every entry shares (shown once, in the section's title)."""
        fields = [fields_of(e.problem) for e in self.entries]
        if len(fields) < 2:
            return []
        return [f for f in fields[0] if all(f in other for other in fields[1:])]

    def label(self, entry: Entry) -> str:
        """The fields that tell ``entry``'s problem apart from the others'."""
        shared = self.shared
        return " ".join(f for f in fields_of(entry.problem) if f not in shared) or "-"


def without_op(key: str) -> str:
    """A problem key without its op's name (which a section's title says)."""
    return key.split("|", 1)[-1]


def fields_of(problem: Problem) -> list[str]:
    """A problem's dtype and its ``name=value`` dims, as in its key."""
    return [problem.dtype, *problem.key.split("|")[2].split(",")]


def _order(problem: Problem) -> tuple:
    exact = tuple(str(v) for d, v in zip(problem.dims, problem.values) if d.kind == EXACT)
    return (problem.dtype, exact, problem.size, problem.key)


def _preset_problems(op: Op) -> list[Problem]:
    """The problems of the op's ``default`` preset (arrays are made lazily: nothing runs)."""
    out = []
    for ex in op.presets.get("default", []):
        args = op.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
        out.append(op.problem(*args))
    return out


def op_report(op: Op, chip: str, recorded: list[str]) -> OpReport:
    """``op``'s entries on ``chip``: its records (read as dispatch reads them, so the user
    database is ``MLXP_TUNING_DB``), and the problems that the nearest rule serves among its
    ``default`` preset problems and ``recorded`` (problem keys recorded on the chip)."""
    found = dispatch.entries(op, chip)
    backend = slug_backend(chip)
    # Each problem's own records, the user's first: the first that may serve is shown (as
    # dispatch picks it), else the first.
    own: dict[Problem, list[tuple[TuningRecord, str]]] = {}
    for source in ("user", "pretuned"):
        for p, rec, src in found:
            if src == source:
                own.setdefault(p, []).append((rec, src))
    entries = []
    for p, recs in own.items():
        usable = [(rec, src) for rec, src in recs if rec.unusable(op, p, backend) is None]
        rec, src = (usable or recs)[0]
        entries.append(Entry(p, rec, src, rec.stale(op)))
    wanted = {p.key: p for p in _preset_problems(op)}
    for key in recorded:
        try:
            wanted.setdefault(key, Problem.parse(key, op.dims))
        except ValueError:  # recorded by another version of the op's dims
            continue
    untuned = []
    for p in wanted.values():
        if p in own:
            continue
        near = dispatch.nearest(p, found, lambda rec, p=p: rec.unusable(op, p, backend))
        if near.record is None:
            untuned.append(p.key)
        else:
            entries.append(Entry(p, near.record, "nearest", near.record.stale(op)))
    entries.sort(key=lambda e: _order(e.problem))
    return OpReport(chip, op, tuple(entries), tuple(sorted(untuned)))


def summary(report: OpReport) -> dict:
    """One op's line of the summary table: its records by source and outcome, and its best
    current win."""
    own = [e for e in report.entries if e.measured]
    wins = [e for e in own if not e.record.kept_default]
    by_variant: dict[str, int] = {}
    for e in wins:
        by_variant[e.record.variant] = by_variant.get(e.record.variant, 0) + 1
    current = [e for e in wins if e.stale is None]  # a stale win serves nothing
    best = max(current, key=lambda e: e.record.speedup, default=None)
    return {
        "chip": report.chip,
        "op": report.op.name,
        "user": sum(e.source == "user" for e in own),
        "pretuned": sum(e.source == "pretuned" for e in own),
        "wins": len(wins),
        "kept": len(own) - len(wins),
        "stale": sum(e.stale is not None for e in own),
        "nearest": sum(not e.measured for e in report.entries),
        "untuned": len(report.untuned),
        "best_speedup": None if best is None else finite(best.record.speedup),
        "best_at": None if best is None else " ".join(fields_of(best.problem)),
        "wins_by_variant": dict(sorted(by_variant.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def finite(value: float) -> float | None:
    """``value`` for JSON (which has no infinity): None where it is not finite."""
    return value if math.isfinite(value) else None
