"""Build the pretuned database of this machine's chip: tune, export, report.

    python tools/pretune.py [--preset default] [--out tuning_db] [--db /tmp/pretune.sqlite]

Tunes every op with the preset into a fresh database (so no record of another machine leaks in)
and exports this chip's records to ``<out>/<chip-slug>.json``, the file the dispatcher reads on
this chip. Review the result with ``python tools/compare_db.py OLD NEW``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="default", choices=("quick", "default", "full"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tuning_db"))
    p.add_argument("--db", help="the scratch database (default: a new temporary file)")
    p.add_argument("--op", action="append", help="only these ops")
    args = p.parse_args(argv)

    db = args.db or os.path.join(tempfile.mkdtemp(prefix="mlxp-pretune-"), "tuning.sqlite")
    from mlx_primitives.hardware import detect_chip
    from mlx_primitives.tuning.cli import main as cli

    slug = detect_chip().slug
    tune = ["tune", "--preset", args.preset, "--db", db]
    for name in args.op or []:
        tune += ["--op", name]
    code = cli(tune)
    if code not in (0, 1):
        return code
    out = Path(args.out) / f"{slug}.json"
    export = cli(["export", str(out), "--db", db, "--chip", slug])
    print(f"pretuned database for {slug}: {out}")
    return code or export


if __name__ == "__main__":
    sys.exit(main())
