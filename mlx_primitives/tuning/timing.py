"""Timing a callable on MLX: warm-up by time, repeats by time, median.

Device work is lazy and asynchronous, so each sample times one ``mx.eval`` of a chain of
calls, built before the clock starts. Chaining many calls per evaluation keeps the fixed cost
of one evaluation (about 20 us on MLX CUDA) from deciding between fast kernels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

# Outputs of one chain stay alive until its evaluation: cap their bytes.
MAX_CHAIN_BYTES = 512 * 2**20
# More than the fixed cost of one mx.eval on any back-end.
EVAL_OVERHEAD_S = 1e-3


@dataclass(frozen=True)
class Timing:
    """Per-call latency: median and spread (interquartile range) over ``reps`` samples."""

    median_s: float
    spread_s: float
    reps: int
    chain: int
    first_call_s: float


def _nbytes(out) -> int:
    if isinstance(out, mx.array):
        return out.nbytes
    return sum(_nbytes(o) for o in out)


def _run_chain(fn: Callable, args, kwargs, chain: int) -> float:
    outs = [fn(*args, **kwargs) for _ in range(chain)]
    start = time.perf_counter()
    mx.eval(outs)
    return (time.perf_counter() - start) / chain


def bench(
    fn: Callable,
    args: tuple,
    kwargs: dict | None = None,
    *,
    warmup_s: float = 0.05,
    budget_s: float = 0.25,
    min_reps: int = 5,
    max_reps: int = 100,
    target_sample_s: float = 2e-3,
    max_chain: int = 50,
    limit_s: float | None = None,
) -> Timing:
    """Time ``fn(*args, **kwargs)``.

    Args:
        warmup_s: time spent running before samples are kept (the first call, which may
            compile, is never kept).
        budget_s: time for the kept samples (at least ``min_reps`` are taken).
        target_sample_s: calls are chained until one evaluation takes about this long.
        limit_s: a per-call latency above which timing stops with ``TimeoutError`` (a
            candidate far slower than the default is not worth finishing).
    """
    kwargs = kwargs or {}
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    mx.eval(out)
    first = time.perf_counter() - start
    per_call = _run_chain(fn, args, kwargs, 1)
    # One unchained call also pays the fixed cost of an evaluation: judge it against the
    # limit only when that cost cannot explain it.
    if limit_s is not None and per_call > max(limit_s, EVAL_OVERHEAD_S):
        raise TimeoutError(
            f"{per_call * 1e3:.3g} ms per call is over the limit of {limit_s * 1e3:.3g} ms"
        )
    cap = max(1, MAX_CHAIN_BYTES // max(_nbytes(out), 1))
    chain = int(min(max_chain, cap, max(1, target_sample_s / max(per_call, 1e-9))))
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        _run_chain(fn, args, kwargs, chain)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_reps or (time.perf_counter() < deadline and len(samples) < max_reps):
        samples.append(_run_chain(fn, args, kwargs, chain))
        if limit_s is not None and len(samples) >= 3 and statistics.median(samples) > limit_s:
            raise TimeoutError(
                f"median {statistics.median(samples) * 1e3:.3g} ms is over the limit"
            )
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return Timing(statistics.median(samples), q3 - q1, len(samples), chain, first)
