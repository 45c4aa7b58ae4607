"""``mlxp-tune merge``: fold the exports of a fleet into one database.

Where two records are of the same (chip, op, problem), the one that ranks higher stays:

1. a current record before a stale one (another MLX series, other kernel sources);
2. then the larger ``speedup_low``, the speedup that holds even at the winner's slow end (a
   record that kept the default has 1), so the surer win stays;
3. then the later ``created_at``;
4. on a full tie, the one met first: the database's own, then the files in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..registry import op as get_op
from ..store.database import TuningDB
from ..tuning_record import TuningRecord

# Where a record came from, for the one in the database before the merge.
DATABASE = "the database"


def rank(record: TuningRecord) -> tuple[bool, float, str]:
    """The record's place in the rule above: the higher, the better."""
    return (record.stale(get_op(record.op)) is None, record.speedup_low, record.created_at)


def why(winner: TuningRecord, loser: TuningRecord) -> str:
    """Which step of the rule decided between two records of one problem."""
    (w_current, w_low, w_when), (l_current, l_low, l_when) = rank(winner), rank(loser)
    if w_current != l_current:
        return "current over stale"
    if w_low != l_low:
        return f"speedup_low {w_low:.3f} over {l_low:.3f}"
    if w_when != l_when:
        return f"later ({w_when} over {l_when})"
    return "a tie: the first met stays"


@dataclass
class Merge:
    """What a merge did: one line per incoming record (``added``, ``replaced``, ``kept``),
    and each problem's winner with its source and the number of the line that made it so."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    winners: dict[tuple[str, str, str], tuple[TuningRecord, str, int]] = field(default_factory=dict)

    def count(self, what: str) -> int:
        return sum(kind == what for kind, _ in self.lines)


def fold(db: TuningDB, incoming: list[tuple[TuningRecord, str]]) -> Merge:
    """Fold ``incoming`` records (each with its source, a file name) into ``db``'s by the rule
    above, and write the winners that were not in ``db`` already.

    Args:
        db: the database merged into.
        incoming: valid records (``import``'s check passed), in the order of their files.
    """
    merge = Merge()
    best = merge.winners
    for rec in db.records():
        best[(rec.chip, rec.op, rec.problem)] = (rec, DATABASE, -1)
    for rec, source in incoming:
        key = (rec.chip, rec.op, rec.problem)
        name = f"{rec.chip} {rec.problem}"
        if key not in best:
            best[key] = (rec, source, len(merge.lines))
            merge.lines.append(("added", f"{name} from {source}"))
            continue
        held, held_from, _ = best[key]
        if rank(rec) > rank(held):
            best[key] = (rec, source, len(merge.lines))
            reason = f"{source}'s record over {held_from}'s: {why(rec, held)}"
            merge.lines.append(("replaced", f"{name}: {reason}"))
        else:
            reason = f"{held_from}'s record over {source}'s: {why(held, rec)}"
            merge.lines.append(("kept", f"{name}: {reason}"))
    for rec, source, line in best.values():
        # A worker may have written a record of the problem since it was read: it stays where
        # the rule ranks it at least as high.
        if source != DATABASE and not db.put_if(
            rec, lambda now, r=rec: now is None or rank(r) > rank(now)
        ):
            name = f"{rec.chip} {rec.problem}"
            merge.lines[line] = ("kept", f"{name}: a record written since ranks at least as high")
    return merge
