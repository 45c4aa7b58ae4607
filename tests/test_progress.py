"""The tuning run's progress: the tuner's per-candidate hook, the live display on a terminal
and the plain lines elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from mlx_primitives.registry import Example
from mlx_primitives.tuning import progress as progress_mod
from mlx_primitives.tuning.progress import TuneProgress
from mlx_primitives.tuning.tuner import Budget, Candidate, Result, Step, Tuner

from .toy import make_op

EX = Example(((64, 256),), "float32")


def _step(done: int, total: int = 20) -> Step:
    default = Result(Candidate.of("builtin", {}), "ok", median_s=40e-6)
    best = Result(Candidate.of("row", {"block": 256}), "ok", median_s=20e-6)
    return Step(done, total, best, default)


def test_the_tuner_reports_each_candidate(db):
    steps: list[Step] = []
    outcome = Tuner(db, Budget(trials=6, problem_s=60, bench_s=0.01), on_candidate=steps.append)
    outcome = outcome.tune(make_op(), EX)
    assert outcome.record is not None
    assert [s.done for s in steps] == list(range(1, len(steps) + 1))
    assert len(steps) <= steps[0].total and len({s.total for s in steps}) == 1
    first = steps[0]  # the default, alone so far: the best, 1x
    assert first.best is first.default and first.speedup == 1.0
    # The best so far is the fastest of those that passed, never slower than before.
    times = [s.best.median_s for s in steps]
    assert times == sorted(times, reverse=True)


def test_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_EVERY", 2)
    console = Console(file=io.StringIO(), force_terminal=False)
    with TuneProgress(2, console, transient=False, deadline=None) as p:
        p.start("rms_norm 8x64 float32")
        for done in (1, 2, 3, 4):
            p.candidate(_step(done, total=4))
        p.finish("rms_norm 8x64 float32", "row 2.00x")
        p.finish("rms_norm 16x64 float32", "not started: --time-budget ran out")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "  rms_norm 8x64 float32: 2/4 candidates, best row(block=256) 20 us (2.00x)",
        "  rms_norm 8x64 float32: 4/4 candidates, best row(block=256) 20 us (2.00x)",
        "[1/2] rms_norm 8x64 float32: row 2.00x",
        "[2/2] rms_norm 16x64 float32: not started: --time-budget ran out",
    ]
    assert console.file.getvalue() == ""


def test_live_fields_on_a_terminal(capsys):
    """The problem, candidates done of planned, the best so far and the time left show while
    a problem is tuned; nothing goes to plain stderr."""
    import time

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    deadline = time.perf_counter() + 125
    with TuneProgress(3, console, transient=False, deadline=deadline) as p:
        p.start("layer_norm 16384x4096 float16")
        p.candidate(_step(7, total=20))
        p.bar.refresh()
        shown = out.getvalue()
        p.finish("layer_norm 16384x4096 float16", "row 2.00x")
    assert "layer_norm 16384x4096 float16" in shown
    assert "7/20 candidates" in shown and "0/3 problems" in shown
    assert "best row(block=256) 20 us (2.00x)" in shown
    assert "2:0" in shown and "left of the time budget" in shown
    assert "1/3 problems" in out.getvalue()
    assert capsys.readouterr().err == ""


def test_time_budget_spent_is_said():
    assert "spent" in progress_mod._left(0.0)
    assert progress_mod._left(None) == ""
