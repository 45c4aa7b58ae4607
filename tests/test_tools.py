"""The maintainer tools: comparing exports, building a pretuned database."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx

from mlx_primitives.tuning.db import read_json, write_json

from .toy import make_op, record

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_reports_added_removed_and_changed(tmp_path):
    op = make_op()
    a = [record(op, mx.ones((4, 64)), "default"), record(op, mx.ones((64, 64)), "slow")]
    b = [
        record(op, mx.ones((4, 64)), "tiled", {"block": 32, "unroll": 1}),
        record(op, mx.ones((512, 64)), "default"),
    ]
    lines = _load("compare_db").compare(a, b)
    assert any(line.startswith("+ toy toy|float32|rows=512") for line in lines)
    assert any(line.startswith("- toy toy|float32|rows=64") for line in lines)
    assert any(
        line.startswith("~ toy toy|float32|rows=4") and "-> tiled(block=32,unroll=1)" in line
        for line in lines
    )
    write_json(tmp_path / "a.json", a)
    assert _load("compare_db").main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0


def test_pretune_exports_this_chip(tmp_path, capsys):
    from mlx_primitives.hardware import detect_chip

    code = _load("pretune").main(
        [
            "--preset",
            "quick",
            "--op",
            "rms_norm",
            "--out",
            str(tmp_path),
            "--db",
            str(tmp_path / "scratch.sqlite"),
        ]
    )
    assert code == 0
    slug = detect_chip().slug
    records = read_json(tmp_path / f"{slug}.json")
    assert records and {r["chip"] for r in records} == {slug}
    assert {r["op"] for r in records} == {"rms_norm"}
    assert json.loads((tmp_path / f"{slug}.json").read_text())["format"] == "mlx-primitives-tuning"


def test_readme_tables_come_from_committed_result_files():
    """Every results table in the README is what its committed result file says."""
    tool = _load("readme_tables")
    readme = (TOOLS.parent / "README.md").read_text()
    blocks = list(tool.BLOCK.finditer(readme))
    assert blocks, "the README has no results tables"
    for m in blocks:
        data = json.loads((TOOLS.parent / "benchmarks" / "results" / m["file"]).read_text())
        for key in ("device", "mlx_version", "date"):
            assert data[key]
    assert tool.main(["--check"]) == 0
