"""Compare two tuning exports (for reviewing a change to a pretuned database).

    python tools/compare_db.py OLD.json NEW.json

Lists problems added, removed, and whose winner changed, with each side's speedup over the
default; exits 0 either way (it reports, it does not judge).
"""

from __future__ import annotations

import argparse
import sys

from mlx_primitives.store.shipped import read


def _key(r: dict) -> tuple:
    return (r["chip"], r["op"], r["problem"])


def _winner(r: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
    return f"{r['variant']}({params}) {r['default_median_s'] / r['median_s']:.2f}x"


def compare(old: list[dict], new: list[dict]) -> list[str]:
    """Lines describing how ``new`` differs from ``old``."""
    a, b = {_key(r): r for r in old}, {_key(r): r for r in new}
    lines = []
    for k in sorted(b.keys() - a.keys()):
        lines.append(f"+ {k[1]} {k[2]}: {_winner(b[k])}")
    for k in sorted(a.keys() - b.keys()):
        lines.append(f"- {k[1]} {k[2]}: {_winner(a[k])}")
    for k in sorted(a.keys() & b.keys()):
        ra, rb = a[k], b[k]
        if (ra["variant"], ra["params"]) != (rb["variant"], rb["params"]):
            lines.append(f"~ {k[1]} {k[2]}: {_winner(ra)} -> {_winner(rb)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    args = p.parse_args(argv)
    lines = compare(read(args.old), read(args.new))
    print("\n".join(lines) if lines else "no differences in winners")
    return 0


if __name__ == "__main__":
    sys.exit(main())
