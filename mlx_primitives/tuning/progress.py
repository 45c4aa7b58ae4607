"""A tuning run's progress on stderr.

On a terminal: rich's live display, one bar over the problems (with the time left of
``--time-budget``) and one over the candidates of the problem being tuned (with the best so
far). Elsewhere (a log, a pipe): plain lines, one per finished problem and one every
``LINE_EVERY`` candidates, so that a log is never silent for long.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from .tuner import Step

# Without a terminal, a line every this many candidates of a problem.
LINE_EVERY = 10


def _left(deadline: float | None) -> str:
    """The time left of ``--time-budget`` (a ``time.perf_counter()`` deadline), in words."""
    if deadline is None:
        return ""
    left = deadline - time.perf_counter()
    if left <= 0:
        return "time budget spent: no new problem starts"
    minutes, seconds = divmod(int(left), 60)
    return f"{minutes}:{seconds:02d} left of the time budget"


def _best(step: Step) -> str:
    """The best candidate so far, with its time and its speedup over the default."""
    if step.best is None:
        return "none passed yet"
    text = f"best {step.best.candidate.label()} {step.best.median_s * 1e6:.3g} us"
    if step.best is step.default:
        return text + " (the default)"
    return text if step.speedup is None else f"{text} ({step.speedup:.2f}x)"


class _Count(ProgressColumn):
    """Done of planned, with the unit (before the first candidate, how many is not known)."""

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{task.total:g}"
        return Text(f"{task.completed:g}/{total} {task.fields['unit']}")


class _Note(ProgressColumn):
    """A task's note; on the problems' bar, the time left, counted down as it is drawn."""

    def __init__(self, deadline: float | None):
        super().__init__()
        self.deadline = deadline

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "problems":
            return Text(_left(self.deadline))
        return Text(task.fields.get("note", ""))


class TuneProgress:
    """The progress of tuning ``total`` problems, shown on ``console`` (stderr).

    Use it as a context manager; call :meth:`start` when a problem begins, :meth:`candidate`
    after each of its candidates (the tuner's ``on_candidate`` hook) and :meth:`finish` when
    it ends or is skipped.

    Args:
        total: the problems of the run.
        console: where a terminal display goes; when it is not a terminal, plain lines go to
            ``sys.stderr`` instead.
        transient: remove the terminal display when the run ends.
        deadline: the ``time.perf_counter()`` after which no problem starts (``--time-budget``).
    """

    def __init__(
        self, total: int, console: Console, *, transient: bool, deadline: float | None = None
    ):
        self.total, self.done = total, 0
        self.deadline = deadline
        self.what = ""
        self.bar = None
        if console.is_terminal:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                _Count(),
                TimeElapsedColumn(),
                _Note(deadline),
            )
            self.bar = Progress(*columns, console=console, transient=transient)

    def __enter__(self) -> TuneProgress:
        if self.bar is not None:
            self.bar.__enter__()
            self.problems = self.bar.add_task("tuning", total=self.total, unit="problems")
            self.candidates = self.bar.add_task("", total=None, unit="candidates", visible=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, what: str) -> None:
        """A problem (``what``, as a person reads it) begins."""
        self.what = what
        if self.bar is not None:
            self.bar.reset(
                self.candidates, total=None, description=what, visible=True, unit="candidates"
            )

    def candidate(self, step: Step) -> None:
        """The current problem has evaluated another candidate."""
        if self.bar is not None:
            self.bar.update(
                self.candidates, completed=step.done, total=step.total, note=_best(step)
            )
        elif step.done % LINE_EVERY == 0:
            left = _left(self.deadline)
            print(
                f"  {self.what}: {step.done}/{step.total} candidates, {_best(step)}"
                + (f", {left}" if left else ""),
                file=sys.stderr,
                flush=True,
            )

    def finish(self, what: str, result: str) -> None:
        """A problem ended (or was skipped) with ``result``, a line of text."""
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.problems)
            self.bar.update(self.candidates, visible=False)
        else:
            print(f"[{self.done}/{self.total}] {what}: {result}", file=sys.stderr, flush=True)
