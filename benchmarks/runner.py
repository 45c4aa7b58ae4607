"""Run a benchmark suite: ``python -m benchmarks.runner --suite norms [-o results.json]``.

Timings are ratios measured in one run on one device; the result file names the device, the
MLX version and the date, and is what the benchmark pages in docs/benchmarks/ and the README's
results table are generated from (tools/docs_pages.py). A run stopped before its end (Ctrl-C,
SIGTERM) still writes the problems it measured, marked ``stopped``, and exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import signal
import sys
from pathlib import Path

from . import common, suites


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(suites.__path__))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runner", description=__doc__)
    p.add_argument("--suite", required=True, choices=available())
    p.add_argument("-o", "--output", help="write the results as JSON here")
    p.add_argument("--op", action="append", help="only these ops")
    p.add_argument(
        "--sizes",
        choices=("small", "large"),
        help="problem sizes (default: large on a GPU, small on the CPU)",
    )
    p.add_argument(
        "--tune",
        choices=("quick", "default", "full"),
        help="tune each benchmarked problem first, with this preset's budget",
    )
    p.add_argument("--budget", type=float, default=0.3, help="timing seconds per measurement")
    p.add_argument(
        "--tune-budget",
        type=float,
        help="seconds the model suite's tuning of the recorded problems may take (default: all)",
    )
    p.add_argument(
        "--section",
        action="append",
        help="only these sections (attention: problems, seed, window, decode, memory)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # what timeout(1) and job schedulers send
    status = 0
    try:
        result = importlib.import_module(f"benchmarks.suites.{args.suite}").run(args)
    except KeyboardInterrupt as e:
        rows = common.MEASURED.get("rows")
        if not (args.output and rows):
            raise
        # What was measured is kept, marked as the part it is.
        how = str(e) or "interrupted"
        result = {
            **common.MEASURED["header"],
            "results": rows,
            "stopped": f"{how} after {_done(rows)}",
        }
        print(f"[{args.suite}] {result['stopped']}: writing what it measured", flush=True)
        status = 130
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return status


def _done(rows: list[dict]) -> str:
    """How far a stopped run got: its problems (a model's rows: its sections)."""
    if all("problem" in r for r in rows):
        return f"{len({r['problem'] for r in rows})} problems"
    return f"{len(rows)} sections of {len({r['model'] for r in rows})} models"


def _stop(signum, frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


if __name__ == "__main__":
    sys.exit(main())
