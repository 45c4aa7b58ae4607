"""The first five ops (rms_norm, layer_norm, rope, swiglu, geglu): tuned dispatch, every
variant and the baseline (the MLX built-in, or the compiled composition where MLX has none),
measured in one run; plus the dispatcher's per-call overhead."""

from __future__ import annotations

import time

import mlx.core as mx

from mlx_primitives import dispatch
from mlx_primitives.problem import parse_dtype
from mlx_primitives.registry import Example, op
from mlx_primitives.tuning.db import TuningDB, default_user_url
from mlx_primitives.tuning.tuner import BUDGETS, Tuner

from ..common import header, measure, nbytes

OPS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu")


def _ex(shape, dtype, **options):
    return Example((shape,), dtype, tuple(sorted(options.items())))


SHAPES = {
    "small": {
        "rms_norm": [_ex((64, 1024), t) for t in ("float32", "float16")]
        + [_ex((1, 4096), "float16")],
        "layer_norm": [_ex((64, 1024), t) for t in ("float32", "float16")]
        + [_ex((1, 4096), "float16")],
        "rope": [_ex((1, 8, 256, 64), "float16", layout=lay) for lay in ("BHSD", "BSHD")],
        "swiglu": [_ex((64, 2048), t) for t in ("float32", "float16")],
        "geglu": [_ex((64, 2048), "float16")],
    },
    "large": {
        "rms_norm": [
            _ex((r, 4096), t) for r in (1, 64, 1024, 16384) for t in ("float16", "bfloat16")
        ],
        "layer_norm": [
            _ex((r, 4096), t) for r in (1, 64, 1024, 16384) for t in ("float16", "bfloat16")
        ],
        "rope": [
            _ex(s, t, layout=lay)
            for s, lay in (
                ((4, 32, 2048, 128), "BHSD"),
                ((4, 2048, 32, 128), "BSHD"),
                ((8, 32, 1, 128), "BHSD"),
            )
            for t in ("float16", "bfloat16")
        ],
        "swiglu": [_ex((r, 14336), t) for r in (1, 64, 16384) for t in ("float16", "bfloat16")],
        "geglu": [_ex((r, 14336), t) for r in (1, 64, 16384) for t in ("float16", "bfloat16")],
    },
}


def _baseline(o) -> str:
    names = [v.name for v in o.variants]
    return "builtin" if "builtin" in names else "compiled"


def _bytes(o, args, out) -> int:
    # Each array input read once, the output written once (rope's offset and freqs are tiny).
    return nbytes(*args) + out.nbytes


def run_op(o, ex: Example, tuner: Tuner | None, budget_s: float) -> list[dict]:
    dtype = parse_dtype(ex.dtype)
    args, kwargs = o.example(ex.shapes, dtype, mx.random.key(0), **dict(ex.options))
    if tuner is not None:
        tuner.tune(o, ex)
    problem = o.problem(*args, **kwargs)
    decision = dispatch.choose(o, problem)
    out = o(*args, **kwargs)
    moved = _bytes(o, args, out)
    base = {
        "op": o.name,
        "shape": list(ex.shapes[0]),
        "dtype": ex.dtype,
        "options": dict(ex.options),
        "problem": problem.key(o.dims),
        "bytes": moved,
    }
    rows = [
        {
            **base,
            "impl": "dispatch",
            "variant": decision.variant,
            "params": decision.params,
            "source": decision.source,
            **measure(o, args, kwargs, budget_s=budget_s),
        }
    ]
    for v in o.variants:
        if not v.available():
            continue
        for cfg in v.configs():
            if not v.allows(problem.as_dict(o.dims), cfg):
                continue
            fn = v.build(**cfg)
            rows.append(
                {
                    **base,
                    "impl": "variant",
                    "variant": v.name,
                    "params": cfg,
                    **measure(fn, args, kwargs, budget_s=budget_s),
                }
            )
    baseline = _baseline(o)
    ref = next(r["median_s"] for r in rows if r["impl"] == "variant" and r["variant"] == baseline)
    for r in rows:
        r["baseline"] = baseline
        r["vs_baseline"] = ref / r["median_s"]
        r["gb_per_s"] = moved / r["median_s"] / 1e9
    return rows


def dispatch_overhead(n: int = 20000) -> dict:
    """Host time per call of ``mp.rms_norm`` over calling the chosen variant directly (no
    evaluation: graph construction only, where the dispatcher's cost lives)."""
    o = op("rms_norm")
    x, w = mx.ones((4, 64)), mx.ones((64,))
    direct = o.variant(dispatch.choose(o, o.problem(x, w, 1e-5)).variant).build()
    o(x, w, 1e-5)  # fill the process cache: the benchmark is of a cache hit

    def per_call(fn) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn(x, w, 1e-5)
            best = min(best, (time.perf_counter() - start) / n)
        return best

    d, v = per_call(o), per_call(direct)
    return {"dispatch_s": d, "direct_s": v, "overhead_s": d - v, "goal_s": 3e-6}


def run(args) -> dict:
    sizes = args.sizes or ("large" if mx.default_device() == mx.gpu else "small")
    tuner = None
    if args.tune:
        tuner = Tuner(TuningDB(default_user_url()), BUDGETS[args.tune])
    rows = []
    for name in args.op or OPS:
        o = op(name)
        for ex in SHAPES[sizes][name]:
            op_rows = run_op(o, ex, tuner, args.budget)
            rows.extend(op_rows)
            d = op_rows[0]  # the dispatched call
            print(
                f"{name:10s} {ex.label():40s} dispatch={d['variant']:>10s} "
                f"{d['vs_baseline']:.2f}x {d['gb_per_s']:.1f} GB/s",
                flush=True,
            )
    return {
        **header("norms"),
        "sizes": sizes,
        "tuned": bool(args.tune),
        "results": rows,
        "dispatch_overhead": dispatch_overhead(),
    }
