"""Summarize a sharded GPU test run (tools/gpu_tests.sh) as a small JSON file to commit.

    python tools/test_summary.py DIR [-o tests/results/gpu-<chip>.json]

Reads ``DIR/shard.*.log`` (pytest's closing line of each shard) and writes the device, MLX
version, date, commit (``$COMMIT``, else ``git rev-parse HEAD``), the tests selected
(``$SELECTION``, by default all ``gpu`` tests) and the passed, failed,
skipped and error counts, so that a statement such as "the CUDA kernels ran on an H100" cites
a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def counts(log: str) -> dict[str, int]:
    """The counts in pytest's closing line of ``log`` (its last line naming any)."""
    for line in reversed(log.splitlines()):
        found = _COUNT.findall(line)
        if found:
            out = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
            for n, kind in found:
                key = "errors" if kind.startswith("error") else kind
                if key in out:
                    out[key] += int(n)
            return out
    return {"passed": 0, "failed": 0, "skipped": 0, "errors": 1}  # a shard that never finished


def _commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def summarize(folder: Path) -> dict:
    import mlx.core as mx

    from mlx_primitives import __version__
    from mlx_primitives.hardware import detect_chip

    logs = sorted(folder.glob("shard.*.log"))
    if not logs:
        raise SystemExit(f"no shard logs in {folder}")
    total = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for log in logs:
        for key, n in counts(log.read_text()).items():
            total[key] += n
    chip = detect_chip()
    return {
        "device": chip.name,
        "chip": chip.slug,
        "backend": chip.backend,
        "mlx_version": mx.__version__,
        "package_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "selection": os.environ.get("SELECTION", "pytest -m gpu"),
        "shards": len(logs),
        **total,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("-o", "--out", type=Path, help="default: FOLDER/summary.json")
    args = p.parse_args(argv)
    summary = summarize(args.folder)
    out = args.out or args.folder / "summary.json"
    out.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(json.dumps(summary, sort_keys=True))
    return 1 if summary["failed"] or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
