"""Write the README's result tables from committed benchmark result files.

    python tools/readme_tables.py [--check]

Each table sits in README.md between ``<!-- results:FILE -->`` (or ``<!-- results:FILE
ops=A,B -->`` for those ops' rows only) and ``<!-- end results -->``, where FILE is a result
file in benchmarks/results/; the table is rebuilt from that file, so every figure in the
README comes from a committed measurement. ``--check`` exits 1 when the
README is not what the files say (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"(<!-- results:(?P<file>[\w.-]+)(?: ops=(?P<ops>[\w,]+))? -->\n)(?P<body>.*?)"
    r"(<!-- end results -->)",
    re.S,
)


def _shape(r: dict) -> str:
    flags = "".join(f" {k}={v}" for k, v in sorted(r["options"].items()) if k != "approximate")
    return "x".join(map(str, r["shape"])) + flags


def _via(d: dict) -> str:
    """How the dispatch chose, where no record of the problem's own did."""
    return f" ({d['source']})" if d.get("source") in ("nearest", "default") else ""


def table(result: dict, ops: list[str] | None = None) -> str:
    """A markdown table: per problem, the tuned dispatch (also in inference_mode, where it runs
    a custom kernel) and the best variant against the baseline, with achieved bandwidth (and
    its share of the copy ceiling on a GPU); only ``ops``' rows where given."""
    ceiling = result.get("copy_ceiling", {}).get("gb_per_s")
    head = (
        f"{result['device']}, MLX {result['mlx_version']}, {result['date'][:10]} "
        f"(`benchmarks/results/`; {result['method']})."
    )
    if ceiling:
        head += f" Copy ceiling measured in the same run: {ceiling:.0f} GB/s."
    if ops:
        head += f" Rows of {', '.join(ops)} only."
    if any("copy_gb_per_s" in r for r in result["results"]):
        head += (
            " The percentage after GB/s is of a copy kernel moving the same bytes, measured"
            " right after the problem, each evaluation starting as long after its chain's"
            " build began as the dispatch's did."
        )
    if any("inference_vs_baseline" in r for r in result["results"]):
        head += ' "-" under "in inference_mode": the dispatch runs no custom kernel.'
    lines = [
        head,
        "",
        "| op | shape | dtype | baseline (spread) | tuned dispatch | vs baseline "
        "| in inference_mode | GB/s | best variant | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in result["results"]:
        if ops and r["op"] not in ops:
            continue
        groups.setdefault((r["op"], r["problem"]), []).append(r)
    for rows in groups.values():
        d = next(r for r in rows if r["impl"] == "dispatch")
        base = next(r for r in rows if r["impl"] == "variant" and r["variant"] == d["baseline"])
        # The spread of the baseline the dispatch was timed with (older files: the variants').
        if "baseline_spread_s" in d:
            spread = 100 * d["baseline_spread_s"] / d["baseline_median_s"]
        else:
            spread = 100 * base["spread_s"] / base["median_s"]
        best = max((r for r in rows if r["impl"] == "variant"), key=lambda r: r["vs_baseline"])
        # Only a custom kernel has a gradient wrapper to skip (older files: not measured).
        inference = d.get("inference_vs_baseline")
        inference = f"{inference:.2f}x" if inference else "-"
        gbs = f"{d['gb_per_s']:.0f}"
        copy = d.get("copy_gb_per_s", ceiling)
        if copy:
            gbs += f" ({100 * d['gb_per_s'] / copy:.0f}%)"
        lines.append(
            f"| {d['op']} | {_shape(d)} | {d['dtype']} | {d['baseline']} (±{spread:.0f}%) | "
            f"{d['variant']}{_via(d)} | "
            f"{d['vs_baseline']:.2f}x | {inference} | {gbs} | {best['variant']} | "
            f"{best['vs_baseline']:.2f}x |"
        )
    failed = result.get("failed")
    if failed:
        lines += [
            "",
            "Not measured, out of memory on this device: "
            + "; ".join(f"{f['op']} {f['example']}" for f in failed)
            + ".",
        ]
    mem = result.get("memory")
    if mem:
        io = mem["io_bytes"]
        lines += [
            "",
            f"Peak memory of flash attention at {mem['shape']} {mem['dtype']} (q, k, v and "
            f"the output: {io / 2**20:.0f} MiB): the tuned dispatch ({mem['dispatch_variant']}) "
            f"{mem['dispatch'] / io:.2f}x, the blocked composition with 128 x 128 blocks "
            f"{mem['blocked'] / io:.2f}x"
            + (f", the flash kernel {mem['flash'] / io:.2f}x" if "flash" in mem else "")
            + "; the naive path's scores alone would be "
            f"{mem['naive_scores_bytes'] / io:.0f}x.",
        ]
    overhead = result.get("dispatch_overhead")
    if overhead:
        parts = ""
        if "checks_s" in overhead:  # older files: not measured
            parts = (
                f"; the argument checks alone took {overhead['checks_s'] * 1e6:.1f} us and the "
                f"cache lookup {overhead['lookup_s'] * 1e6:.1f} us"
            )
        lines += [
            "",
            f"Dispatch overhead on a cache hit: {overhead['overhead_s'] * 1e6:.1f} us per call "
            f"over calling the chosen variant directly (argument checks included; goal "
            f"{overhead['goal_s'] * 1e6:.0f} us{parts}).",
        ]
    return "\n".join(lines) + "\n"


def render(readme: str) -> str:
    def fill(m: re.Match) -> str:
        data = json.loads((ROOT / "benchmarks" / "results" / m["file"]).read_text())
        ops = m["ops"].split(",") if m["ops"] else None
        missing = set(ops or ()) - {r["op"] for r in data["results"]}
        if missing:
            raise ValueError(f"[readme_tables] ops {sorted(missing)} not in {m['file']}")
        return m.group(1) + table(data, ops) + m.group(5)

    return BLOCK.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = p.parse_args(argv)
    path = ROOT / "README.md"
    current = path.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md tables differ from benchmarks/results/: run tools/readme_tables.py")
            return 1
        return 0
    path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
