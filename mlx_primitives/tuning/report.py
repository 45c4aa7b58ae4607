"""``mlxp-tune report``: the tuning records of a chip (or all) as one self-contained HTML page.

A summary table; then per op a figure (:mod:`.report_figures`: the time per call of the
default and of the chosen variant at each problem, and the speedup coloured by the winning
variant, with the default kept, the source and stale records marked) and a table of the
records. The figures are inline SVG (no script, no file beside the page); the numbers each one
draws are embedded next to it as JSON (``<script type="application/json" class="plot-data">``),
and every number of a table cell in its ``data-value``, so that a program can check the page
against the database.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import mlx.core as mx

from .. import __version__
from ..registry import Op
from ..store import exists, shipped
from ..store.database import TuningDB, shown_url
from . import report_figures as figures
from .report_data import SOURCES, Entry, OpReport, op_report, summary, without_op

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1500px;
       padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin: 28px 0 4px; }
.meta, .shared, .untuned, .how { color: #555; font-size: 13px; margin: 4px 0; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
td { overflow-wrap: break-word; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { white-space: nowrap; }
tr.stale td { color: #a33; }
figure { margin: 0; } figure svg { width: 100%; height: auto; display: block; }
"""

_HOW = (
    "Speedup: the default's time over the chosen variant's, measured in the same run; the "
    "whisker reaches down to the speedup at the winner's slow end (speedup_low). Grey: the "
    "tuner kept the default. Sources: <b>user</b>, your runs (the user database); "
    "<b>shipped</b>, the pretuned file of the chip; <b>nearest</b>, a problem of the default "
    "preset or recorded with mp.record that has no record of its own and that the nearest rule "
    "serves with the record of another problem (drawn hollow, at that record's speedup). "
    "<b>Stale</b> (faded and hatched; red in the tables): tuned with another MLX series or "
    "other kernel sources; dispatch ignores it until mlxp-tune runs again."
)


def collect(url: str, chip: str, ops: list[Op]) -> list[OpReport]:
    """The report's sections: per chip (``chip``, or with ``all`` every chip of the user
    database at ``url`` and of the shipped files) and op, those with a record or a problem
    the nearest rule serves. Dispatch's records are read from ``MLXP_TUNING_DB``, which the
    caller sets to ``url``."""
    db = TuningDB(url, create=False) if exists(url) else None
    try:
        chips = [chip]
        if chip == "all":
            users = {r.chip for r in db.records()} if db is not None else set()
            chips = sorted(set(shipped.chips()) | users)
        out = []
        for slug in chips:
            hits = db.hits(slug) if db is not None else []
            for op in ops:
                recorded = [h["problem"] for h in hits if h["op"] == op.name]
                section = op_report(op, slug, recorded)
                if section.entries:
                    out.append(section)
        return out
    finally:
        if db is not None:
            db.close()


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _td(text: str, value=None, num: bool = False, nowrap: bool = False) -> str:
    attrs = ' class="num"' if num else (' class="name"' if nowrap else "")
    if value is not None:
        attrs += f' data-value="{html.escape(json.dumps(value), quote=True)}"'
    return f"<td{attrs}>{html.escape(text)}</td>"


def _variant(entry: Entry) -> str:
    rec = entry.record
    params = " ".join(f"{k}={v}" for k, v in sorted(rec.params.items()))
    text = f"{rec.variant} {params}".strip()
    return f"{text} (the default, kept)" if rec.kept_default else text


def _records_table(section: OpReport) -> str:
    head = (
        "problem", "source", "variant", "time", "default's time", "speedup", "at least",
        "stale", "nearest: the record of",
    )  # fmt: skip
    rows = []
    for e in section.entries:
        d = e.to_dict()
        low = "-" if e.record.kept_default else _fmt_x(d["speedup_low"])
        rows.append(
            f'<tr class="{"stale" if e.stale else "ok"}" data-problem="{html.escape(d["problem"])}"'
            f' data-source="{e.source}">'
            + _td(section.label(e))
            + _td(SOURCES[e.source], nowrap=True)
            + _td(_variant(e), {"variant": d["variant"], "params": d["params"]})
            + _td(_fmt_time(d["median_s"]), d["median_s"], num=True)
            + _td(_fmt_time(d["default_median_s"]), d["default_median_s"], num=True)
            + _td(_fmt_x(d["speedup"]), d["speedup"], num=True)
            + _td(low, d["speedup_low"], num=True)
            + _td(e.stale or "")
            + _td(without_op(d["via"]) if d["via"] else "-")
            + "</tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return f'<table class="records"><tr>{header}</tr>{"".join(rows)}</table>'


def _summary_table(sections: list[OpReport]) -> str:
    head = (
        "chip", "op", "shipped", "user", "wins", "default kept", "stale", "nearest",
        "untuned", "best speedup", "at", "wins per variant",
    )  # fmt: skip
    rows = []
    for section in sections:
        s = summary(section)
        wins = ", ".join(f"{v} {n}" for v, n in s["wins_by_variant"].items()) or "-"
        cells = [_td(s["chip"], nowrap=True), _td(s["op"], nowrap=True)]
        cells += [
            _td(str(s[k]), s[k], num=True)
            for k in ("pretuned", "user", "wins", "kept", "stale", "nearest", "untuned")
        ]
        cells += [
            _td(_fmt_x(s["best_speedup"]), s["best_speedup"], num=True),
            _td(s["best_at"] or "-"),
            _td(wins),
        ]
        rows.append(f'<tr data-chip="{s["chip"]}" data-op="{s["op"]}">{"".join(cells)}</tr>')
    header = "".join(f"<th>{h}</th>" for h in head)
    return f'<table class="summary" id="summary"><tr>{header}</tr>{"".join(rows)}</table>'


def _figure(section: OpReport, pngs: list, png_dir: Path | None) -> str:
    """The op's figure as a ``<figure>`` with its SVG and the numbers it draws; its PNG too."""
    fig, entries = figures.draw(section)
    fid = f"{section.chip}-{section.op.name}"
    if png_dir is not None:
        path = png_dir / f"{fid}.png"
        figures.png(fig, path)
        pngs.append(path)
    data = {
        "chip": section.chip,
        "op": section.op.name,
        "points": [{"label": section.label(e), **e.to_dict()} for e in entries],
    }
    blob = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    return (
        f'<figure class="plot" id="{fid}">'
        f"{figures.svg(fig, fid)}"
        f'<script type="application/json" class="plot-data">{blob}</script></figure>'
    )


def _section(section: OpReport, pngs: list, png_dir: Path | None) -> str:
    shared = " ".join(section.shared)
    parts = [
        f'<section class="op" data-chip="{section.chip}" data-op="{section.op.name}">',
        f"<h2>{section.op.name} on {section.chip}</h2>",
        f'<p class="shared">every problem: {html.escape(shared)}</p>' if shared else "",
        _figure(section, pngs, png_dir),
        _records_table(section),
    ]
    if section.untuned:
        keys = ", ".join(without_op(k) for k in section.untuned)
        parts.append(
            f'<p class="untuned">{len(section.untuned)} problems of the default preset or '
            f"recorded that no record serves (the default does): {html.escape(keys)}</p>"
        )
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def page(sections: list[OpReport], chip: str, url: str, png_dir: Path | None = None):
    """The HTML page of ``sections``, and the PNG files written into ``png_dir`` (if given).

    Args:
        sections: :func:`collect`'s.
        chip: what was asked for (a slug or ``all``), for the title.
        url: the user database read, for the page's header.
        png_dir: where each figure also goes as ``<chip>-<op>.png``.
    """
    pngs: list[Path] = []
    own = [e for s in sections for e in s.entries if e.measured]
    dates = sorted(e.record.created_at[:10] for e in own)
    when = f", tuned {dates[0]} to {dates[-1]}" if dates else ""
    users = sum(e.source == "user" for e in own)
    meta = (
        f"{len(own) - users} records of the shipped files and {users} of the user database "
        f"{shown_url(url)}{when}. Made by mlx-primitives {__version__} with MLX {mx.__version__}."
    )
    body = [
        f"<h1>mlx-primitives tuning report: {html.escape(chip)}</h1>",
        f'<p class="meta">{html.escape(meta)}</p>',
        f'<p class="how">{_HOW}</p>',
    ]
    if sections:
        body.append(_summary_table(sections))
        body += [_section(s, pngs, png_dir) for s in sections]
    else:
        body.append(f"<p>No tuning records for {html.escape(chip)}: run mlxp-tune first.</p>")
    text = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>mlx-primitives tuning report: {html.escape(chip)}</title>"
        f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return text, pngs
