"""The tuner: one Optuna study per (chip, op, problem).

Each candidate (a variant and its parameters) is first checked against the op's reference in
float64 on fresh random inputs, then timed. The default is timed in the same run; a candidate
wins only if it beats the default beyond noise, and candidates within noise of the fastest are
ranked by a fixed order (registration order of variants, then of their parameter values), so
two runs on one machine agree. The decision is made on a second measurement of the finalists
(the candidates close to the fastest, and the default) with their samples interleaved, so
drift of the machine during the search cannot decide; a winner is then timed against the
default once more, in a round of its own, and recorded only if it wins there too. Where the
machine is too noisy to decide, the outcome says so (``Outcome.noisy``) and the default is
kept, which is never worse than itself.
Small spaces are searched exhaustively, larger ones with TPE; the default, the previous winner
and each variant's first config go first.
"""

from __future__ import annotations

import math
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import optuna

from .. import __version__, dispatch
from ..check import expected, run_checked
from ..hardware import current_backend, detect_chip
from ..problem import EXACT, Problem, parse_dtype
from ..registry import Example, Op
from ..store.database import TuningDB, now
from ..store.leases import Lease, LeaseLost, Leases
from ..tuning_record import RecordError, TuningRecord, noise
from . import studies
from .timing import TARGET_SAMPLE_S, bench, bench_many, paired
from .warm import warm

# Finalists, timed again interleaved to decide: the FASTEST_FINALISTS fastest of the search,
# then the earliest in the fixed order within FINALIST of the fastest, MAX_FINALISTS in all
# (wide: on a busy machine the search times identical candidates far apart).
FINALIST = 4.0
FASTEST_FINALISTS = 4
MAX_FINALISTS = 8
# Candidates within this fraction of the fastest count as equally fast: the fixed order picks.
TIE = 0.05
# Samples per call at least in the finalists' round and in the confirmation, and in the one
# more try of a round whose spread hid a gain (the standard error halves with four times the
# samples).
ROUND_REPS = 15
NOISY_REPS = 60
# A confirmed gain (speedup - 1) and the one measured before it must agree within this factor:
# rounds further apart timed a machine that changed under them.
ROUNDS_AGREE = 2.0
# A winner must also be built and run a call at a time within this fraction of the default's
# time (the host's graph building counted, as a small call's model step pays it).
BUILD_TIE = 0.1
# A candidate slower than this many times the default is abandoned mid-measurement.
ABANDON_FACTOR = 100.0
# Where the space exceeds the trials, at most this many of them are drawn at random before TPE
# models the results (Optuna's own start for TPE).
RANDOM_TRIALS = 10
# A candidate that has not finished after this long is taken to hang.
CANDIDATE_TIMEOUT_S = 300.0
# The exit code of a tuning process that stopped on a hung candidate.
EXIT_HUNG = 3
# Reasons that keep a candidate rejected for its problem in later runs too.
HUNG = "hung"
CRASHED = "did not finish in an earlier run"


@dataclass(frozen=True)
class Budget:
    """How hard a preset tunes.

    Args:
        trials: most candidates measured per problem (all of them when the space is smaller).
        problem_s: wall-clock budget per problem.
        bench_s: timing budget per candidate.
        sample_s: how long one timed chain of calls runs (longer shares an evaluation's fixed
            cost over more calls).
    """

    trials: int
    problem_s: float
    bench_s: float
    sample_s: float = TARGET_SAMPLE_S


BUDGETS = {
    "quick": Budget(trials=8, problem_s=8.0, bench_s=0.04, sample_s=5e-3),
    "default": Budget(trials=20, problem_s=60.0, bench_s=0.1),
    "full": Budget(trials=64, problem_s=300.0, bench_s=0.4),
}


@dataclass(frozen=True)
class Candidate:
    variant: str
    params: tuple

    @classmethod
    def of(cls, variant: str, params: dict) -> Candidate:
        return cls(variant, tuple(sorted(params.items())))

    @property
    def param_dict(self) -> dict:
        return dict(self.params)

    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.variant}({inner})" if inner else self.variant


@dataclass
class Result:
    candidate: Candidate
    status: str
    reason: str = ""
    median_s: float | None = None
    spread_s: float | None = None
    error: float | None = None
    stderr_s: float = 0.0
    build_eval_s: float | None = None  # a call built and evaluated alone, in a round

    def trial(self, op: str, problem: str) -> dict:
        return {
            "op": op,
            "problem": problem,
            "variant": self.candidate.variant,
            "params": self.candidate.param_dict,
            "status": self.status,
            "reason": self.reason,
            "median_s": self.median_s,
            "error": self.error,
        }


@dataclass(frozen=True)
class Step:
    """Where one problem's search stands after a candidate: what a progress display shows.

    Args:
        done: candidates evaluated so far in this run (the default first).
        total: candidates the search evaluates at most (it may stop early, at the time per
            problem or when its suggestions keep missing).
        best: the fastest candidate that passed its check so far, the default included.
        default: the default's result (None until it is evaluated).
    """

    done: int
    total: int
    best: Result | None
    default: Result | None

    @property
    def speedup(self) -> float | None:
        """The default's search time over the best's, where both passed."""
        if self.best is None or self.default is None or self.default.status != "ok":
            return None
        return self.default.median_s / self.best.median_s


@dataclass
class Outcome:
    """What tuning one problem produced, and ``note``, how it was decided. ``noisy``: the
    machine was too noisy to decide, and ``record`` keeps the default. ``record`` is None
    when the problem was skipped or failed. ``held``: another worker sharing the database
    holds the problem's lease (it is tuning it, or took it over): ask again later."""

    op: str
    problem: str
    example: Example
    record: TuningRecord | None
    results: list[Result] = field(default_factory=list)
    note: str = ""
    noisy: bool = False
    held: bool = False


def _margins(a: Result, b: Result) -> tuple[float, float, float]:
    """How much faster ``a`` measured than ``b``, the noise floor (``record.noise`` of ``b``)
    and two standard errors of the difference of the medians, all in seconds."""
    floor = noise(b.median_s) * b.median_s
    return b.median_s - a.median_s, floor, 2.0 * math.hypot(a.stderr_s, b.stderr_s)


def beats(a: Result, b: Result) -> bool:
    """``a`` is faster than ``b`` beyond noise: by more than ``record.noise`` of ``b`` and by
    more than two standard errors of the difference of the medians."""
    gain, floor, spread = _margins(a, b)
    return gain > max(floor, spread)


def too_noisy(a: Result, b: Result) -> bool:
    """``a`` measured faster than ``b`` beyond the noise floor, but not beyond two standard
    errors: the spread of the rounds, not the calls, keeps it from deciding."""
    gain, floor, spread = _margins(a, b)
    return floor < gain <= spread


def _hidden(a: Result, b: Result) -> str:
    """Why a round cannot tell: ``a`` faster than ``b`` by more than the floor, not beyond the
    spread."""
    gain, _, spread = _margins(a, b)
    return (
        f"{a.candidate.label()} measured {gain / b.median_s:.0%} faster than the default, within "
        f"two standard errors of the spread of its rounds ({spread / b.median_s:.0%})"
    )


def _pick(candidates: list[Result], order: list[Candidate]) -> Result:
    """Among ``candidates``, the first in ``order`` of those within ``TIE`` (and two standard
    errors) of the fastest: candidates that close count as equally fast."""
    best = min(candidates, key=lambda r: r.median_s)
    tied = [
        r
        for r in candidates
        if r.median_s <= best.median_s * (1 + TIE) + 2.0 * math.hypot(r.stderr_s, best.stderr_s)
    ]
    rank = {c: i for i, c in enumerate(order)}
    return min(tied, key=lambda r: rank.get(r.candidate, math.inf))


def decide(results: list[Result], default: Result, order: list[Candidate]) -> Result:
    """The winner: the default unless something beats it beyond noise; among those that do,
    :func:`_pick`'s."""
    challengers = [r for r in results if r.status == "ok" and beats(r, default)]
    return _pick(challengers, order) if challengers else default


def _alive(reason: str) -> bool:
    """Whether the process that started a pending trial may still be running it. Asked while
    this process holds the problem's lease, which that one has lost: on this host its pid
    answers; on another it is taken for dead (a candidate that crashed a worker must not crash
    the one that takes its problem over)."""
    match = re.fullmatch(r"started by pid (\d+) on (.+)", reason)
    if not match or match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def candidates(op: Op, problem: Problem, backend: str) -> list[Candidate]:
    """Every configuration of every variant that runs here and supports the problem."""
    pdict = problem.as_dict()
    out = []
    for v in op.variants:
        if not v.available(backend):
            continue
        out.extend(Candidate.of(v.name, cfg) for cfg in v.configs() if v.allows(pdict, cfg))
    return out


def _choices(space: list[Candidate]) -> dict[str, dict[str, list]]:
    """Each variant's parameters and their values in ``space``, in order: the search's
    categorical distributions."""
    choices: dict[str, dict[str, list]] = {}
    for c in space:
        per = choices.setdefault(c.variant, {})
        for k, v in c.params:
            per.setdefault(k, [])
            if v not in per[k]:
                per[k].append(v)
    return choices


def _add_trials(study: optuna.Study, choices: dict, tried: list[Result]) -> None:
    """``tried`` as finished trials of ``study`` (a failed one where it was rejected, with the
    reason), over the categorical distributions ``choices``."""
    variant = optuna.distributions.CategoricalDistribution(list(choices))
    for r in tried:
        c = r.candidate
        params = {"variant": c.variant} | {f"{c.variant}.{k}": v for k, v in c.params}
        dists = {"variant": variant} | {
            f"{c.variant}.{k}": optuna.distributions.CategoricalDistribution(choices[c.variant][k])
            for k, _ in c.params
        }
        ok = r.status == "ok"
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                value=r.median_s if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
                user_attrs={} if ok else {"reason": r.reason},
            )
        )


class Tuner:
    """Tunes problems of ops into a database.

    Args:
        db: where records and trials go.
        budget: how hard to search.
        seed: seeds TPE and the timing inputs (check inputs are fresh each run).
        force: re-tune problems that already have a current record.
        candidate_timeout_s: a candidate that has not finished (built, checked and timed)
            after this long is recorded as hung and the process exits with ``EXIT_HUNG``.
        on_candidate: called with a :class:`Step` after each candidate evaluated (a progress
            display; the tuner itself shows nothing).
        leases: this worker's leases in ``db`` (default: a new worker id, the default lease).
    """

    def __init__(
        self,
        db: TuningDB,
        budget: Budget,
        *,
        seed: int = 0,
        force: bool = False,
        candidate_timeout_s: float = CANDIDATE_TIMEOUT_S,
        on_candidate: Callable[[Step], None] | None = None,
        leases: Leases | None = None,
    ):
        self.db = db
        self.leases = leases or Leases(db)
        self._storage: optuna.storages.RDBStorage | None = None  # made by the first TPE search
        self.on_candidate = on_candidate
        self.candidate_timeout_s = candidate_timeout_s
        self.budget = budget
        self.seed = seed
        self.force = force
        self.backend = current_backend()
        self.chip = detect_chip(self.backend)
        self._fresh = int(time.time_ns() % 2**31)
        self._warmed: set[tuple] = set()

    def tune(self, op: Op, example: Example, *, force: bool | None = None) -> Outcome:
        """Tune one problem of ``op`` given by ``example``, holding the problem's lease while
        it is tuned: other workers sharing the database leave it alone meanwhile.

        Args:
            op: the op.
            example: the problem: shapes, dtype and options.
            force: re-tune a problem that has a current record (default: the tuner's).
        """
        args = op.example(
            example.shapes,
            parse_dtype(example.dtype),
            mx.random.key(self.seed),
            **dict(example.options),
        )
        problem = op.problem(*args)
        pkey = problem.key
        previous = self._previous(op, problem)
        force = self.force if force is None else force
        if previous is not None and not force and previous.stale(op) is None:
            return Outcome(op.name, pkey, example, None, note="already tuned")
        lease = self.leases.claim(self.chip.slug, op.name, pkey)
        if lease is None:
            holder = self.leases.holder(self.chip.slug, op.name, pkey) or "another worker"
            return Outcome(op.name, pkey, example, None, note=f"held by {holder}", held=True)
        with lease:
            # Another worker may have finished it between the look above and the claim.
            if self._previous(op, problem) != previous:
                return Outcome(op.name, pkey, example, None, note="already tuned")
            try:
                return self._tune(op, example, args, problem, previous, lease)
            except LeaseLost:
                note = "its lease expired and another worker took it over"
                return Outcome(op.name, pkey, example, None, note=note, held=True)

    def _tune(
        self,
        op: Op,
        example: Example,
        args: tuple,
        problem: Problem,
        previous: TuningRecord | None,
        lease: Lease,
    ) -> Outcome:
        """Tune a problem whose lease this worker holds (``args``: its timing inputs)."""
        dtype = parse_dtype(example.dtype)
        options = dict(example.options)
        pkey = problem.key
        order = candidates(op, problem, self.backend)
        default = Candidate.of(*op.default(problem, self.backend))
        results: dict[Candidate, Result] = self._unfinished(op, pkey)
        order = [c for c in order if c not in results or c == default]
        first = [default]
        if previous is not None:
            prev = Candidate.of(previous.variant, previous.params)
            if prev in order and prev != default:
                first.append(prev)
        # Each variant's own default (its first allowed config in the fixed order) is timed
        # whatever the search samples, as Triton times every config it is given.
        heads: dict[str, Candidate] = {}
        for c in order:
            heads.setdefault(c.variant, c)
        first += [c for c in heads.values() if c not in first]
        rest = [c for c in order if c not in first]
        drawn = self._drawn(first, rest)
        if self.backend == "cuda":
            every = len(first) + len(rest) <= self.budget.trials
            self._warm(op, problem, order if every else first + drawn)

        self._fresh += 1
        check_args = op.example(example.shapes, dtype, mx.random.key(self._fresh), **options)
        check = (check_args, expected(op, check_args), problem.dtype)
        results.pop(default, None)  # the default is always measured
        # What _search evaluates at most: every one of ``first``, then the trials left.
        total = len(first) + min(len(rest), max(0, self.budget.trials - len(first)))
        done = 0

        def evaluate(c: Candidate) -> Result:
            nonlocal done
            if lease.lost:  # the heartbeat found it taken over: the rest is the taker's
                raise LeaseLost(f"[lease] {pkey}: taken over by another worker")
            if c not in results:
                limit = None
                if c != default and results[default].status == "ok":
                    limit = ABANDON_FACTOR * results[default].median_s
                results[c] = self._recorded(
                    op, pkey, c, lambda: self._evaluate(op, c, args, check, limit)
                )
                done += 1
                if self.on_candidate is not None:
                    ok = [r for r in results.values() if r.status == "ok"]
                    best = min(ok, key=lambda r: r.median_s) if ok else None
                    self.on_candidate(Step(done, total, best, results.get(default)))
            return results[c]

        if evaluate(default).status != "ok":
            r = results[default]
            return Outcome(
                op.name,
                pkey,
                example,
                None,
                list(results.values()),
                note=f"the default failed its check: {r.reason}",
            )
        self._search(first, drawn, rest, evaluate, studies.study_name(self.chip.slug, pkey))

        winner, base, note, noisy = self._decide(
            op, list(results.values()), results[default], [default, *order], args
        )
        record = TuningRecord(
            chip=self.chip.slug,
            op=op.name,
            problem=pkey,
            variant=winner.candidate.variant,
            params=winner.candidate.param_dict,
            median_s=winner.median_s,
            spread_s=winner.spread_s,
            default_variant=default.variant,
            default_params=default.param_dict,
            default_median_s=base.median_s,
            error=winner.error,
            mlx_version=mx.__version__,
            package_version=__version__,
            source_hash=op.variant(winner.candidate.variant).source_hash,
            created_at=now(),
        )
        self.db.put(record, fence=lease.fence)
        dispatch.reset()
        return Outcome(
            op.name, pkey, example, record, list(results.values()), note=note, noisy=noisy
        )

    def _drawn(self, first: list[Candidate], rest: list[Candidate]) -> list[Candidate]:
        """Where the space exceeds the trials, the search's random phase (TPE's start, up to
        ``RANDOM_TRIALS`` of the trials left), drawn ahead so that it compiles in parallel;
        none where every candidate is tried."""
        left = self.budget.trials - len(first)
        if len(rest) <= left:
            return []
        return random.Random(self.seed).sample(rest, max(0, min(left, RANDOM_TRIALS)))

    def _warm(self, op: Op, problem: Problem, planned: list[Candidate]) -> None:
        """Compile the candidates the search is sure to run, in parallel, where the back-end
        keeps compiled kernels on disk (CUDA); kernels are specialized on dtype and exact dims,
        so once per such group. What TPE picks later compiles as it runs, rather than a whole
        space of hundreds of which it measures a few."""
        group = (
            op.name,
            problem.dtype,
            tuple(v for d, v in zip(op.dims, problem.values) if d.kind == EXACT),
        )
        fresh = [c for c in planned if (group, c) not in self._warmed]
        self._warmed.update((group, c) for c in fresh)
        warm(op, problem, fresh)

    def _unfinished(self, op: Op, pkey: str) -> dict[Candidate, Result]:
        """Candidates that hung or crashed in an earlier run, rejected rather than run again:
        trials recorded as hung, and trials still pending (their process died in them)."""
        out = {}
        for t in self.db.trials(chip=self.chip.slug, op=op.name):
            if t["problem"] != pkey:
                continue
            c = Candidate.of(t["variant"], t["params"])
            if t["status"] == "pending":
                if _alive(t["reason"]):
                    continue  # another tuning process is measuring it right now
                out[c] = Result(c, "rejected", f"{CRASHED}: process died in it (crash or kill)")
                self.db.finish_trial(t["id"], out[c].trial(op.name, pkey))
            elif t["status"] == "rejected" and t["reason"].startswith((HUNG, CRASHED)):
                out[c] = Result(c, "rejected", t["reason"])
        return out

    def _recorded(self, op: Op, pkey: str, c: Candidate, run: Callable[[], Result]) -> Result:
        """Run one candidate's evaluation with its trial stored as pending first, and a
        watchdog that records a hang and ends the process (a hung call cannot be stopped)."""
        pending = Result(c, "pending", f"started by pid {os.getpid()} on {socket.gethostname()}")
        trial_id = self.db.add_trial(self.chip.slug, pending.trial(op.name, pkey))

        def hung() -> None:
            reason = f"{HUNG}: no result after {self.candidate_timeout_s:g} s"
            self.db.finish_trial(trial_id, Result(c, "rejected", reason).trial(op.name, pkey))
            print(
                f"mlxp-tune: {op.name} {pkey} {c.label()} {reason}; it is recorded as "
                "rejected, run again to continue",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_HUNG)

        watchdog = threading.Timer(self.candidate_timeout_s, hung)
        watchdog.daemon = True
        watchdog.start()
        try:
            result = run()
        except KeyboardInterrupt:
            # Stopped by the user, not by the candidate: the next run tries it again.
            interrupted = Result(c, "rejected", "interrupted by the user")
            self.db.finish_trial(trial_id, interrupted.trial(op.name, pkey))
            raise
        finally:
            watchdog.cancel()
        self.db.finish_trial(trial_id, result.trial(op.name, pkey))
        return result

    def _decide(self, op: Op, results: list[Result], default: Result, order, args):
        """The winner, confirmed: the finalists' choice is timed once more against the default
        alone, in a round of its own, and must beat it again, by a gain within a factor
        ``ROUNDS_AGREE`` of the finalists' round's, and must not be slower beyond ``BUILD_TIE``
        built and evaluated a call at a time. Returns (winner, default, note, noisy), the
        two as last timed. ``noisy`` where the machine was too noisy to decide (a round whose
        spread hides the answer even with more samples, or rounds that disagree): the default
        is kept, and ``note`` says why."""
        winner, base, note = self._final(op, results, default, order, args)
        if winner is base:
            return base, base, note or "the default kept: nothing beat it beyond noise", bool(note)
        # A default far behind was left out of the finalists' round: its search time is all.
        before = "search" if base is default else "finalists' round"
        first = base.median_s / winner.median_s
        for reps in (ROUND_REPS, NOISY_REPS):
            d, w = self._round(op, [default, winner], args, reps)
            if not too_noisy(w, d):
                break
        else:
            return (
                d,
                d,
                f"the default kept, too noisy to decide (confirming): {_hidden(w, d)}",
                True,
            )
        then = d.median_s / w.median_s
        if not beats(w, d):
            return (
                d,
                d,
                f"the default kept: {winner.candidate.label()} was {first:.2f}x in the "
                f"{before} but {then:.2f}x confirming",
                False,
            )
        if w.build_eval_s > (1 + BUILD_TIE) * d.build_eval_s:
            # A model's step waits on the host where its calls are small: what wins on the
            # device alone but loses a call built and run at a time would slow it down.
            return (
                d,
                d,
                f"the default kept: {winner.candidate.label()} was {then:.2f}x chained but "
                f"{d.build_eval_s / w.build_eval_s:.2f}x a call built and run at a time",
                False,
            )
        # A search time is one measurement, far less sure than a round's: only rounds compare.
        if base is not default and max(first, then) - 1 > ROUNDS_AGREE * (min(first, then) - 1):
            return (
                d,
                d,
                "the default kept, too noisy to decide (the rounds disagree): "
                f"{winner.candidate.label()} was {first:.2f}x the default in the {before} and "
                f"{then:.2f}x confirming",
                True,
            )
        return w, d, f"{first:.2f}x in the {before}, {then:.2f}x confirming", False

    def _final(self, op: Op, results: list[Result], default: Result, order, args):
        """Time the finalists (the fastest few, the earliest close ones, and the default) again
        with their samples interleaved, so drift of the machine between the search's
        measurements cannot decide, and pick the winner from these; returns (winner, default,
        note). Where none beats the default but the round's spread hides whether one would
        (:func:`too_noisy`), the round is timed once more with more samples; if that cannot
        tell either, the default is kept and ``note`` says so."""
        ok = [r for r in results if r.status == "ok" and r is not default]
        if not ok:
            return default, default, ""
        by_speed = sorted(ok, key=lambda r: r.median_s)
        rank = {c: i for i, c in enumerate(order)}
        # The search's one-off measurements can be off by tens of percent or more (a candidate
        # timed just after a slow one runs slow; the machine drifts), so besides the fastest
        # few, the earliest in the fixed order within FINALIST of the fastest go on: which of
        # several equal candidates makes the cut must not depend on noise.
        near = [r for r in ok if r.median_s <= by_speed[0].median_s * (1 + FINALIST)]
        close = by_speed[:FASTEST_FINALISTS]
        close += [
            r
            for r in sorted(near, key=lambda r: rank.get(r.candidate, math.inf))
            if all(r is not c for c in close)
        ]
        fastest = by_speed[0]
        # A default far behind is beaten anyway, and its long samples would only disturb
        # the race between the close ones.
        far = default.median_s > 2 * fastest.median_s
        finalists = close[:MAX_FINALISTS] if far else [default, *close[: MAX_FINALISTS - 1]]
        if len(finalists) < 2:
            return finalists[0], default, ""
        if far:
            # The default is weighed in the confirmation, in a round with the winner, not
            # against its search time, which a load on the machine since can make look fast.
            return _pick(self._round(op, finalists, args, ROUND_REPS), order), default, ""
        for reps in (ROUND_REPS, NOISY_REPS):
            again = self._round(op, finalists, args, reps)
            base = again[0]
            winner = decide(again, base, order)
            # The one at stake where none beats the default: the one the rule would pick, not
            # the fastest, which of several equal candidates is the one noise favoured most.
            stake = _pick(again[1:], order)
            if winner is not base or not too_noisy(stake, base):
                return winner, base, ""
        note = (
            f"the default kept, too noisy to decide (the finalists' round): {_hidden(stake, base)}"
        )
        return base, base, note

    def _round(self, op: Op, finalists: list[Result], args, reps: int) -> list[Result]:
        """``finalists`` timed again together, in a round of their own (:func:`bench_many`,
        at least ``reps`` samples each), each through its per-round ratio to the first
        (:func:`paired`)."""
        calls = [
            (op.variant(r.candidate.variant).build(**r.candidate.param_dict), args, {})
            for r in finalists
        ]
        timed = paired(
            bench_many(
                calls,
                budget_s=max(self.budget.bench_s, 0.05),
                min_reps=reps,
                target_sample_s=self.budget.sample_s,
                feed=op.feed,
            )
        )
        return [
            Result(
                r.candidate, "ok", "", t.median_s, t.spread_s, r.error, t.stderr_s, t.build_eval_s
            )  # fmt: skip
            for r, t in zip(finalists, timed)
        ]

    def _previous(self, op: Op, problem: Problem) -> TuningRecord | None:
        """This problem's record, if there is one that fits the op (another is replaced)."""
        for rec in self.db.records(chip=self.chip.slug, op=op.name):
            if rec.problem == problem.key:
                try:
                    rec.problem_of(op)
                except RecordError:
                    return None
                return rec
        return None

    def _search(
        self,
        first: list[Candidate],
        drawn: list[Candidate],
        rest: list[Candidate],
        evaluate: Callable[[Candidate], Result],
        study: str,
    ) -> None:
        """Evaluate ``first``, then every one of ``rest`` where the trials allow, else the
        ``drawn`` ones (of ``rest``) and TPE's picks from ``rest``, which start from them."""
        deadline = time.perf_counter() + self.budget.problem_s
        for c in first:
            evaluate(c)
        remaining = self.budget.trials - len(first)
        if remaining <= 0:
            return
        tried = list(first)
        for c in drawn or rest:
            if time.perf_counter() > deadline:
                break
            evaluate(c)
            tried.append(c)
        if drawn and remaining > len(drawn):
            start = [evaluate(c) for c in tried[len(first) :]]
            self._tpe(rest, remaining - len(drawn), deadline, evaluate, study, start)
        else:
            self._tried_study(first + rest, [evaluate(c) for c in tried], study)

    def _study(self, name: str) -> optuna.Study:
        """The Optuna study ``name`` of the tuning database, emptied (:mod:`.studies`)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self._storage is None:
            self._storage = studies.storage(self.db.url)
        sampler = optuna.samplers.TPESampler(seed=self.seed)
        return studies.fresh_study(self._storage, name, sampler)

    def _tried_study(self, space: list[Candidate], tried: list[Result], name: str) -> None:
        """A search that tried every candidate, as the Optuna study ``name``: one finished
        trial per candidate (a failed one where it was rejected, with the reason), so that
        ``optuna-dashboard`` shows it as it shows a TPE search."""
        _add_trials(self._study(name), _choices(space), tried)

    def _tpe(
        self,
        space: list[Candidate],
        n: int,
        deadline: float,
        evaluate: Callable[[Candidate], Result],
        name: str,
        tried: list[Result] = (),
    ) -> None:
        """``n`` new candidates picked by TPE over the variant and its conditional parameters,
        limited to ``space``, in the Optuna study ``name`` of the tuning database
        (:mod:`.studies`), which starts with the results ``tried`` (candidates of ``space``)."""
        allowed = set(space)
        known = {r.candidate for r in tried}
        choices = _choices(space)
        seen: set[Candidate] = set()

        def objective(trial: optuna.Trial) -> float:
            name = trial.suggest_categorical("variant", list(choices))
            params = {
                k: trial.suggest_categorical(f"{name}.{k}", vals)
                for k, vals in choices[name].items()
            }
            c = Candidate.of(name, params)
            if c not in allowed:
                raise optuna.TrialPruned()
            if c not in known:
                seen.add(c)
            r = evaluate(c)  # one tried before is not measured again
            return r.median_s if r.status == "ok" else math.inf

        study = self._study(name)
        _add_trials(study, choices, tried)
        # Suggestions may repeat or fall outside the space: stop on new evaluations, the
        # deadline, or when suggestions keep missing.
        for _ in range(8 * n):
            if len(seen) >= n or time.perf_counter() > deadline:
                break
            study.optimize(objective, n_trials=1)

    def _evaluate(self, op: Op, c: Candidate, args, check, limit_s) -> Result:
        check_args, want, dtype = check
        variant = op.variant(c.variant)

        def candidate(*a):  # built inside the check: a build that fails is a rejection
            return variant.build(**c.param_dict)(*a)

        verdict = run_checked(op, candidate, check_args, dtype, want)
        if not verdict.ok:
            error = verdict.error if math.isfinite(verdict.error) else None
            return Result(c, "rejected", verdict.reason[:500], error=error)
        fn = variant.build(**c.param_dict)
        try:
            t = bench(
                fn,
                args,
                budget_s=self.budget.bench_s,
                limit_s=limit_s,
                target_sample_s=self.budget.sample_s,
                feed=op.feed,
            )
        except TimeoutError as e:
            return Result(c, "rejected", f"too slow: {e}", error=verdict.error)
        except Exception as e:
            return Result(c, "rejected", f"{type(e).__name__} while timing: {str(e)[:500]}")
        return Result(c, "ok", "", t.median_s, t.spread_s, verdict.error, t.stderr_s)
