"""``mlxp-tune report``: the page is rendered in a real headless Chromium, every figure must
have drawn, and the numbers it embeds, draws and tabulates must be the database's.

Chromium is Debian's (``apt-get install chromium``), driven through Playwright's Python
package (``playwright install`` is never needed). Without it the browser test is skipped,
unless ``MLXP_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.registry import op as get_op
from mlx_primitives.store import shipped
from mlx_primitives.tuning.cli import main
from mlx_primitives.tuning_record import TuningRecord

CHIP = "nvidia-h200"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def _key(dtype: str, rows: int) -> str:
    return f"layer_norm|{dtype}|rows={rows},dims=4096,weight={dtype},bias={dtype}"


def _shipped() -> list[TuningRecord]:
    return [TuningRecord.from_dict(r) for r in shipped.read(shipped.path(CHIP))]


@pytest.fixture
def user_records(db) -> list[TuningRecord]:
    """The user database of the report: on the H200, a re-tune of a shipped layer_norm
    problem, a problem of its own, a stale record, and a recorded problem without a record
    (the nearest rule serves it with the record of rows=4096)."""
    row = next(r for r in _shipped() if r.problem == _key("float16", 16384))
    fresh = {
        "mlx_version": mx.__version__,
        "source_hash": get_op("layer_norm").variant("row").source_hash,
    }
    made = [
        TuningRecord.from_dict({**row.to_dict(), **fresh, "median_s": row.median_s * 0.9}),
        TuningRecord.from_dict(
            {**row.to_dict(), **fresh, "problem": _key("float16", 4096), "median_s": 21e-6,
             "default_median_s": 47e-6, "spread_s": 1e-6}
        ),
        TuningRecord.from_dict(
            {**row.to_dict(), "problem": _key("float16", 256), "mlx_version": "0.30.1",
             "median_s": 9e-6, "default_median_s": 12e-6}
        ),
    ]  # fmt: skip
    for rec in made:
        db.put(rec)
    db.add_hits(CHIP, {("layer_norm", _key("float16", 2048)): 7})
    return made


def _report(capsys, tmp_path, *argv) -> Path:
    out = tmp_path / "report.html"
    assert main(["report", "--chip", CHIP, "-o", str(out), *argv]) == 0
    capsys.readouterr()
    return out


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium; skipped (failed under MLXP_REQUIRE_BROWSER=1) where there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (the dev extra: pip install -e '.[dev]')"
    else:
        why = (
            None
            if os.path.exists(CHROMIUM)
            else f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        )
    if why is not None:
        if os.environ.get("MLXP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MLXP_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=list(ARGS))
        yield b
        b.close()


# What the page holds, read in the browser: per figure its size, its drawn marks' boxes (in
# the SVG's own units) and the numbers it embeds; per section the rows of its table.
_READ = """() => {
  const box = (fig, id) => {
    const el = document.getElementById(fig.id + "-" + id);
    if (!el) return null;
    const b = el.getBBox();
    return [b.x, b.y, b.width, b.height];
  };
  const figures = [...document.querySelectorAll("figure.plot")].map(fig => {
    const svg = fig.querySelector("svg");
    const r = svg.getBoundingClientRect();
    const data = JSON.parse(fig.querySelector("script.plot-data").textContent);
    return {
      id: fig.id, width: r.width, height: r.height, data,
      drawn: svg.querySelectorAll("path, use, text").length,
      marks: data.points.map((p, i) => ({
        bar: box(fig, "bar-" + i),
        default: box(fig, "default-" + i),
        chosen: box(fig, "chosen-" + i),
      })),
    };
  });
  const tables = {};
  for (const s of document.querySelectorAll("section.op")) {
    const rows = [...s.querySelectorAll("table.records tr[data-problem]")];
    tables[s.dataset.chip + "/" + s.dataset.op] = rows.map(tr => ({
      problem: tr.dataset.problem,
      source: tr.dataset.source,
      values: [...tr.querySelectorAll("td[data-value]")].map(td => JSON.parse(td.dataset.value)),
    }));
  }
  return {figures, tables};
}"""


def _read(browser, path: Path) -> dict:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(path.as_uri())
    read = page.evaluate(_READ)
    page.close()
    assert errors == []
    return read


def _center(b) -> tuple[float, float]:
    return b[0] + b[2] / 2, b[1] + b[3] / 2


def _check_drawn(fig: dict) -> None:
    """Every mark is there, and where its numbers put it: bars as long as their speedups
    (one scale), time marks on one log scale, rows in the order of the points."""
    points, marks = fig["data"]["points"], fig["marks"]
    assert fig["width"] > 100 and fig["height"] > 50 and fig["drawn"] > 20, fig["id"]
    assert len(points) == len(marks) > 0
    missing = [i for i, m in enumerate(marks) if m["bar"] is None]
    assert not missing, f"{fig['id']}: no bar drawn for rows {missing}"
    per_x = [m["bar"][2] / p["speedup"] for p, m in zip(points, marks)]
    assert all(m["bar"][3] > 0 for m in marks)
    assert max(per_x) / min(per_x) - 1 < 1e-3, f"{fig['id']}: bars do not match the speedups"
    rows = [_center(m["bar"])[1] for m in marks]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    times, xs = [], []
    for p, m, y in zip(points, marks, rows):
        if p["source"] == "nearest":
            assert m["default"] is None and m["chosen"] is None
            continue
        for name, t in (("default", p["default_median_s"]), ("chosen", p["median_s"])):
            assert m[name] is not None, f"{fig['id']}: no {name} mark for {p['problem']}"
            x, my = _center(m[name])
            assert m[name][2] > 0 and abs(my - y) < 0.5, f"{fig['id']}: {name} mark off its row"
            times.append(math.log10(t))
            xs.append(x)
    if len(set(times)) > 1:
        slope, offset = np.polyfit(times, xs, 1)
        worst = max(abs(slope * t + offset - x) for t, x in zip(times, xs))
        assert worst < 0.05, f"{fig['id']}: a time mark is {worst:.2f} off the log scale"


def test_report_in_a_browser_matches_the_database(capsys, tmp_path, user_records, browser):
    read = _read(browser, _report(capsys, tmp_path))
    user = {r.problem: r for r in user_records}
    ship = {r.problem: r for r in _shipped()}
    seen = set()
    assert {f["id"] for f in read["figures"]} == {f"{CHIP}-{o}" for o in {r.op for r in _shipped()}}
    for fig in read["figures"]:
        _check_drawn(fig)
        op = get_op(fig["data"]["op"])
        for p in fig["data"]["points"]:
            if p["source"] == "nearest":
                rec = user.get(p["via"]) or ship[p["via"]]
            else:
                rec = (user if p["source"] == "user" else ship)[p["problem"]]
                assert p["source"] == ("user" if p["problem"] in user else "pretuned")
                seen.add(p["problem"])
            assert (p["variant"], p["params"]) == (rec.variant, rec.params)
            assert (p["median_s"], p["default_median_s"]) == (rec.median_s, rec.default_median_s)
            assert p["speedup"] == pytest.approx(rec.speedup, rel=1e-12)
            assert p["speedup_low"] == pytest.approx(rec.speedup_low, rel=1e-12)
            assert p["stale"] == (rec.stale(op) is not None)
        table = read["tables"][fig["id"].replace(f"{CHIP}-", f"{CHIP}/", 1)]
        assert [(r["problem"], r["source"]) for r in table] == [
            (p["problem"], p["source"]) for p in fig["data"]["points"]
        ]
        for row, p in zip(table, fig["data"]["points"]):
            assert row["values"] == [
                {"variant": p["variant"], "params": p["params"]},
                p["median_s"], p["default_median_s"], p["speedup"], p["speedup_low"],
            ]  # fmt: skip
    # Every record has its row: the user's over the shipped one of the same problem.
    assert seen == set(user) | set(ship)
    (norm,) = [f for f in read["figures"] if f["id"] == f"{CHIP}-layer_norm"]
    by_problem = {p["problem"]: p for p in norm["data"]["points"]}
    assert by_problem[_key("float16", 256)]["stale"] is True
    near = by_problem[_key("float16", 2048)]
    assert near["source"] == "nearest" and near["via"] == _key("float16", 4096)


def test_report_writes_pngs_and_says_what(capsys, tmp_path):
    out = tmp_path / "r.html"
    code = main(
        ["report", "--chip", CHIP, "--op", "rope", "-o", str(out), "--png", str(tmp_path / "png")]
    )
    assert code == 0 and "1 sections" in capsys.readouterr().out
    (png,) = (tmp_path / "png").iterdir()
    assert png.name == f"{CHIP}-rope.png" and png.read_bytes()[:4] == b"\x89PNG"
    text = out.read_text()
    assert "<script src" not in text and "<link" not in text and "<img" not in text


def test_report_of_all_chips_and_of_none(capsys, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", "--chip", "all", "--op", "rms_norm", "-o", str(out)]) == 0
    for slug in shipped.chips():
        assert f'data-chip="{slug}" data-op="rms_norm"' in out.read_text()
    assert main(["report", "--chip", "cpu-nothing-1c", "-o", str(out)]) == 0
    assert "No tuning records for cpu-nothing-1c" in out.read_text()


def test_report_without_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code = main(["report", "--chip", CHIP, "--op", "rope", "-o", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 1 and "[mlxp-tune]" in err and "mlx-primitives[report]" in err


def test_report_bad_op_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["report", "--op", "nope", "-o", str(tmp_path / "r.html")])
    assert info.value.code == 2


def test_matplotlib_is_loaded_only_by_the_report():
    code = (
        "import sys, mlx_primitives; from mlx_primitives.tuning import cli; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_chips_back_end_from_its_slug():
    """The report applies the nearest rule for the reported chip's back-end, not this one's."""
    from mlx_primitives.hardware.chip import slug_backend

    assert [slug_backend(s) for s in ("nvidia-h200", "apple-m4-max-40c", "cpu-amd-epyc-2c")] == [
        "cuda",
        "metal",
        "cpu",
    ]
