"""Shipped (pretuned) databases: JSON exports in ``tuning_db/<chip-slug>.json``.

One record per line, sorted, so that a change to a shipped database reads well in a diff. The
dispatcher reads them as they are and never writes them; ``mlxp-tune export`` and ``import``
use the same format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._paths import data_dir
from ..tuning_record import TuningRecord
from . import SCHEMA_VERSION, DatabaseError

FORMAT = "mlx-primitives-tuning"


def path(chip: str) -> Path | None:
    """The pretuned database shipped for ``chip`` (a slug), if there is one."""
    found = data_dir("tuning_db") / f"{chip}.json"
    return found if found.is_file() else None


def chips() -> list[str]:
    """The slugs of the chips with a shipped database."""
    return sorted(p.stem for p in data_dir("tuning_db").glob("*.json"))


def write(dest, records: list[TuningRecord]) -> None:
    """Write ``records`` as an export at ``dest``, atomically."""
    rows = sorted((r.to_dict() for r in records), key=lambda r: (r["chip"], r["op"], r["problem"]))
    lines = ",\n".join("  " + json.dumps(r, sort_keys=True) for r in rows)
    body = f'{{"format": "{FORMAT}", "schema": {SCHEMA_VERSION}, "records": [\n{lines}\n]}}\n'
    tmp = Path(f"{dest}.tmp{os.getpid()}")
    try:
        tmp.write_text(body)
        os.replace(tmp, dest)
    finally:  # a destination that cannot be written leaves nothing behind
        tmp.unlink(missing_ok=True)


def read(src) -> list:
    """The entries of an export, unchecked (each is judged by its reader, so one bad record
    costs only itself); DatabaseError when the file is not an export this version reads."""
    try:
        data = json.loads(Path(src).read_text())
    except (OSError, ValueError) as e:
        raise DatabaseError(f"{src} is not a readable tuning export ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatabaseError(f"{src} is not an mlx-primitives tuning export")
    if data.get("schema") != SCHEMA_VERSION:
        raise DatabaseError(f"{src} has schema {data.get('schema')}, expected {SCHEMA_VERSION}")
    records = data.get("records")
    if not isinstance(records, list):
        raise DatabaseError(f"{src} has no list of records")
    return records
