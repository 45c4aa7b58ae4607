"""The tuner: checks, rejections with reasons, the never-worse and tie rules, resume, TPE."""

from __future__ import annotations

import dataclasses
import time

import mlx.core as mx
import pytest

from mlx_primitives.registry import Example, Variant
from mlx_primitives.tuning import tuner as tuner_mod
from mlx_primitives.tuning.tuner import BUDGETS, Budget, Candidate, Result, Tuner, beats, decide

from .toy import _slow, double, make_op

EX = Example(((64, 256),), "float32")
FAST = Budget(trials=64, problem_s=60, bench_s=0.02)


def _r(name, median, stderr=0.0, status="ok"):
    return Result(Candidate(name, ()), status, "", median, 0.0, 0.0, stderr)


def test_decide_keeps_the_default_unless_beaten_beyond_noise():
    default = _r("default", 1.0, 0.01)
    slightly = _r("a", 0.99, 0.005)
    assert decide([default, slightly], default, [default.candidate, slightly.candidate]) is default
    clearly = _r("b", 0.5, 0.01)
    assert (
        decide(
            [default, slightly, clearly],
            default,
            [default.candidate, slightly.candidate, clearly.candidate],
        )
        is clearly
    )


def test_decide_never_picks_a_rejected_candidate():
    default = _r("default", 1.0)
    bad = _r("bad", 0.1, status="rejected")
    assert decide([default, bad], default, [default.candidate, bad.candidate]) is default


def test_decide_breaks_near_ties_by_fixed_order():
    default = _r("default", 1.0, 0.0)
    first = _r("first", 0.505, 0.002)
    second = _r("second", 0.500, 0.002)
    order = [default.candidate, first.candidate, second.candidate]
    assert decide([default, second, first], default, order) is first
    # The order, not measurement noise, decides: swapping the medians changes nothing.
    first2, second2 = _r("first", 0.500, 0.002), _r("second", 0.505, 0.002)
    assert decide([default, first2, second2], default, order) is first2


def test_beats_uses_standard_errors_and_a_floor():
    assert not beats(_r("a", 0.985), _r("b", 1.0))  # under the 2% floor
    assert beats(_r("a", 0.9), _r("b", 1.0))
    assert not beats(_r("a", 0.9, 0.04), _r("b", 1.0, 0.03))  # 0.1 < 2 * hypot(0.04, 0.03)
    assert beats(_r("a", 0.9, 0.02), _r("b", 1.0, 0.02))


def test_short_calls_must_win_by_more():
    # Under 20 us a call is mostly host cost, which moves between processes by 10%.
    us = 1e-6
    assert not beats(_r("a", 13.0 * us), _r("b", 14.0 * us))  # 7%
    assert beats(_r("a", 12.5 * us), _r("b", 14.0 * us))  # 11%
    assert beats(_r("a", 28.6 * us), _r("b", 30.0 * us))  # 5%, at 30 us


def test_stderr_of_the_median_shrinks_with_samples():
    from mlx_primitives.tuning.timing import Timing

    few, many = Timing(1.0, 0.2, 4, 1, 0.0), Timing(1.0, 0.2, 400, 1, 0.0)
    assert many.stderr_s == few.stderr_s / 10
    assert few.stderr_s == 1.2533 * (0.2 / 1.349) / 2


def test_tuning_rejects_faulty_candidates_with_reasons(db):
    op = make_op()
    outcome = Tuner(db, FAST).tune(op, EX)
    rec = outcome.record
    assert rec is not None and rec.variant != "slow"
    assert rec.default_variant == "default" and rec.default_median_s > 0
    assert rec.median_s <= rec.default_median_s
    trials = {t["variant"]: t for t in db.trials()}
    assert "gpu_only" not in trials  # not available on this back-end
    assert trials["nan"]["status"] == "rejected" and "NaN" in trials["nan"]["reason"]
    assert trials["wrong"]["status"] == "rejected" and "mismatch" in trials["wrong"]["reason"]
    assert "boom at call time" in trials["raises"]["reason"]
    assert "compiler exploded" in trials["broken_build"]["reason"]
    # Correct but slow: measured, or abandoned for being 100x slower than the default.
    assert trials["slow"]["status"] == "ok" or "too slow" in trials["slow"]["reason"]
    assert db.records()[0].problem == "toy|float32|rows=64,cols=256"


def _host_heavy():
    def call(x):
        end = time.perf_counter() + 5e-4  # the host's work of building a call
        while time.perf_counter() < end:
            pass
        return x * 2

    return call


def test_a_winner_on_the_device_alone_must_not_lose_built_and_run_a_call_at_a_time(db):
    """Chained, a call whose build is slow on the host looks fast (chains are built before the
    clock starts); a model's small calls pay the build. Such a winner is not recorded."""
    one_pass = Variant("one_pass", lambda: lambda x: mx.sin(x) * 0 + x * 2)
    op = make_op([one_pass, Variant("host_heavy", _host_heavy)])
    op.variants = op.variants[-2:]
    op._default = lambda p, backend: ("one_pass", {})
    outcome = Tuner(db, FAST).tune(op, EX)
    assert outcome.record.variant == "one_pass", outcome.note
    assert "a call built and run at a time" in outcome.note


def test_candidate_far_slower_than_default_is_abandoned(db, monkeypatch):
    monkeypatch.setattr(tuner_mod, "ABANDON_FACTOR", 2.0)
    Tuner(db, FAST).tune(make_op(), EX)
    trials = {t["variant"]: t for t in db.trials()}
    assert trials["slow"]["status"] == "rejected" and "too slow" in trials["slow"]["reason"]


def test_resume_skips_finished_problems_and_force_retunes(db):
    op = make_op()
    t = Tuner(db, FAST)
    assert t.tune(op, EX).record is not None
    again = t.tune(op, EX)
    assert again.record is None and again.note == "already tuned"
    n = len(db.trials())
    prev = db.records()[0]
    forced = Tuner(db, FAST, force=True).tune(op, EX)
    assert forced.record is not None
    new = db.trials()[n:]
    assert new[0]["variant"] == "default"
    if prev.variant != "default":
        assert (new[1]["variant"], new[1]["params"]) == (prev.variant, prev.params)


def test_stale_record_is_retuned(db):
    op = make_op()
    Tuner(db, FAST).tune(op, EX)
    db.put(dataclasses.replace(db.records()[0], mlx_version="0.0.1"))
    outcome = Tuner(db, FAST).tune(op, EX)
    assert outcome.record is not None and outcome.record.mlx_version == mx.__version__


def test_tpe_limits_measurements_to_the_trial_budget(db):
    big = Variant(
        "big",
        lambda a, b, c: double,
        space={"a": tuple(range(6)), "b": (1, 2, 3), "c": (True, False)},
    )
    op = make_op([big])
    outcome = Tuner(db, Budget(trials=10, problem_s=60, bench_s=0.01)).tune(op, EX)
    assert outcome.record is not None
    assert 2 <= len(outcome.results) <= 10


def test_each_variants_first_config_is_timed_whatever_the_search_samples(db):
    big = Variant("big", lambda a, b: double, space={"a": (5, 0, 1, 2, 3, 4), "b": (2, 1)})
    op = make_op([big])
    outcome = Tuner(db, Budget(trials=3, problem_s=60, bench_s=0.01)).tune(op, EX)
    timed = {r.candidate for r in outcome.results}
    assert Candidate.of("big", {"a": 5, "b": 2}) in timed
    assert Candidate.of("tiled", {"block": 32, "unroll": 1}) in timed
    assert not any(c.variant == "big" and c != Candidate.of("big", {"a": 5, "b": 2}) for c in timed)


def test_failing_default_is_reported_not_recorded(db):
    op = make_op()
    op._default = lambda p, backend: ("nan", {})
    outcome = Tuner(db, FAST).tune(op, EX)
    assert outcome.record is None and "default failed its check" in outcome.note
    assert db.records() == []


def test_presets_define_budgets():
    assert set(BUDGETS) == {"quick", "default", "full"}
    assert BUDGETS["quick"].trials <= BUDGETS["default"].trials <= BUDGETS["full"].trials


def test_warm_runs_candidates_in_worker_processes():
    from mlx_primitives.registry import op
    from mlx_primitives.tuning.tuner import candidates
    from mlx_primitives.tuning.warm import warm

    o = op("rms_norm")
    x, w = mx.ones((8, 64)), mx.ones((64,))
    problem = o.problem(x, w, 1e-5)
    cands = candidates(o, problem, "cpu")
    assert warm(o, problem, cands) == 0  # no kernels on the CPU
    ran = warm(o, problem, cands, workers=2, kernels_only=False)
    assert ran == len(cands) == 3


def test_tuner_compiles_ahead_only_what_its_search_will_run(db, monkeypatch):
    """A space larger than the trials is compiled as the search samples it, not all ahead
    (quantized_matmul's 396 configurations at 16 rows cost minutes to compile)."""
    warmed = []
    monkeypatch.setattr(tuner_mod, "warm", lambda op, problem, c: warmed.append(list(c)))
    t = Tuner(db, dataclasses.replace(FAST, trials=4))
    t.backend = "cuda"  # the only back-end that compiles ahead
    t.tune(make_op(), EX)
    heads = {"default", "slow", "tiled", "nan", "wrong", "broken_build", "raises", "gpu_only"}
    assert sorted(c.variant for c in warmed[0]) == sorted(heads)  # each variant's first config
    t = Tuner(db, dataclasses.replace(FAST, trials=64), force=True)
    t.backend = "cuda"
    t.tune(make_op(), EX)  # every candidate runs: all compiled ahead, none twice
    assert sum(c.variant == "tiled" for c in warmed[1]) == 6 and len(warmed[1]) == 13


def test_the_random_start_of_a_search_is_drawn_ahead_and_compiled_with_the_first(db, monkeypatch):
    """Past each variant's first config, a space larger than the trials starts with up to
    RANDOM_TRIALS candidates drawn at random: compiled ahead with the first, all measured, and
    TPE picks the rest starting from them."""
    warmed = []
    monkeypatch.setattr(tuner_mod, "warm", lambda op, problem, c: warmed.append(list(c)))
    big = Variant("big", lambda a, b: double, space={"a": tuple(range(10)), "b": (1, 2, 3)})
    heads = 9  # the toy op's 8 variants and this one, each its first config
    for extra in (4, tuner_mod.RANDOM_TRIALS + 3):
        t = Tuner(db, Budget(trials=heads + extra, problem_s=60, bench_s=0.01), force=True)
        t.backend = "cuda"
        outcome = t.tune(make_op([big]), EX)
        ahead, timed = warmed[-1], {r.candidate for r in outcome.results}
        assert len(ahead) == heads + min(extra, tuner_mod.RANDOM_TRIALS)
        assert set(ahead) <= timed  # what was compiled ahead was measured
        assert len(timed) == heads + extra  # and TPE added the rest


def test_warm_survives_a_worker_that_dies(monkeypatch):
    """A worker killed by a faulty kernel neither hangs nor breaks warming."""
    from mlx_primitives.registry import op
    from mlx_primitives.tuning import warm as warm_mod
    from mlx_primitives.tuning.tuner import candidates

    o = op("rms_norm")
    problem = o.problem(mx.ones((8, 64)), mx.ones((64,)), 1e-5)
    cands = candidates(o, problem, "cpu")
    jobs = [*cands, Candidate.of("builtin", {})]
    monkeypatch.setattr(warm_mod, "_compile", _die_on_builtin)
    ran = warm_mod.warm(o, problem, jobs, workers=2, kernels_only=False, timeout_s=60)
    assert 0 <= ran < len(jobs)


def _die_on_builtin(job):
    import os

    if job[3] == "builtin":
        os._exit(9)
    return True


def test_chained_calls_feed_each_output_to_the_next():
    """On CUDA independent calls of a chain overlap on the device; the timing chain passes each
    output on as the next call's first input where shapes and dtypes agree, so they cannot."""
    from mlx_primitives.tuning.timing import _run_chain

    x = mx.ones((4, 8))
    seen = []

    def twice(a, b):
        seen.append(a)
        return a * 2

    _run_chain((twice, (x, 1), {}), 3, 0)
    assert seen[0] is x
    mx.eval(seen)
    assert [s[0, 0].item() for s in seen] == [1.0, 2.0, 4.0]
    # An output of another shape cannot be passed on: each call gets the inputs as given.
    seen.clear()
    _run_chain((lambda a, b: (seen.append(a), a.sum())[1], (x, 1), {}), 3, 0)
    assert all(s is x for s in seen)
    # Op.feed names another argument (swiglu's `up`): that one is fed, the first stays.
    pairs = []
    _run_chain((lambda a, b: (pairs.append((a, b)), a + b)[1], (x, x * 3), {}), 3, 1)
    assert all(a is x for a, _ in pairs)
    mx.eval(pairs)
    assert [b[0, 0].item() for _, b in pairs] == [3.0, 4.0, 5.0]
    # The fed argument's shape decides, not the first's: a row vector first, a matrix fed.
    pairs.clear()
    row = mx.ones((8,))
    _run_chain((lambda a, b: (pairs.append((a, b)), a + b)[1], (row, x), {}), 3, 1)
    assert all(a is row for a, _ in pairs) and pairs[1][1] is not x
    # A position past the arguments feeds nothing.
    pairs.clear()
    _run_chain((lambda a, b: (pairs.append((a, b)), a + b)[1], (x, x), {}), 3, 2)
    assert all(a is x and b is x for a, b in pairs)
    # Op.feed None: never fed.
    seen.clear()
    _run_chain((twice, (x, 1), {}), 3, None)
    assert all(s is x for s in seen)


def test_swiglu_and_geglu_feed_up_and_feed_is_a_position():
    """Fed back as the gate, swiglu's and geglu's outputs grow to inf in float16 and their
    kernels' division takes a slow path; `up` is only multiplied."""
    from mlx_primitives import registry

    assert registry.op("swiglu").feed == registry.op("geglu").feed == 1
    for bad in (False, True, -1, 1.0):
        with pytest.raises(TypeError, match=r"\[toy\] feed must be an argument position"):
            make_op(feed=bad)


def test_the_tuner_times_with_its_ops_feed(db, monkeypatch):
    seen = []

    def spy(real):
        def timed(*args, feed=0, **kwargs):
            seen.append((real.__name__, feed))
            return real(*args, feed=feed, **kwargs)

        return timed

    monkeypatch.setattr(tuner_mod, "bench", spy(tuner_mod.bench))
    monkeypatch.setattr(tuner_mod, "bench_many", spy(tuner_mod.bench_many))
    Tuner(db, FAST).tune(make_op(feed=None), EX)
    assert {name for name, _ in seen} == {"bench", "bench_many"}
    assert {feed for _, feed in seen} == {None}


def test_each_fed_argument_has_its_ops_output_shape_and_dtype():
    """A feed that never fits is silently no feed: the calls would overlap again."""
    import math

    from mlx_primitives import registry
    from mlx_primitives.problem import parse_dtype

    for o in registry.ops():
        if o.feed is None:
            continue
        ex = min(o.presets["quick"], key=lambda e: sum(math.prod(s) for s in e.shapes))
        args = o.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
        name, params = o.default(o.problem(*args), "cpu")
        out = o.variant(name).build(**params)(*args)
        fed = args[o.feed]
        assert isinstance(out, mx.array), o.name
        assert (out.shape, out.dtype) == (fed.shape, fed.dtype), o.name


def test_timing_never_waits_on_a_calls_inputs(monkeypatch):
    """mx.eval of arrays already computed waits on each and marks it "available"; MLX's CUDA
    attention then runs its vector kernel for a decode instead of cuDNN, which it runs on
    inputs a model's step leaves "evaluated". Timing computes the inputs without that."""
    from mlx.utils import tree_flatten

    from mlx_primitives.tuning import timing

    evaluated, steps = [], []

    def spy(name, real):
        def call(*arrays, **kwargs):
            steps.append(name)
            if name == "eval":
                evaluated.extend(id(a) for _, a in tree_flatten(arrays))
            return real(*arrays, **kwargs)

        return call

    x = mx.random.normal((64, 32))  # lazy: computed by the timing itself
    w = mx.ones((32,))
    mx.eval(w)
    for name in ("eval", "async_eval", "synchronize", "reset_peak_memory"):
        monkeypatch.setattr(timing.mx, name, spy(name, getattr(mx, name)))
    t = timing.bench(lambda a, b: a * b, (x, w), budget_s=0.01, warmup_s=0.0, min_reps=2)
    assert t.median_s > 0 and evaluated
    assert id(x) not in evaluated and id(w) not in evaluated
    # Computed, and finished, before the peak-memory count starts.
    assert steps[:3] == ["async_eval", "synchronize", "reset_peak_memory"]


def test_chain_is_capped_by_a_calls_peak_memory_not_its_output(monkeypatch):
    """A call with a small output can hold far more while it runs (MLX's attention with a dense
    mask: tens of GB of scores); chained, several of them in flight ran an 80 GB H100 out of
    memory. The memory cap counts each call at its peak."""
    from mlx_primitives.tuning import timing

    x = mx.random.normal((2048,))
    mx.eval(x)

    def outer_sum(v):  # a 16 MB product for a 4-byte result
        return (v[:, None] * v[None, :]).sum()

    monkeypatch.setattr(timing, "_chain_bytes", lambda: 32 * 2**20)
    _, _, cap = timing._prepare((outer_sum, (x,), {}), None, 20e-3, 1000, 0)
    assert 1 <= cap <= 2
    # An output-sized call keeps the cap its output allows, even where its input is still
    # lazy (attention's random K and V, made in float32 first, cut decode chains tenfold).
    y = mx.random.normal((2048, 1024)).astype(mx.float16)
    _, _, cap = timing._prepare((mx.abs, (y,), {}), None, 20e-3, 1000, 0)
    assert cap == 32 * 2**20 // y.nbytes
    # Timed together, the heavy call chains what its memory allows and the light one keeps
    # the chain its speed asks for.
    light, heavy = timing.bench_many(
        [(mx.abs, (x,), {}), (outer_sum, (x,), {})], budget_s=0.01, warmup_s=0.0, min_reps=2
    )
    assert heavy.chain <= 2 < light.chain


def test_evaluations_start_alike_after_their_builds(monkeypatch):
    """The device's idle time before an evaluation changes its speed: every call timed
    together waits the same time from the start of its chain's build, the slowest build's
    with a margin."""
    from mlx_primitives.tuning import timing

    x = mx.ones((4,))
    begun = time.perf_counter()
    per_call, with_build = timing._run_chain((mx.abs, (x,), {}), 2, 0, idle_s=0.05)
    # The wait comes before the clock starts, and is no part of the build either.
    assert time.perf_counter() - begun >= 0.05
    assert per_call <= with_build < 0.01

    def slow_build(a):
        time.sleep(1e-3)
        return mx.abs(a)

    waits = []
    run_chain = timing._run_chain

    def spy(call, chain, feed, idle_s=0.0):
        waits.append(idle_s)
        return run_chain(call, chain, feed, idle_s)

    monkeypatch.setattr(timing, "_run_chain", spy)
    fast, slow = timing.bench_many(
        [(mx.abs, (x,), {}), (slow_build, (x,), {})],
        budget_s=0.01,
        warmup_s=0.0,
        min_reps=2,
        max_chain=4,
    )
    assert slow.chain == 4
    assert fast.idle_s == slow.idle_s >= timing.IDLE_MARGIN * 4e-3
    # Every sample waits it; only the chain-length probes before them start at once.
    assert waits.count(fast.idle_s) == fast.reps + slow.reps
    assert set(waits) == {0.0, fast.idle_s}
    assert slow.median_s < 1e-3  # the sleeps were built, not timed
    assert slow.build_eval_s >= 1e-3 > fast.build_eval_s  # ... but count with the build
    assert {t.idle_s for t in timing.paired([fast, slow])} == {fast.idle_s}
    # A call timed apart can be made to wait as long as the calls it is compared with.
    (alone,) = timing.bench_many(
        [(mx.abs, (x,), {})], budget_s=0.01, warmup_s=0.0, min_reps=2, min_idle_s=0.02
    )
    assert alone.idle_s == 0.02
    # ... and never less than its own build asks for.
    (own,) = timing.bench_many(
        [(slow_build, (x,), {})],
        budget_s=0.01,
        warmup_s=0.0,
        min_reps=2,
        max_chain=4,
        min_idle_s=1e-6,
    )
    assert own.idle_s >= timing.IDLE_MARGIN * 4e-3


def test_chain_length_follows_the_per_call_cost_not_the_evaluations(monkeypatch):
    """An evaluation's fixed cost (0.2 ms with large outputs on an H200) swamps one unchained
    call: the chain is sized from a short chain that shares it, so 50 us calls fill it."""
    from mlx_primitives.tuning import timing

    fixed_s, per_call_s = 200e-6, 50e-6
    monkeypatch.setattr(timing, "_run_chain", lambda call, n, feed: (fixed_s / n + per_call_s,) * 2)
    _, wanted, _ = timing._prepare((mx.abs, (mx.ones((4,)),), {}), None, 20e-3, 1000, 0)
    # From one call: 20 ms / 250 us = 80 calls; from four: 20 ms / 100 us = 200.
    assert wanted == int(20e-3 / (fixed_s / timing.PROBE_CHAIN + per_call_s))
    assert wanted > 150
    # The probe stays within the memory cap, and a call over the limit is stopped before it.
    chains = []
    monkeypatch.setattr(
        timing, "_run_chain", lambda call, n, feed: chains.append(n) or (5e-3, 5e-3)
    )
    monkeypatch.setattr(timing, "_chain_bytes", lambda: 1)
    timing._prepare((mx.abs, (mx.ones((4,)),), {}), None, 20e-3, 1000, 0)
    assert chains == [1]
    with pytest.raises(TimeoutError):
        timing._prepare((mx.abs, (mx.ones((4,)),), {}), 1e-4, 20e-3, 1000, True)
    assert chains == [1, 1]


# Decisions that hold: the confirmation round, and a machine too noisy to decide ----------------


def _pair(monkeypatch, variant: Variant):
    """The toy op with ``variant`` as the only challenger of a slow default."""
    op = make_op([variant])
    op._default = lambda p, backend: ("slow", {})
    pair = [Candidate.of("slow", {}), Candidate.of(variant.name, {})]
    monkeypatch.setattr(tuner_mod, "candidates", lambda o, p, backend: list(pair))
    return op


def _twice_slow(x):
    return _slow(_slow(x) / 2)


def test_a_winner_that_does_not_hold_in_the_confirmation_is_not_recorded(db, monkeypatch):
    """A candidate fast in the search and the finalists' round but slow when timed again
    against the default alone: the default is recorded as kept, with the reason."""
    confirming = []

    def mirage(x):
        return _twice_slow(x) if confirming else double(x)

    op = _pair(monkeypatch, Variant("mirage", lambda: mirage))
    final = Tuner._final

    def then_confirm(self, *args):
        out = final(self, *args)
        confirming.append(True)
        return out

    monkeypatch.setattr(Tuner, "_final", then_confirm)
    outcome = Tuner(db, FAST).tune(op, EX)
    rec = outcome.record
    assert confirming, "the finalists' round never ran"
    assert rec is not None and rec.kept_default and rec.variant == "slow"
    assert rec.median_s == rec.default_median_s and rec.speedup_low == 1.0
    assert outcome.note.startswith("the default kept: mirage was")
    assert "confirming" in outcome.note
    assert db.records() == [rec]


def test_a_confirmed_winner_is_recorded_with_the_confirmations_timings(db, monkeypatch):
    """The recorded latencies are those of the confirmation: a fresh round of the default and
    the winner alone, not the finalists' samples again."""
    op = _pair(monkeypatch, Variant("fast", lambda: double))
    rounds = []
    real = tuner_mod.bench_many

    def spy(calls, **options):
        timed = real(calls, **options)
        rounds.append(timed)
        return timed

    monkeypatch.setattr(tuner_mod, "bench_many", spy)
    outcome = Tuner(db, FAST).tune(op, EX)
    rec = outcome.record
    assert rec is not None and rec.variant == "fast"
    confirmation = tuner_mod.paired(rounds[-1])
    assert len(confirmation) == 2  # the default and the winner, alone
    assert rec.default_median_s == confirmation[0].median_s
    assert (rec.median_s, rec.spread_s) == (confirmation[1].median_s, confirmation[1].spread_s)
    assert 1 < rec.speedup_low <= rec.speedup
    assert "confirming" in outcome.note


SCATTERED = (0.5e-3, 0.95e-3, 1.4e-3)  # a median 5% under the default's 1 ms, a wide spread


def fake_machine(monkeypatch, *rounds, firsts=(1e-3,), search=(1e-3,)) -> list[int]:
    """Timings made up, not measured. The search times its candidates at ``search``'s values
    in turn (the last repeats; the default is timed first). In round ``i`` (the finalists',
    then the confirmation, ...) the first call (the default where it is in the round) takes a
    steady ``firsts[i]`` a sample and the others the values of ``rounds[i]`` in turn (the last
    of each repeats). Returns the samples asked of each round."""
    from mlx_primitives.tuning.timing import Timing, summarize

    asked, searched = [], []

    def bench_many(calls, *, min_reps=5, **options):
        values = rounds[min(len(asked), len(rounds) - 1)]
        first = firsts[min(len(asked), len(firsts) - 1)]
        asked.append(min_reps)
        steady = [first] * min_reps
        rest = [values[i % len(values)] for i in range(min_reps)]
        return [summarize(steady if i == 0 else rest, 1) for i in range(len(calls))]

    def bench(fn, args, kwargs=None, **options):
        searched.append(fn)
        return Timing(search[min(len(searched), len(search)) - 1], 0.0, 15, 1, 0.0)

    monkeypatch.setattr(tuner_mod, "bench_many", bench_many)
    monkeypatch.setattr(tuner_mod, "bench", bench)
    return asked


def test_a_win_too_noisy_to_confirm_keeps_the_default_and_says_so(db, monkeypatch):
    """A clear win in the finalists' round whose confirmation's spread hides whether it holds,
    even with more samples: the outcome says the machine was too noisy, and the default is
    kept (never worse than itself)."""
    asked = fake_machine(monkeypatch, (0.5e-3,), SCATTERED)
    outcome = Tuner(db, FAST).tune(make_op(), EX)
    assert outcome.noisy and outcome.record.kept_default
    assert outcome.note.startswith("the default kept, too noisy to decide (confirming): ")
    assert "5% faster than the default, within two standard errors" in outcome.note
    assert asked == [tuner_mod.ROUND_REPS, tuner_mod.ROUND_REPS, tuner_mod.NOISY_REPS]
    assert db.records() == [outcome.record]


def test_a_finalists_round_too_noisy_to_tell_keeps_the_default_and_says_so(db, monkeypatch):
    """Nothing beats the default, but the spread hides whether something would: timed again
    with more samples, and then the default is kept with the reason."""
    asked = fake_machine(monkeypatch, SCATTERED)
    outcome = Tuner(db, FAST).tune(make_op(), EX)
    assert asked == [tuner_mod.ROUND_REPS, tuner_mod.NOISY_REPS]
    assert outcome.noisy and outcome.record.kept_default
    assert outcome.note.startswith("the default kept, too noisy to decide (the finalists' round)")
    assert db.records() == [outcome.record]


def test_the_noise_check_judges_the_candidate_at_stake_not_the_luckiest(db, monkeypatch):
    """Of equal candidates one measures fastest by chance: the check judges the one the fixed
    order would pick (here 1% faster, within the floor), so the default is kept plainly."""
    same = [Variant("same_a", lambda: double), Variant("same_b", lambda: double)]
    op = make_op(same)
    pool = [Candidate.of(n, {}) for n in ("default", "same_a", "same_b")]
    monkeypatch.setattr(tuner_mod, "candidates", lambda o, p, backend: list(pool))
    fake_machine(monkeypatch, SCATTERED)
    times = {"default": (1e-3, 0.0), "same_a": (0.99e-3, 0.03e-3), "same_b": (0.95e-3, 0.03e-3)}

    def timed_round(self, op, finalists, args, reps):
        return [
            Result(
                r.candidate,
                "ok",
                "",
                times[r.candidate.variant][0],
                0.0,
                0.0,
                times[r.candidate.variant][1],
            )
            for r in finalists
        ]

    monkeypatch.setattr(Tuner, "_round", timed_round)
    outcome = Tuner(db, FAST).tune(op, EX)
    assert outcome.record.kept_default
    assert outcome.note == "the default kept: nothing beat it beyond noise"


def test_rounds_that_disagree_on_the_gain_are_too_noisy_to_decide(db, monkeypatch):
    """2.2x in the finalists' round, 1.3x confirming: each a steady win, but the machine
    changed between them (a load that came or went), so neither is what it runs at."""
    fake_machine(monkeypatch, (1 / 2.2 * 1e-3,), (1 / 1.3 * 1e-3,))
    outcome = Tuner(db, FAST).tune(make_op(), EX)
    assert outcome.noisy and outcome.record.kept_default
    assert outcome.note.startswith("the default kept, too noisy to decide (the rounds disagree)")
    assert "2.20x the default in the finalists' round and 1.30x confirming" in outcome.note
    # Within a factor of two of each other, the gains agree: the confirmation's is recorded.
    fake_machine(monkeypatch, (1 / 2.2 * 1e-3,), (1 / 1.7 * 1e-3,))
    outcome = Tuner(db, FAST, force=True).tune(make_op(), EX)
    assert not outcome.noisy and outcome.record.speedup == pytest.approx(1.7)


def test_too_noisy_lies_between_the_noise_floor_and_the_spread():
    default = _r("default", 1.0, 0.0)
    assert tuner_mod.too_noisy(_r("a", 0.95, 0.05), default)  # 5% > 2%, but 2 se = 10%
    assert not tuner_mod.too_noisy(_r("a", 0.99, 0.05), default)  # within the floor: the same
    assert not tuner_mod.too_noisy(_r("a", 0.85, 0.05), default)  # beyond both: it beats
    assert beats(_r("a", 0.85, 0.05), default)
    assert not tuner_mod.too_noisy(_r("a", 0.95, 0.005), default)  # a quiet round decides


def test_a_default_far_behind_is_weighed_in_the_confirmation_not_by_its_search_time(
    db, monkeypatch
):
    """The search timed the default at 3 ms and the rest at 1 ms, so the finalists' round
    leaves the default out; a load that slows that round to 4 ms a call must not make the
    default's 3 ms search time win: the confirmation times the two together."""
    asked = fake_machine(monkeypatch, (4e-3,), (1e-3,), firsts=(4e-3, 3e-3), search=(3e-3, 1e-3))
    outcome = Tuner(db, FAST).tune(make_op(), EX)
    assert len(asked) == 2  # the finalists' round, then the confirmation
    assert not outcome.record.kept_default
    assert outcome.record.speedup == pytest.approx(3.0)
    assert outcome.note.endswith("in the search, 3.00x confirming")
