"""What every suite shares: the device header of a result file, timing, rows of results."""

from __future__ import annotations

import importlib
import inspect

import mlx.core as mx

from mlx_primitives import dispatch
from mlx_primitives.dialect import inference_mode
from mlx_primitives.problem import parse_dtype
from mlx_primitives.registry import Example, ops
from mlx_primitives.store.database import TuningDB, default_user_url, exists
from mlx_primitives.tuning import timing
from mlx_primitives.tuning.tuner import BUDGETS, Tuner


def _feeding() -> str:
    """The ops whose chains feed another input than the first, or none (``Op.feed``)."""
    ordinal = ("first", "second", "third", "fourth", "fifth")
    groups: dict[str, list[str]] = {}
    for o in ops():
        if o.feed != 0:
            how = "not fed" if o.feed is None else f"as their {ordinal[o.feed]} input"
            groups.setdefault(how, []).append(o.name)
    return "".join(f"; {' and '.join(names)}: {how}" for how, names in groups.items())


METHOD = (
    "per-call latency: median over repeated mx.eval of a chain of calls built before the "
    "clock starts, on inputs computed once and never waited on one by one, as a model's step "
    f"leaves them (up to {timing.MAX_CHAIN} calls filling about "
    f"{timing.TARGET_SAMPLE_S * 1e3:.0f} ms, each call counted at its peak memory within "
    f"{timing.CHAIN_MEMORY_SHARE:.0%} of the device's memory, a call with large scratch "
    "chaining fewer; each call fed the previous call's output as its first input where shape "
    f"and dtype agree, so the calls run in order{_feeding()}), the "
    "implementations of one problem sampled in turn (mlx_primitives.tuning.timing."
    "bench_many), after a timed warm-up, each evaluation starting the same time after its "
    f"chain's build began for all of them ({timing.IDLE_MARGIN}x the slowest build: the "
    "device's idle time before an evaluation changes its speed); the dispatch's ratio from "
    "the dispatch and the baseline timed alone, the variants' from all variants timed "
    "together; bandwidth counts each input read once and each output written once; where the "
    "dispatch runs a custom "
    "kernel, it is also timed in mlx_primitives.inference_mode (no gradient wrapper) in the "
    "same samples"
)


# The running suite's header and the problems' rows measured so far: what the runner writes
# of a run stopped before its end.
MEASURED: dict = {}


def header(suite: str) -> dict:
    """What every result file starts with: the suite and what it measures (its docstring), the
    device, the versions, the date and the timing method."""
    about = importlib.import_module(f"benchmarks.suites.{suite}").__doc__ or ""
    MEASURED.clear()
    MEASURED.update(rows=[])
    MEASURED["header"] = {
        "suite": suite,
        "about": inspect.cleandoc(about),
        **timing.measured_on(),
        "method": METHOD,
    }
    return MEASURED["header"]  # the same dict: what a suite adds to it (a ceiling) is kept


def against(ours: dict, theirs: dict, baseline: str, **fields) -> dict:
    """A row of a call timed against another in one :func:`measure`: ``fields``, our median
    and spread, ``<baseline>_median_s`` and ``vs_<baseline>`` (their time over ours).

    Args:
        ours, theirs: the two fragments :func:`measure` returned.
        baseline: what the other call is, as the row names it (``mlx_lm``, ``sequential``).
    """
    return {
        **fields,
        "median_s": ours["median_s"],
        "spread_s": ours["spread_s"],
        f"{baseline}_median_s": theirs["median_s"],
        f"vs_{baseline}": theirs["median_s"] / ours["median_s"],
    }


def measure(
    calls, budget_s: float = 0.3, feed: int | None = 0, min_idle_s: float = 0.0
) -> list[dict]:
    """Median and spread of each ``(fn, args, kwargs)``, sampled in turn, as row fragments
    (``feed`` and ``min_idle_s``: as for :func:`bench_many`)."""
    timings = timing.bench_many(
        calls, budget_s=budget_s, warmup_s=0.1, max_reps=200, feed=feed, min_idle_s=min_idle_s
    )
    return [
        {
            "median_s": t.median_s,
            "spread_s": t.spread_s,
            "reps": t.reps,
            "chain": t.chain,
            "first_call_s": t.first_call_s,
            "idle_s": t.idle_s,
            "build_eval_s": t.build_eval_s,
        }  # first call: compiling, where a back-end compiles
        for t in timings
    ]


def _inference(fn):
    """``fn`` called in :func:`mlx_primitives.inference_mode` (while the chain is built)."""

    def call(*args, **kwargs):
        with inference_mode():
            return fn(*args, **kwargs)

    return call


def open_db(tune: str | None) -> tuple[TuningDB | None, Tuner | None]:
    """The user database (created only when tuning) and, with ``tune``, a tuner into it:
    trials give each variant's best configuration."""
    url = default_user_url()
    db = TuningDB(url) if tune or exists(url) else None
    return db, (Tuner(db, BUDGETS[tune]) if tune else None)


def _variant_configs(o, problem, db: TuningDB | None, chip: str) -> list[tuple[str, dict]]:
    """Each variant once: at the fastest config its tuning trials found for this problem, else
    at its first allowed config (a kernel compile per config rules out timing them all)."""
    best: dict[str, tuple[float, dict]] = {}
    key = problem.key
    for t in db.trials(chip=chip, op=o.name) if db else []:
        mine = t["problem"] == key and t["status"] == "ok"
        if mine and (t["variant"] not in best or t["median_s"] < best[t["variant"]][0]):
            best[t["variant"]] = (t["median_s"], t["params"])
    pdict = problem.as_dict()
    out = []
    for v in o.variants:
        if not v.available():
            continue
        # A trial's configuration may predate a limit of the variant's space.
        if v.name in best and v.allows(pdict, best[v.name][1]):
            out.append((v.name, best[v.name][1]))
            continue
        allowed = next((c for c in v.configs() if v.allows(pdict, c)), None)
        if allowed is not None:
            out.append((v.name, allowed))
    return out


# How MLX says a buffer did not fit: CUDA's allocators, its own malloc, Metal's buffer limit.
_OUT_OF_MEMORY = ("out of memory", "unable to allocate", "maximum allowed buffer size")


def run_or_skip(failed: list, o, ex: Example, *args, **kwargs) -> list[dict]:
    """:func:`run_op`'s rows, or none where the device runs out of memory for the problem: it
    goes to ``failed`` with the error, and the suite keeps the rows it has."""
    try:
        rows = run_op(o, ex, *args, **kwargs)
        MEASURED.setdefault("rows", []).extend(rows)  # the same dicts: later fields land too
        return rows
    except (RuntimeError, MemoryError) as e:
        if not any(m in str(e).lower() for m in _OUT_OF_MEMORY):
            raise
        error = str(e)
    # Outside the handler: its traceback held the problem's arrays.
    mx.clear_cache()
    failed.append({"op": o.name, "example": ex.label(), "error": error})
    print(f"[{o.name}] {ex.label()}: not measured ({error})", flush=True)
    return []


def run_op(
    o,
    ex: Example,
    tuner: Tuner | None,
    db: TuningDB | None,
    budget_s: float,
    baseline: str | None = None,
) -> list[dict]:
    """Rows for one problem: the dispatched call first, then each variant, with ratios to
    ``baseline`` (default: the op's default, which is not always a built-in: name it to
    compare with one)."""
    dtype = parse_dtype(ex.dtype)
    args = o.example(ex.shapes, dtype, mx.random.key(0), **dict(ex.options))
    kwargs = {}
    if tuner is not None:
        tuner.tune(o, ex)
    problem = o.problem(*args)
    out = o(*args)
    # After the first call: a tuned variant that failed its probe there is disabled, and the
    # decision then names the default that serves instead.
    decision = dispatch.choose(o, problem)
    outs = out if isinstance(out, tuple) else (out,)  # gated_delta, selective_scan: and a state
    moved = sum(a.nbytes for a in (*args, *outs) if isinstance(a, mx.array))
    base = {
        "op": o.name,
        "shape": list(ex.shapes[0]),
        "dtype": ex.dtype,
        "options": dict(ex.options),
        "problem": problem.key,
        "bytes": moved,
    }
    chip = tuner.chip.slug if tuner else decision.chip
    variants = _variant_configs(o, problem, db, chip)
    baseline = baseline or o.default(problem)[0]
    fns = {name: o.variant(name).build(**cfg) for name, cfg in variants}
    if baseline not in fns:
        raise ValueError(f"[{o.name}] baseline {baseline!r} is not an available variant")
    # The dispatch's ratio comes from it and the baseline timed alone: a slow variant sampled
    # between them (an eager composition's traffic) slows the chain after it.
    head_calls = [(o, args, kwargs), (fns[baseline], args, kwargs)]
    # Only a custom kernel has a gradient wrapper to skip.
    if o.variant(decision.variant).is_kernel:
        head_calls.append((_inference(o), args, kwargs))
    head = measure(head_calls, budget_s, o.feed)
    timed = measure([(fns[name], args, kwargs) for name, _ in variants], budget_s, o.feed)
    rows = [
        {
            **base,
            "impl": "dispatch",
            "variant": decision.variant,
            "params": decision.params,
            "source": decision.source,
            **head[0],
            "baseline_median_s": head[1]["median_s"],
            "baseline_spread_s": head[1]["spread_s"],
            # What a model pays per call: the host's graph building too.
            "build_eval_vs_baseline": head[1]["build_eval_s"] / head[0]["build_eval_s"],
            **({"inference_median_s": head[2]["median_s"]} if len(head) > 2 else {}),
        }
    ]
    for (name, cfg), t in zip(variants, timed):
        rows.append({**base, "impl": "variant", "variant": name, "params": cfg, **t})
    ref = next(r["median_s"] for r in rows[1:] if r["variant"] == baseline)
    for r in rows:
        r["baseline"] = baseline
        r["vs_baseline"] = r.get("baseline_median_s", ref) / r["median_s"]
        if "inference_median_s" in r:
            r["inference_vs_baseline"] = r["baseline_median_s"] / r["inference_median_s"]
        r["gb_per_s"] = moved / r["median_s"] / 1e9
    return rows
