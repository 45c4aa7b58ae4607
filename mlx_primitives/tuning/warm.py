"""Compile custom kernels ahead of tuning, in parallel worker processes.

Every kernel configuration is a separate NVRTC compile, and MLX compiles one at a time in the
process that evaluates it. MLX keeps what it compiles in an on-disk cache (``MLX_PTX_CACHE_DIR``,
by default under the temporary folder), so worker processes that each run a small case of some
configurations leave the tuner only cache hits. A compile that fails in a worker is left for
the tuner to find and reject with its reason.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, wait
from multiprocessing import get_context

import mlx.core as mx

from ..hardware.cpu import available_cores
from ..problem import Problem

MAX_WORKERS = 8
# Each bucketed dim of the small case a worker runs (the exact dims are what kernels are
# specialized on; bucketed ones are run-time values).
_SMALL = 4


def _compile(job: tuple) -> bool:
    op_name, problem, dtype, variant, params = job
    from ..problem import parse_dtype
    from ..registry import op

    try:
        o = op(op_name)
        shapes, options = o.case(problem)
        args = o.example(shapes, parse_dtype(dtype), mx.random.key(0), **options)
        mx.eval(o.variant(variant).build(**params)(*args))
        return True
    except Exception:  # reported by the tuner, which runs the same candidate
        return False


def warm(
    op,
    problem: Problem,
    candidates: list,
    *,
    workers: int | None = None,
    kernels_only: bool = True,
    timeout_s: float = 600.0,
) -> int:
    """Run a small case of each candidate once in worker processes; returns how many ran.

    Args:
        workers: processes (default: the CPUs this process may use, less one, at most 8:
            each opens its own GPU context).
        kernels_only: only custom kernels need compiling; tests on machines without a GPU
            warm the other variants.
        timeout_s: after this long the workers are stopped (a hung compile must not stall
            tuning: the tuner's own watchdog then deals with that candidate).
    """
    workers = workers or min(MAX_WORKERS, max(1, available_cores() - 1))
    small = problem.small(_SMALL)
    jobs = [
        (op.name, small, problem.dtype, c.variant, c.param_dict)
        for c in candidates
        if op.variant(c.variant).is_kernel or not kernels_only
    ]
    if len(jobs) < 2 or workers < 2:
        return 0
    # spawn: a forked child would inherit this process's GPU context, which CUDA forbids.
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn"))
    futures = [pool.submit(_compile, job) for job in jobs]
    done, _ = wait(futures, timeout=timeout_s)
    ran = sum(1 for f in done if not f.exception() and f.result())
    # A worker that died or hangs is not waited for; the tuner meets that candidate itself.
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    return ran
