"""Timing callables on MLX: warm-up by time, repeats by time, median.

Device work is lazy and asynchronous, so each sample times one ``mx.eval`` of a chain of
calls, built before the clock starts. Chaining many calls per evaluation keeps the fixed cost
of one evaluation (larger with large outputs) from deciding between fast kernels. A call whose
output has the shape and dtype of one of its inputs (the first, or the one ``Op.feed`` names)
feeds it to the next call, so the chain runs in order, as a model's layers do, instead of
overlapping on the device. Several callables timed together take their samples in turn
(round-robin), so a machine that speeds up or slows down during the measurement moves all of
them alike and their ratios stay fair; and each of their evaluations starts the same time after
its chain's build began, since the device's idle time before an evaluation changes how fast it
runs.
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import mlx.core as mx

# Outputs of one chain stay alive until its evaluation, and so may the scratch of calls the host
# runs ahead: cap a chain's calls, each at its peak memory, at this share of the device's
# memory (at least 512 MiB), so large problems still chain several calls.
CHAIN_MEMORY_SHARE = 0.12
MIN_CHAIN_BYTES = 512 * 2**20
# More than the fixed cost of one mx.eval on any back-end.
EVAL_OVERHEAD_S = 1e-3
# Calls in the chain that estimates a call's latency before timing.
PROBE_CHAIN = 4
# A timed chain has calls enough to fill this long, at most MAX_CHAIN of them.
TARGET_SAMPLE_S = 20e-3
MAX_CHAIN = 200

# Every evaluation of calls timed together starts this much longer after its chain's build
# began than the slowest of their builds takes (a call timed alone: its own build): how long
# the device idled before an evaluation changes its speed (docs/notes).
IDLE_MARGIN = 1.25
# Builds of each chain timed to set that idle time.
IDLE_PROBES = 3

Call = tuple[Callable, tuple, dict]


@dataclass(frozen=True)
class Timing:
    """Per-call latency: median and spread (interquartile range) over ``reps`` samples."""

    median_s: float
    spread_s: float
    reps: int
    chain: int
    first_call_s: float
    samples: tuple[float, ...] = field(default=(), repr=False)
    # Seconds from the start of each chain's build to its evaluation, the same for every call
    # timed together (bench_many).
    idle_s: float = 0.0
    # Median per call of building the chain's graph plus evaluating it: what a model pays at
    # every step, where the timed evaluation alone leaves the host's part out.
    build_eval_s: float = 0.0

    @property
    def stderr_s(self) -> float:
        """Standard error of the median: 1.2533 sigma / sqrt(n), sigma from the IQR (/1.349),
        as for a normal distribution; what two medians must differ by to differ at all."""
        return 1.2533 * (self.spread_s / 1.349) / max(self.reps, 1) ** 0.5


def _nbytes(out) -> int:
    if isinstance(out, mx.array):
        return out.nbytes
    return sum(_nbytes(o) for o in out)


def _chain_bytes() -> int:
    from ..hardware import detect_chip

    memory = detect_chip().memory_bytes or 0
    return max(MIN_CHAIN_BYTES, int(CHAIN_MEMORY_SHARE * memory))


def _build(call: Call, chain: int, feed: int | None) -> list:
    """The outputs of ``chain`` calls, unevaluated."""
    fn, args, kwargs = call
    fed = feed is not None and feed < len(args) and isinstance(args[feed], mx.array)
    fed_arg = args[feed] if fed else None
    current, outs = list(args), []
    for _ in range(chain):
        out = fn(*current, **kwargs)
        outs.append(out)
        # Each call takes the one before's output where it has the fed input's shape and
        # dtype: on CUDA independent calls run concurrently, hiding a small grid's idle SMs.
        fits = isinstance(out, mx.array) and fed_arg is not None and out.shape == fed_arg.shape
        if fits and out.dtype == fed_arg.dtype:
            current[feed] = out
    return outs


def _run_chain(
    call: Call, chain: int, feed: int | None, idle_s: float = 0.0
) -> tuple[float, float]:
    """Seconds per call of one evaluation of ``chain`` calls, started ``idle_s`` after the
    build began (at once where the build took longer), and of the build plus the evaluation
    (the wait left out)."""
    begun = time.perf_counter()
    outs = _build(call, chain, feed)
    built = time.perf_counter() - begun
    # A busy wait: sleep overshoots by tens of microseconds.
    while time.perf_counter() - begun < idle_s:
        pass
    start = time.perf_counter()
    mx.eval(outs)
    evaluated = time.perf_counter() - start
    return evaluated / chain, (built + evaluated) / chain


def _idle(calls: Sequence[Call], chains: Sequence[int], feed: int | None) -> float:
    """The idle time before every evaluation of ``calls``: their slowest build (median of a
    few), with a margin."""
    slowest = 0.0
    for call, chain in zip(calls, chains):
        builds = []
        for _ in range(IDLE_PROBES):
            begun = time.perf_counter()
            _build(call, chain, feed)
            builds.append(time.perf_counter() - begun)
        slowest = max(slowest, statistics.median(builds))
    return IDLE_MARGIN * slowest


def _prepare(
    call: Call, limit_s: float | None, target_sample_s: float, max_chain: int, feed: int | None
):
    """The first call (which may compile; never kept), and the chain lengths that fill
    ``target_sample_s`` and that the memory cap allows."""
    fn, args, kwargs = call
    # Inputs made lazily would count in the call's peak. They are computed without waiting on
    # each (mx.eval of computed arrays would), as a model's step leaves its arrays: MLX's CUDA
    # attention takes cuDNN for a decode only on inputs not waited on since
    # (docs/notes/2026-11-27-mlx-decode-attention-two-paths.md).
    # synchronize() waits on the default stream, where the ops make their inputs.
    mx.async_eval([args, kwargs])
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    mx.eval(out)
    first = time.perf_counter() - start
    # A call counts at its peak: MLX's attention with a dense mask holds tens of GB of scores
    # at 16384 queries, and three calls in flight ran an 80 GB card out of memory.
    footprint = max(mx.get_peak_memory() - before, _nbytes(out))
    cap = max(1, _chain_bytes() // max(footprint, 1))
    per_call = _run_chain(call, 1, feed)[0]
    # One unchained call also pays the fixed cost of an evaluation: judge it against the
    # limit only when that cost cannot explain it.
    if limit_s is not None and per_call > max(limit_s, EVAL_OVERHEAD_S):
        raise TimeoutError(
            f"{per_call * 1e3:.3g} ms per call is over the limit of {limit_s * 1e3:.3g} ms"
        )
    # A short call is estimated again in short chains, which share that fixed cost as the
    # timed chains will (within the memory cap); the faster of two, as one may run cold.
    if per_call < target_sample_s and min(PROBE_CHAIN, cap) > 1:
        per_call = min(_run_chain(call, min(PROBE_CHAIN, cap), feed)[0] for _ in range(2))
    wanted = int(min(max_chain, max(1, target_sample_s / max(per_call, 1e-9))))
    return first, wanted, cap


def bench_many(
    calls: Sequence[Call],
    *,
    warmup_s: float = 0.05,
    budget_s: float = 0.25,
    min_reps: int = 5,
    max_reps: int = 100,
    target_sample_s: float = TARGET_SAMPLE_S,
    max_chain: int = MAX_CHAIN,
    limit_s: float | None = None,
    feed: int | None = 0,
    equal_start: bool = True,
    min_idle_s: float = 0.0,
) -> list[Timing]:
    """Time each ``(fn, args, kwargs)``, taking their samples in turn. Resets MLX's peak-memory
    counter: each call's peak sizes its chain.

    Args:
        warmup_s: time spent running before samples are kept (the first call, which may
            compile, is never kept).
        budget_s: time for the kept samples of each call (at least ``min_reps`` each).
        target_sample_s: calls are chained until one evaluation takes about this long.
        limit_s: a per-call latency above which timing stops with ``TimeoutError`` (a
            candidate far slower than the default is not worth finishing).
        feed: the argument each call's output is fed to in the next call where it fits (the
            op's ``feed``); None to time independent calls.
        equal_start: False to start each evaluation right after its own build (what the
            equal start removes; benchmarks/suites/host.py measures it).
        min_idle_s: the least time from the start of a chain's build to its evaluation, to
            time calls as something timed apart waited (a copy compared with an op).
    """
    prepared = [_prepare(c, limit_s, target_sample_s, max_chain, feed) for c in calls]
    # One chain length for all: it sets how far the fixed cost of an evaluation is amortized,
    # so calls compared with each other share it. The fastest call's wish decides; a call
    # whose memory allows fewer (a composition with large scratch) runs as many as it can.
    wish = max(p[1] for p in prepared)
    chains = [min(wish, cap) for _, _, cap in prepared]
    idle = max(_idle(calls, chains, feed) if equal_start else 0.0, min_idle_s)
    deadline = time.perf_counter() + warmup_s * len(calls)
    while time.perf_counter() < deadline:
        for call, chain in zip(calls, chains):
            _run_chain(call, chain, feed, idle)
    samples: list[list[float]] = [[] for _ in calls]
    whole: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + budget_s * len(calls)
    while len(samples[0]) < min_reps or (
        time.perf_counter() < deadline and len(samples[0]) < max_reps
    ):
        # A new order each round: what ran just before a sample affects it.
        order = list(range(len(calls)))
        random.Random(len(samples[0])).shuffle(order)
        for i in order:
            kept = samples[i]
            evaluated, built_and_evaluated = _run_chain(calls[i], chains[i], feed, idle)
            kept.append(evaluated)
            whole[i].append(built_and_evaluated)
            if limit_s is not None and len(kept) >= 3 and statistics.median(kept) > limit_s:
                raise TimeoutError(
                    f"median {statistics.median(kept) * 1e3:.3g} ms is over the limit"
                )
    return [
        replace(summarize(kept, chain, first), idle_s=idle, build_eval_s=statistics.median(w))
        for kept, w, chain, (first, _, _) in zip(samples, whole, chains, prepared)
    ]


def summarize(samples: Sequence[float], chain: int = 1, first_s: float = 0.0) -> Timing:
    """Median and interquartile range of ``samples``."""
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return Timing(statistics.median(samples), q3 - q1, len(samples), chain, first_s, tuple(samples))


def paired(timings: Sequence[Timing]) -> list[Timing]:
    """Timings taken together (:func:`bench_many`), re-expressed through each round's ratio to
    the first: a round the machine runs slow slows every sample in it, and the ratios cancel
    that, so their spread is the noise that is left between the calls themselves."""
    ref = timings[0]
    out = []
    for t in timings:
        ratios = summarize([a / b for a, b in zip(t.samples, ref.samples)])
        scale = ref.median_s
        out.append(
            replace(
                t,
                median_s=ratios.median_s * scale,
                spread_s=ratios.spread_s * scale,
                reps=ratios.reps,
            )
        )
    return out


def bench(fn: Callable, args: tuple, kwargs: dict | None = None, **options) -> Timing:
    """Time ``fn(*args, **kwargs)`` alone; ``options`` as for :func:`bench_many`."""
    return bench_many([(fn, args, kwargs or {})], **options)[0]


def measured_on() -> dict[str, Any]:
    """What a result file says of where it was measured: the device and its chip on the
    current back-end, the versions of MLX, this package and Python, and the time (UTC)."""
    from .. import __version__
    from ..hardware import current_backend, detect_chip

    backend = current_backend()
    chip = detect_chip(backend)
    return {
        "device": chip.name,
        "chip": chip.to_dict(),
        "backend": backend,
        "mlx_version": mx.__version__,
        "package_version": __version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
