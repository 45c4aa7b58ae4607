"""Tune the same problems twice on this machine and report how often the winners differ.

    python tools/agreement.py [--preset quick] [--op OP]... [--json]

Where candidates tie (within noise of each other) the tuner's fixed order picks, so the runs
agree; a disagreement means two candidates were apart by more than noise in one run and not
in the other. Each disagreement is listed with both runs' winner and default latencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def run_twice(preset: str, op_names: list[str] | None) -> dict:
    from mlx_primitives.registry import ops
    from mlx_primitives.store.database import TuningDB
    from mlx_primitives.tuning.tuner import BUDGETS, Tuner

    selected = [o for o in ops() if not op_names or o.name in op_names]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            tuner = Tuner(TuningDB(str(Path(tmp) / f"run{i}.sqlite")), BUDGETS[preset], seed=i)
            runs.append(
                {
                    out.problem: out.record
                    for o in selected
                    for ex in o.presets[preset]
                    if (out := tuner.tune(o, ex)).record is not None
                }
            )
    a, b = runs
    problems = sorted(a.keys() & b.keys())
    differ = []
    for p in problems:
        ra, rb = a[p], b[p]
        if (ra.variant, ra.params) != (rb.variant, rb.params):
            differ.append(
                {
                    "problem": p,
                    "runs": [
                        {
                            k: getattr(r, k)
                            for k in ("variant", "params", "median_s", "default_median_s")
                        }
                        for r in (ra, rb)
                    ],
                }
            )
    return {
        "problems": len(problems),
        "disagreements": len(differ),
        "rate": len(differ) / max(len(problems), 1),
        "details": differ,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="quick", choices=("quick", "default", "full"))
    p.add_argument("--op", action="append")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = run_twice(args.preset, args.op)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{report['disagreements']} of {report['problems']} problems got different winners "
        f"({100 * report['rate']:.0f}%)"
    )
    for d in report["details"]:
        a, b = d["runs"]
        print(
            f"  {d['problem']}: {a['variant']} {a['params']} "
            f"({a['median_s'] * 1e6:.1f} vs default {a['default_median_s'] * 1e6:.1f} us) | "
            f"{b['variant']} {b['params']} "
            f"({b['median_s'] * 1e6:.1f} vs default {b['default_median_s'] * 1e6:.1f} us)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
