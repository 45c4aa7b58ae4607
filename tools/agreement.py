"""Tune the same problems twice on this machine and report how often the winners differ.

    python tools/agreement.py [--preset quick] [--op OP]... [--load N] [--json] [-o FILE]

Where candidates tie (within noise of each other) the tuner's fixed order picks, so the runs
agree; a disagreement means two candidates were apart by more than noise in one run and not
in the other. Each disagreement is listed with both runs' winner and default latencies and
how each was decided. Problems a run found the machine too noisy to decide (a win it could
not confirm is not recorded; a finalists' round that could not tell keeps the default) are
counted apart: the agreement is over the problems both runs decided. ``--load N`` runs N busy
processes beside the two runs (a loaded machine); ``-o`` writes the report as a result file
naming the device, MLX version and date (``benchmarks/results/agreement-<chip>.json`` makes
``docs/benchmarks/agreement.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# A busy process: spins until its parent is gone (a killed tool leaves none behind).
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(10000))\n"


@contextlib.contextmanager
def loaded(processes: int):
    """``processes`` busy processes running while the block runs; yields them."""
    busy: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            busy.append(subprocess.Popen([sys.executable, "-c", BUSY]))
        yield busy
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def header(preset: str, load: int) -> dict:
    """What the result file says of the run: the device, the versions, the date, the load."""
    from mlx_primitives.tuning.timing import measured_on

    return {
        "suite": "agreement",
        "about": __doc__.strip().splitlines()[0],
        **measured_on(),
        "preset": preset,
        "load": load,
    }


def run_twice(preset: str, op_names: list[str] | None) -> dict:
    from mlx_primitives.registry import ops
    from mlx_primitives.store.database import TuningDB
    from mlx_primitives.tuning.tuner import BUDGETS, Tuner

    selected = [o for o in ops() if not op_names or o.name in op_names]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            tuner = Tuner(TuningDB(str(Path(tmp) / f"run{i}.sqlite")), BUDGETS[preset], seed=i)
            outcomes = [tuner.tune(o, ex) for o in selected for ex in o.presets[preset]]
            runs.append({out.problem: out for out in outcomes})
    a, b = runs
    decided = [
        {p for p, out in run.items() if out.record is not None and not out.noisy} for run in runs
    ]
    problems = sorted(decided[0] & decided[1])
    differ = []
    for p in problems:
        ra, rb = a[p].record, b[p].record
        if (ra.variant, ra.params) != (rb.variant, rb.params):
            differ.append(
                {
                    "problem": p,
                    "runs": [
                        {
                            **{
                                k: getattr(out.record, k)
                                for k in ("variant", "params", "median_s", "default_median_s")
                            },
                            "note": out.note,
                        }
                        for out in (a[p], b[p])
                    ],
                }
            )
    undecided = [
        {"run": i, "problem": p, "note": out.note}
        for i, run in enumerate(runs)
        for p, out in sorted(run.items())
        if out.noisy
    ]
    return {
        "problems": len(problems),
        "disagreements": len(differ),
        "rate": len(differ) / max(len(problems), 1),
        "agreement": 1 - len(differ) / max(len(problems), 1),
        "undecided": [sum(u["run"] == i for u in undecided) for i in range(2)],
        "details": differ,
        "undecided_details": undecided,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset", default="quick", choices=("quick", "default", "full"), help="what to tune"
    )
    p.add_argument("--op", action="append", help="only these ops (default: every op)")
    p.add_argument("--load", type=int, default=0, help="busy processes beside the runs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-o", "--output", type=Path, help="write the report as a result file")
    args = p.parse_args(argv)
    with loaded(args.load):
        report = run_twice(args.preset, args.op)
    if args.output:
        args.output.write_text(json.dumps({**header(args.preset, args.load), **report}, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{report['disagreements']} of {report['problems']} problems decided by both runs got "
        f"different winners (agreement {100 * report['agreement']:.1f}%); too noisy to decide: "
        f"{report['undecided'][0]} problems in the first run, {report['undecided'][1]} in the "
        "second"
    )
    for d in report["details"]:
        a, b = d["runs"]
        print(
            f"  {d['problem']}: {a['variant']} {a['params']} "
            f"({a['median_s'] * 1e6:.1f} vs default {a['default_median_s'] * 1e6:.1f} us) | "
            f"{b['variant']} {b['params']} "
            f"({b['median_s'] * 1e6:.1f} vs default {b['default_median_s'] * 1e6:.1f} us)"
        )
        for run in (a, b):
            print(f"      {run['note']}")
    for u in report["undecided_details"]:
        print(f"  run {u['run'] + 1}, {u['problem']}: {u['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
