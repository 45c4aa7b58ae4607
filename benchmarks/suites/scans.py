"""Scans: linear_scan, associative_scan and selective_scan per problem of their preset, the
tuned dispatch and every variant against the op's default (linear_scan's doubling; MLX's scans
on float32 copies; selective_scan's chunked product for Mamba-2's heads, else the scan
composition). The state-space drop-ins against mlx-lm are the ``ssm`` suite.
"""

from __future__ import annotations

from mlx_primitives.hardware import current_backend
from mlx_primitives.registry import op

from ..common import header, open_db, run_or_skip
from .norms import SIZES


def run(args) -> dict:
    gpu = current_backend() != "cpu"
    sizes = args.sizes or ("large" if gpu else "small")
    result = header("scans")
    rows, failed = [], []
    db, tuner = open_db(args.tune)
    for name in ("linear_scan", "associative_scan", "selective_scan"):
        o = op(name)
        for ex in o.presets[SIZES[sizes]]:
            op_rows = run_or_skip(failed, o, ex, tuner, db, args.budget)
            rows.extend(op_rows)
            if op_rows:
                d = op_rows[0]
                print(f"{ex.label():56s} {d['variant']:>10s} {d['vs_baseline']:5.2f}x", flush=True)
    if db is not None:
        db.close()
    return {**result, "sizes": sizes, "tuned": bool(args.tune), "results": rows,
            "failed": failed}  # fmt: skip
