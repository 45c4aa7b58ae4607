"""The first five ops (rms_norm, layer_norm, rope, swiglu, geglu): the tuned dispatch, every
variant and the baseline (the MLX built-in, or the compiled composition where MLX has none),
measured in one run; on a GPU, the bandwidth of a vectorized copy kernel as the ceiling; and
the dispatcher's per-call overhead."""

from __future__ import annotations

import time

import mlx.core as mx

from mlx_primitives import dispatch
from mlx_primitives.dialect.kernel import GpuKernel
from mlx_primitives.hardware import current_backend
from mlx_primitives.registry import Example, op

from ..common import header, measure, open_db, run_or_skip

OPS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu")


# The problems measured: each op's tuning preset ("large" its default preset, the shapes of
# common LLMs; "small" its quick preset), so the tuned dispatch is measured where it was tuned.
SIZES = {"small": "quick", "large": "default"}

# Large shapes between the tuned ones, never tuned here: the nearest tuned problem serves each
# or, farther than dispatch.NEAREST_MAX_DISTANCE, the default; their rows show what that gives.
BHSD, BSHD = (("layout", "BHSD"),), (("layout", "BSHD"),)
BETWEEN = {
    "layer_norm": [Example(((4096, 4096),), "float16"), Example(((8192, 4096),), "bfloat16")],
    "rope": [
        Example(((1, 32, 4096, 128),), "float16", BHSD),
        Example(((1, 4096, 32, 128),), "bfloat16", BSHD),
    ],
    "swiglu": [Example(((4096, 14336),), "float16")],
}


_COPY = GpuKernel("_bench/copy.k", ["x"], ["y"])


def copy_ceiling(moved: int = 2**31, budget_s: float = 0.5, idle_s: float = 0.0) -> dict:
    """Bytes read plus written per second by a copy with 16-byte loads moving about ``moved``
    bytes: what a memory-bound kernel can reach on this device (at that size: a small copy
    pays the launch and the ramp up and down of the grid, like the op it is compared with).

    Args:
        idle_s: the least wait from a chain's build to its evaluation: the op's, so the copy
            starts from the same idle device (its own build is shorter).
    """
    x = mx.random.uniform(shape=(max(8, moved // 32 * 8),)).astype(mx.float16)
    vec, unroll, threads = 8, 4, 256
    groups = -(-x.size // (vec * unroll * threads))

    def copy(x):
        template = {"T": x.dtype, "VEC": vec, "UNROLL": unroll}
        return _COPY(
            [x],
            template=template,
            grid=(groups * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[x.shape],
            output_dtypes=[x.dtype],
        )[0]

    assert mx.array_equal(copy(x), x).item(), "the copy kernel is wrong"
    (row,) = measure([(copy, (x,), {})], budget_s=budget_s, min_idle_s=idle_s)
    return {**row, "bytes": 2 * x.nbytes, "gb_per_s": 2 * x.nbytes / row["median_s"] / 1e9}


def dispatch_overhead(n: int = 20000) -> dict:
    """Host time per call of ``mp.rms_norm`` over calling the chosen variant directly (no
    evaluation: graph construction only, where the dispatcher's cost lives), and two of its
    parts: the argument checks that make the problem key, and the cache lookup."""
    o = op("rms_norm")
    x, w = mx.ones((4, 64)), mx.ones((64,))
    decision = dispatch.choose(o, o.problem(x, w, 1e-5))
    direct = o.variant(decision.variant).build(**decision.params)
    o(x, w, 1e-5)  # fill the process cache: the benchmark is of a cache hit
    dtype, values = o._problem(x, w, 1e-5)

    def per_call(fn, *args) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn(*args)
            best = min(best, (time.perf_counter() - start) / n)
        return best

    d, v = per_call(o, x, w, 1e-5), per_call(direct, x, w, 1e-5)
    return {
        "dispatch_s": d,
        "direct_s": v,
        "overhead_s": d - v,
        "checks_s": per_call(o._problem, x, w, 1e-5),
        "lookup_s": per_call(dispatch.route, o, dtype, values),
        "goal_s": 3e-6,
    }


def run(args) -> dict:
    gpu = current_backend() != "cpu"
    sizes = args.sizes or ("large" if gpu else "small")
    db, tuner = open_db(args.tune)
    result = header("norms")
    if gpu:
        result["copy_ceiling"] = copy_ceiling()
        print(f"copy ceiling: {result['copy_ceiling']['gb_per_s']:.0f} GB/s", flush=True)
    rows, failed = [], []
    for name in args.op or OPS:
        o = op(name)
        between = BETWEEN.get(name, []) if sizes == "large" else []
        for ex in [*o.presets[SIZES[sizes]], *between]:
            op_rows = run_or_skip(failed, o, ex, None if ex in between else tuner, db, args.budget)
            if not op_rows:
                continue
            rows.extend(op_rows)
            d = op_rows[0]  # the dispatched call
            if gpu:
                # Timed with the dispatched call's wait, which the ratio's percentage is of.
                same = copy_ceiling(d["bytes"], args.budget, d["idle_s"])["gb_per_s"]
                for r in op_rows:
                    r["copy_gb_per_s"] = same
            print(
                f"{name:10s} {ex.label():40s} {d['variant']:>9s} {d['vs_baseline']:5.2f}x "
                f"{d['gb_per_s']:7.1f} GB/s",
                flush=True,
            )
    if db is not None:
        db.close()
    return {
        **result,
        "sizes": sizes,
        "tuned": bool(args.tune),
        "results": rows,
        "failed": failed,
        "dispatch_overhead": dispatch_overhead(),
    }
