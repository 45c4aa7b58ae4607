"""Compile custom kernels ahead of tuning, in parallel worker processes.

Every kernel configuration is a separate NVRTC compile, and MLX compiles one at a time in the
process that evaluates it. MLX keeps what it compiles in an on-disk cache (``MLX_PTX_CACHE_DIR``,
by default under the temporary folder), so worker processes that each run a small case of some
configurations leave the tuner only cache hits. A compile that fails in a worker is left for
the tuner to find and reject with its reason.
"""

from __future__ import annotations

import multiprocessing
import os

import mlx.core as mx

from ..problem import BUCKET, dtype_name

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
        args, kwargs = o.example(shapes, parse_dtype(dtype), mx.random.key(0), **options)
        mx.eval(o.variant(variant).build(**params)(*args, **kwargs))
        return True
    except Exception:  # reported by the tuner, which runs the same candidate
        return False


def warm(
    op,
    problem: dict,
    dtype: mx.Dtype,
    candidates: list,
    *,
    workers: int | None = None,
    kernels_only: bool = True,
) -> int:
    """Run a small case of each candidate once in ``workers`` processes (default: the cores
    less one); returns how many ran. Only custom kernels need it unless ``kernels_only`` is
    False (tests use that on machines without a GPU)."""
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    small = {
        d.name: min(problem[d.name], _SMALL) if d.kind == BUCKET else problem[d.name]
        for d in op.dims
    }
    jobs = [
        (op.name, small, dtype_name(dtype), c.variant, c.param_dict)
        for c in candidates
        if op.variant(c.variant).is_kernel or not kernels_only
    ]
    if len(jobs) < 2 or workers < 2:
        return 0
    # spawn: a forked child would inherit this process's GPU context, which CUDA forbids.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return sum(pool.map(_compile, jobs, chunksize=1))
