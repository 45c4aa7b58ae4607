"""quantized_matmul: per layer shape and rows, the tuned dispatch, every variant and MLX's
built-in (``mx.quantized_matmul``, every row's baseline) measured in one run; on a GPU, a copy
moving the same bytes as the call (packed weights, scales, biases, x and the output) as the
ceiling; and the issue's goals read off the dispatch's rows: time at 16 rows over time at 1
row, the gain over the built-in at 8 to 16 rows, a copy's share at 1 row, prefills."""

from __future__ import annotations

from mlx_primitives.hardware import current_backend
from mlx_primitives.registry import op

from ..common import header, open_db, run_or_skip
from .norms import SIZES, copy_ceiling

BASELINE = "builtin"


def _layer(row: dict) -> tuple[str, str]:
    """A row's dtype and problem but its rows: ``in_features=..,out_features=..,bits=..``."""
    _, dtype, fields = row["problem"].split("|")
    return dtype, fields.split(",", 1)[1]


def goals(rows: list[dict]) -> list[dict]:
    """The issue's speed goals per layer, from the dispatch's rows of one run."""
    by_layer: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["impl"] == "dispatch":
            by_layer.setdefault(_layer(r), {})[r["shape"][0]] = r
    out = []
    for (dtype, layer), by_rows in by_layer.items():
        one, sixteen = by_rows.get(1), by_rows.get(16)
        goal = {"dtype": dtype, "layer": layer}
        if one and sixteen:
            goal["rows_16_over_1"] = sixteen["median_s"] / one["median_s"]  # goal: <= 1.5
        for n in (8, 16):
            if n in by_rows:
                goal[f"vs_builtin_{n}"] = by_rows[n]["vs_baseline"]  # goal: >= 3
        if one and "copy_gb_per_s" in one:
            goal["of_copy_1"] = one["gb_per_s"] / one["copy_gb_per_s"]  # 4-bit >= 0.8, 8: 0.75
        prefill = [r["vs_baseline"] for n, r in by_rows.items() if n >= 256]
        if prefill:
            goal["prefill_vs_builtin_min"] = min(prefill)  # goal: >= 1
        goal["dispatch_vs_builtin_min"] = min(r["vs_baseline"] for r in by_rows.values())
        out.append(goal)
    return out


def run(args) -> dict:
    gpu = current_backend() != "cpu"
    sizes = args.sizes or ("large" if gpu else "small")
    db, tuner = open_db(args.tune)
    result = header("quantized")
    if gpu:
        result["copy_ceiling"] = copy_ceiling()
        print(f"copy ceiling: {result['copy_ceiling']['gb_per_s']:.0f} GB/s", flush=True)
    o = op("quantized_matmul")
    rows, failed = [], []
    for ex in o.presets[SIZES[sizes]]:
        op_rows = run_or_skip(failed, o, ex, tuner, db, args.budget, baseline=BASELINE)
        if not op_rows:
            continue
        rows.extend(op_rows)
        d = op_rows[0]  # the dispatched call
        line = f"{ex.label():48s} {d['variant']:>10s} {d['vs_baseline']:5.2f}x"
        if gpu:
            # Timed with the dispatched call's wait, which the ratio's percentage is of.
            same = copy_ceiling(d["bytes"], args.budget, d["idle_s"])["gb_per_s"]
            for r in op_rows:
                r["copy_gb_per_s"] = same
            line += f" {d['gb_per_s'] / same:5.0%} of a copy"
        variants = " ".join(
            f"{r['variant']} {r['vs_baseline']:.2f}x"
            for r in op_rows[1:]
            if r["variant"] != BASELINE
        )
        print(f"{line} {d['median_s'] * 1e6:9.1f} us | {variants}", flush=True)
    if db is not None:
        db.close()
    return {
        **result,
        "sizes": sizes,
        "tuned": bool(args.tune),
        "results": rows,
        "failed": failed,
        "goals": goals(rows),
    }
