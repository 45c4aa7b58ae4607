"""The figure of ``mlxp-tune report`` for one op, drawn with matplotlib (the ``report`` extra)
on its Agg canvas: one row per problem, the problems named once on the left; on the left panel
the time per call of the default and of the chosen variant, on the right the speedup over the
default coloured by the winning variant.

The figure comes with the entries it draws, in row order: the marks of row ``i`` have the SVG
ids ``default-i`` and ``chosen-i`` (left panel; rows served by the nearest rule have none) and
``bar-i`` (right panel), so that a reader of the page (the browser test) can find each mark
and compare it with the numbers.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .report_data import SOURCES, Entry, OpReport, without_op

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KEPT = "#b8b8b8"  # a problem where the default was kept
STALE_ALPHA = 0.3  # a stale record's marks are faded (and its bar hatched)
INK = "#333333"
# tab10: a colour per variant of an op, in its registration order.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


class MissingExtra(RuntimeError):
    """The report's plotting library is not installed."""


def _figure(rows: int) -> Figure:
    """An empty figure on the Agg canvas (no pyplot: no global state, no display), tall enough
    for ``rows`` problems."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra(
            "[mlxp-tune] the report draws with matplotlib: pip install 'mlx-primitives[report]'"
        ) from None
    fig = Figure(figsize=(12.5, 1.5 + 0.22 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _tick(report: OpReport, entry: Entry) -> str:
    stale = ", stale" if entry.stale else ""
    return f"{report.label(entry)} [{SOURCES[entry.source]}{stale}]"


def _latency(ax: Axes, entries: list[Entry], color) -> None:
    """The default's time (open) and the chosen variant's (filled) per row, log scale."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    # Plain microseconds at 1, 2 and 5 of each decade: a log axis's 10^n labels read badly.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title("time per call (us, log scale)", fontsize=8, loc="left")
    for i, e in enumerate(entries):
        rec = e.record
        if not e.measured:
            ax.annotate(
                f"nearest rule: the record of {without_op(rec.problem)}",
                (0.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=6,
                color="#777777", style="italic",
            )  # fmt: skip
            continue
        default_us, chosen_us = rec.default_median_s * 1e6, rec.median_s * 1e6
        ax.plot([default_us, chosen_us], [i, i], color="#999999", lw=0.8)
        marks = {"default": (default_us, "white"), "chosen": (chosen_us, color(e))}
        for name, (x, fill) in marks.items():
            ax.plot(
                [x], [i], marker="o", linestyle="none", markersize=5, markerfacecolor=fill,
                markeredgecolor=INK, gid=f"{name}-{i}",
            )  # fmt: skip


def _speedup(ax: Axes, entries: list[Entry], color) -> None:
    """The speedup per row (linear, from 0), with a whisker down to ``speedup_low``; rows of
    the nearest rule hollow (the serving record's speedup, measured at its own problem),
    stale records faded and hatched."""
    ax.set_title("speedup over the default", fontsize=8, loc="left")
    top = max([e.record.speedup for e in entries if e.record.median_s > 0] + [1.0])
    for i, e in enumerate(entries):
        rec, fill = e.record, color(e)
        value = rec.speedup if rec.median_s > 0 else top
        (bar,) = ax.barh(
            [i],
            [value],
            height=0.7,
            color=fill if e.measured else "none",
            edgecolor=INK if e.measured else fill,
            linestyle="-" if e.measured else "--",
            linewidth=0.8 if e.measured else 1.2,
            hatch="xxx" if e.stale else None,
        )
        bar.set_gid(f"bar-{i}")
        if not rec.kept_default and rec.speedup_low < value:
            ax.plot([rec.speedup_low, value], [i, i], color=INK, lw=1.0)
        ax.text(value, i, f" {value:.2f}x", va="center", fontsize=6.5, color=INK)
    ax.axvline(1.0, color=INK, lw=0.8, linestyle=":")
    ax.set_xlim(0, top * 1.15)


def _legend(fig: Figure, entries: list[Entry], palette: dict[str, str]) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], marker="o", linestyle="none", markerfacecolor="white",
               markeredgecolor=INK, label="the default's time"),
    ]  # fmt: skip
    won = dict.fromkeys(e.record.variant for e in entries if not e.record.kept_default)
    handles += [Patch(facecolor=palette[v], edgecolor=INK, label=f"{v} wins") for v in won]
    if any(e.record.kept_default for e in entries):
        handles.append(Patch(facecolor=KEPT, edgecolor=INK, label="default kept"))
    if not all(e.measured for e in entries):
        handles.append(Patch(facecolor="none", edgecolor=INK, linestyle="--", label="nearest"))
    if any(e.stale for e in entries):
        stale = to_rgba(KEPT, STALE_ALPHA)
        handles.append(Patch(facecolor=stale, edgecolor=INK, hatch="xxx", label="stale"))
    fig.legend(
        handles=handles, loc="outside upper right", ncols=len(handles), fontsize=7,
        frameon=False,
    )  # fmt: skip


def draw(report: OpReport) -> tuple[Figure, list[Entry]]:
    """The op's figure and the entries of its rows, top to bottom."""
    entries = list(report.entries)
    palette = {v.name: PALETTE[i % len(PALETTE)] for i, v in enumerate(report.op.variants)}

    def color(e: Entry):
        from matplotlib.colors import to_rgba

        base = KEPT if e.record.kept_default else palette[e.record.variant]
        return to_rgba(base, STALE_ALPHA) if e.stale else base

    fig = _figure(len(entries))
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(1, 1))
    left.set_yticks(range(len(entries)), [_tick(report, e) for e in entries], fontsize=7)
    left.set_ylim(len(entries) - 0.5, -0.5)  # the first problem at the top
    for ax in (left, right):
        ax.tick_params(axis="both", labelsize=7)
        ax.grid(axis="x", color="#e4e4e4", linewidth=0.6)
        ax.set_axisbelow(True)
    _latency(left, entries, color)
    _speedup(right, entries, color)
    fig.suptitle(f"{report.op.name} on {report.chip}", fontsize=9, x=0.01, ha="left")
    _legend(fig, entries, palette)
    return fig, entries


def svg(fig: Figure, prefix: str) -> str:
    """The figure as an inline ``<svg>`` element whose ids (and references to them) start with
    ``prefix-``, so that several figures live in one page; its text as text (the page's
    fonts), fixed ids and no date, so that the same records give the same page."""
    from matplotlib import rc_context

    out = io.StringIO()
    with rc_context({"svg.hashsalt": "mlx-primitives", "svg.fonttype": "none"}):
        fig.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', text)
    return re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)


def png(fig: Figure, path: Path) -> None:
    """The figure as a PNG image at ``path``."""
    fig.savefig(path, format="png", dpi=110)
