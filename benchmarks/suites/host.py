"""What the chain timing of the other suites leaves out.

- ``overhead``: the library's cost per call on a cache hit, for every op (rope with each kind
  of offset, attention also through ``scaled_dot_product_attention``): host time to build one
  call's graph through the public function and through the variant it serves called
  directly with the same arguments (the best of loops taken in turn; no evaluation); the
  overhead is the public call with the kept decision swapped for one that builds nothing,
  less that one alone;
- ``build``: host time to build one call's graph (no evaluation) at each op's largest problem
  (of its default tuning preset on a GPU, of its quick one on the CPU): the baseline, the
  dispatch, the variant it serves called directly, and that variant in ``inference_mode``;
- ``idle``: at small problems, where the dispatch serves the baseline itself, the dispatch,
  the baseline, the baseline again and the baseline with a 0.5 ms sleep every 100 calls,
  timed together with :func:`~mlx_primitives.tuning.timing.bench_many`'s equal start and
  with each evaluation right after its own build;
- ``offset`` (rope only): the dispatch at rope's large problems (on the CPU, its largest) with
  a Python offset, with a new Python offset each call, and with the offset passed as a 4-byte
  array made per call, which MLX's CUDA back-end keeps in host memory
  (docs/notes/2026-11-27-rope-offset-scalar-pool.md).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import statistics
import time

import mlx.core as mx

import mlx_primitives as mp
from mlx_primitives import dispatch, recording
from mlx_primitives.hardware import current_backend
from mlx_primitives.problem import parse_dtype
from mlx_primitives.registry import Example, op, ops
from mlx_primitives.tuning import timing

from ..common import _inference, header

OPS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu")
SECTIONS = ("overhead", "build", "idle", "offset", "record")
# The most the library may add to a call on a cache hit (issue #26).
OVERHEAD_GOAL_S = 1.5e-6
# The most recording (mp.record) may add to a call on a cache hit (issue #29).
RECORD_GOAL_S = 0.2e-6
# The idle section's problems: each op's default problems in float16 below this many elements
# (1 and 64 rows, rope's decode), where MLX's cost per call dominates.
SMALL = 2**20


def _case(o, ex: Example):
    args = o.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
    kwargs = {}
    mx.eval(args)
    problem = o.problem(*args)
    name, params = o.default(problem)
    baseline = o.variant(name).build(**params)
    decision = dispatch.choose(o, problem)
    return args, kwargs, baseline, decision


def _per_call_s(fn, args, kwargs, n: int = 3000) -> float:
    """Best of three loops of ``n`` graph constructions, per call."""
    for _ in range(100):
        fn(*args, **kwargs)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn(*args, **kwargs)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def _calls(o, args: tuple) -> dict:
    """``{label: (public call, its arguments as the variant takes them)}`` for ``o``: the
    public function called as a program calls it (positional arguments positionally), rope
    with each kind of offset, attention through scaled_dot_product_attention too."""
    public = getattr(mp, o.name)
    kinds = inspect.signature(public).parameters
    pos = [a for p, a in zip(o.params, args) if kinds[p].kind != kinds[p].KEYWORD_ONLY]
    kw = {p: a for p, a in zip(o.params, args) if kinds[p].kind == kinds[p].KEYWORD_ONLY}
    out = {"": (lambda: public(*pos, **kw), args)}
    if o.name == "rope":
        at = o.params.index("offset")
        fresh = itertools.count(10**5)
        x, dims, scalar = args[0], args[1], mx.array(7)
        out = {
            "offset=int": (lambda: public(x, dims, offset=7), (*args[:at], 7, *args[at + 1 :])),
            "offset=new int each call": (lambda: public(x, dims, offset=next(fresh)), args),
            "offset=mx.array(7)": (
                lambda: public(x, dims, offset=scalar),
                (*args[:at], scalar, *args[at + 1 :]),
            ),
        }
    if o.name == "flash_attention":
        q, k, v, causal, scale = args[:5]
        scale = scale or q.shape[-1] ** -0.5
        mask = "causal" if causal else None
        out["scaled_dot_product_attention"] = (
            lambda: mp.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
            (q, k, v, causal, scale, *args[5:]),
        )
    return out


def overhead_rows(o, preset: str) -> list[dict]:
    ex = min(o.presets[preset], key=lambda e: math.prod(e.shapes[0]))
    args, _, _, decision = _case(o, ex)
    served = o.variant(decision.variant).positional(**decision.params)
    rows = []
    for label, (call, variant_args) in _calls(o, args).items():
        mx.eval(call(), served(*variant_args))  # compiled before the clock
        dispatch_s, variant_s = _paired_per_call_s(call, lambda a=variant_args: served(*a))
        rows.append(
            {
                "op": o.name,
                "call": label,
                "example": ex.label(),
                "variant": decision.variant,
                "dispatch_s": dispatch_s,
                "variant_s": variant_s,
                "overhead_s": _library_s(o, call, served, variant_args),
                "goal_s": OVERHEAD_GOAL_S,
            }
        )
    return rows


def _library_s(o, call, served, variant_args: tuple) -> float:
    """The library's own host time in ``call`` on a cache hit: ``call`` with the decision it
    reuses swapped for one that builds nothing (it returns an output made before, wrapped as
    the real decision is), less the bare one called alone. Unlike the difference of
    ``dispatch_s`` and ``variant_s``, the variant's graph build (up to 170 us on the CPU)
    adds no noise to it."""
    dispatch.forget_calls()
    call()
    # The one decision this call keeps (a variant may call other ops, keeping theirs).
    (key,) = (key for key in dispatch._calls if key[0] == o.name)
    kept = dispatch._calls[key]

    made = kept(*variant_args)

    def nothing(*args):  # gives what the public function may take apart, made beforehand
        return made

    stub = nothing
    if kept is not served:  # a tuned variant, guarded by a fallback to the default
        stub = dispatch.guard(o, o.problem(*variant_args), "", nothing)
    dispatch._calls[key] = stub
    try:
        with_stub, alone = _paired_per_call_s(call, lambda: nothing(*variant_args))
    finally:
        dispatch.forget_calls()
    return with_stub - alone


def _paired_per_call_s(a, b, n: int = 2000, rounds: int = 9) -> tuple[float, float]:
    """The best loop of ``n`` calls of each of ``a`` and ``b`` (no arguments), their loops
    taken in turn so that the machine's load falls on both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, fn in enumerate((a, b)):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return best[0], best[1]


def record_rows(o, preset: str, n: int = 2000, rounds: int = 9) -> list[dict]:
    """Host seconds per call through the public function with recording off and on, loops
    taken in turn (the counts are thrown away, not stored)."""
    ex = min(o.presets[preset], key=lambda e: math.prod(e.shapes[0]))
    args, _, _, _ = _case(o, ex)
    call = next(iter(_calls(o, args).values()))[0]  # rope: its int offset
    best = {"off": float("inf"), "on": float("inf")}
    for _ in range(rounds):
        for state in ("off", "on"):
            # Counted into a database that is never written (the block's end is not reached
            # with counts: they are thrown away first).
            block = recording.record(":memory:") if state == "on" else contextlib.nullcontext()
            with block:
                call()  # the first call with the new state builds the cached entry
                start = time.perf_counter()
                for _ in range(n):
                    call()
                best[state] = min(best[state], (time.perf_counter() - start) / n)
                if state == "on":
                    recording._stack[-1].cells.clear()
    return [
        {
            "op": o.name,
            "example": ex.label(),
            "off_s": best["off"],
            "on_s": best["on"],
            "record_cost_s": best["on"] - best["off"],
            "goal_s": RECORD_GOAL_S,
        }
    ]


def build_rows(o, preset: str) -> list[dict]:
    ex = max(o.presets[preset], key=lambda e: math.prod(e.shapes[0]))
    args, kwargs, baseline, decision = _case(o, ex)
    served = o.variant(decision.variant).build(**decision.params)
    mx.eval(o(*args, **kwargs), served(*args, **kwargs))  # compiled before the clock
    calls = {"baseline": baseline, "dispatch": o, "variant": served}
    if o.variant(decision.variant).is_kernel:
        calls["variant in inference_mode"] = _inference(served)
    return [
        {
            "op": o.name,
            "example": ex.label(),
            "variant": decision.variant,
            "impl": impl,
            "build_s": _per_call_s(fn, args, kwargs),
        }
        for impl, fn in calls.items()
    ]


def _sleepy(fn):
    """``fn`` that sleeps 0.5 ms every 100 calls: a longer build without more Python."""
    count = [0]

    def call(*args, **kwargs):
        count[0] += 1
        if count[0] % 100 == 0:
            time.sleep(5e-4)
        return fn(*args, **kwargs)

    return call


def _timed(o, impls: dict, args, kwargs, budget_s: float, **options) -> list[timing.Timing]:
    """``impls`` on one problem, timed together (fed as the op feeds)."""
    return timing.bench_many(
        [(fn, args, kwargs) for fn in impls.values()],
        budget_s=budget_s,
        warmup_s=0.1,
        max_reps=200,
        feed=o.feed,
        **options,
    )


def idle_rows(o, budget_s: float) -> list[dict]:
    rows = []
    for ex in o.presets["default"]:
        if ex.dtype != "float16" or math.prod(ex.shapes[0]) >= SMALL:
            continue
        args, kwargs, baseline, decision = _case(o, ex)
        impls = {
            "dispatch": o,
            "baseline": baseline,
            "baseline again": baseline,
            "baseline after sleeps": _sleepy(baseline),
        }
        for equal in (False, True):
            timed = _timed(o, impls, args, kwargs, budget_s, equal_start=equal)
            base = timed[1]
            for impl, t in zip(impls, timed):
                ratios = [b / s for b, s in zip(base.samples, t.samples)]
                rows.append(
                    {
                        "op": o.name,
                        "example": ex.label(),
                        "variant": decision.variant,
                        "equal_start": equal,
                        "impl": impl,
                        "median_s": t.median_s,
                        "vs_baseline": base.median_s / t.median_s,
                        "paired_vs_baseline": statistics.median(ratios),
                        "reps": t.reps,
                        "chain": t.chain,
                        "idle_s": t.idle_s,
                    }
                )
    return rows


def _offset_impls(o) -> dict:
    """rope's dispatch with the call's offset, with a new offset each call (as a KV cache's
    moves), and with the call's offset as a 4-byte array made per call."""
    fresh = itertools.count(10**6)
    at = o.params.index("offset")

    def new_int(*args):
        return o(*args[:at], next(fresh), *args[at + 1 :])

    def scalar_array(*args):
        return o(*args[:at], mx.array(args[at], mx.int32), *args[at + 1 :])

    return {"python int": o, "new python int each call": new_int, "4-byte array": scalar_array}


def offset_rows(o, preset: str, budget_s: float) -> list[dict]:
    examples = [e for e in o.presets[preset] if math.prod(e.shapes[0]) >= SMALL]
    rows = []
    for ex in examples or [max(o.presets[preset], key=lambda e: math.prod(e.shapes[0]))]:
        args, kwargs, _, decision = _case(o, ex)

        impls = _offset_impls(o)
        timed = _timed(o, impls, args, kwargs, budget_s)
        for impl, t in zip(impls, timed):
            rows.append(
                {
                    "op": o.name,
                    "example": ex.label(),
                    "variant": decision.variant,
                    "impl": impl,
                    "median_s": t.median_s,
                    "vs_python_int": timed[0].median_s / t.median_s,
                    "gb_per_s": 2 * args[0].nbytes / t.median_s / 1e9,
                    "reps": t.reps,
                    "chain": t.chain,
                    "idle_s": t.idle_s,
                }
            )
    return rows


def run(args) -> dict:
    chosen = args.section or list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"[host] unknown sections {sorted(unknown)}: {list(SECTIONS)}")
    result = header("host")
    result["method"] = (
        "overhead: host seconds per call to build one call's graph through the public "
        "function (dispatch_s) and through the served variant called directly (variant_s); "
        "overhead_s is the public call with its kept decision swapped for one that builds "
        "nothing, less that one alone (each the best of nine loops of 2000 calls, the two "
        "taken in turn, at each op's smallest problem); build: host "
        "seconds per call to build one call's graph, no evaluation (best of three loops of "
        "3000 calls); idle: "
        "mlx_primitives.tuning.timing.bench_many of the listed implementations together, "
        "with each evaluation right after its own build "
        "(equal_start false) and with every evaluation starting the same time after its "
        "chain's build began (true); vs_baseline from medians, paired_vs_baseline the median "
        "of each round's ratio; offset: the same bench_many of rope's dispatch with the "
        "example's Python offset, with a new Python offset each call, and with the example's "
        "offset as mx.array(offset, mx.int32) made per call, bandwidth counting the input "
        "read and the output written once; record: host seconds per call through the public "
        "function with mp.record's counting off and on (best of nine loops of 2000 calls "
        "each, taken in turn)"
    )
    result["sections"] = chosen
    result["results"] = []
    preset = "default" if current_backend() != "cpu" else "quick"
    if "overhead" in chosen:
        # What two parts of every dispatch cost on this host: reading the default device (a
        # GPU back-end's key holds it) and an empty Python call, for reading the overheads.
        device, empty = _paired_per_call_s(
            lambda: mx.default_device().type is mx.DeviceType.gpu, lambda: None
        )
        result["device_read_s"], result["empty_call_s"] = device - empty, empty
        for o in ops():
            if not args.op or o.name in args.op:
                rows = overhead_rows(o, preset)
                result["results"] += [{"section": "overhead", **r} for r in rows]
    for name in args.op or OPS:
        o = op(name)
        if "build" in chosen:
            result["results"] += [{"section": "build", **r} for r in build_rows(o, preset)]
        if "idle" in chosen:
            result["results"] += [{"section": "idle", **r} for r in idle_rows(o, args.budget)]
        if "record" in chosen:
            result["results"] += [{"section": "record", **r} for r in record_rows(o, preset)]
        if "offset" in chosen and name == "rope":
            rows = offset_rows(o, preset, args.budget)
            result["results"] += [{"section": "offset", **r} for r in rows]
        print(f"[host] {name} done", flush=True)
    return result
