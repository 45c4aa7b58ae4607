"""What every suite shares: the device header of a result file, timing, rows of results."""

from __future__ import annotations

import platform
from datetime import datetime, timezone

import mlx.core as mx

import mlx_primitives as mp
from mlx_primitives.hardware import current_backend, detect_chip
from mlx_primitives.tuning.timing import bench_many

METHOD = (
    "per-call latency: median over repeated mx.eval of a chain of calls built before the "
    "clock starts, the implementations of one problem sampled in turn "
    "(mlx_primitives.tuning.timing.bench_many), after a timed warm-up; bandwidth counts each "
    "input read once and each output written once"
)


def header(suite: str) -> dict:
    backend = current_backend()
    chip = detect_chip(backend)
    return {
        "suite": suite,
        "device": chip.name,
        "chip": chip.to_dict(),
        "backend": backend,
        "mlx_version": mx.__version__,
        "package_version": mp.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": METHOD,
    }


def measure(calls, *, budget_s: float = 0.3) -> list[dict]:
    """Median and spread of each ``(fn, args, kwargs)``, sampled in turn, as row fragments."""
    timings = bench_many(calls, budget_s=budget_s, warmup_s=0.1, max_reps=200)
    return [
        {
            "median_s": t.median_s,
            "spread_s": t.spread_s,
            "reps": t.reps,
            "chain": t.chain,
            "first_call_s": t.first_call_s,
        }  # first call: compiling, where a back-end compiles
        for t in timings
    ]
