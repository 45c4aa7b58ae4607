"""The documentation: generated pages agree with the result files, links resolve, the README
stays short and keeps the set-up commands CI runs."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SET_UP = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cpu]" && '
    "mlxp-tune --preset quick",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cpu,dev,lm]" && '
    "python -m pytest -q",
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _tool():
    spec = importlib.util.spec_from_file_location("docs_pages", ROOT / "tools" / "docs_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown() -> list[Path]:
    top = [ROOT / name for name in ("README.md", "DEVELOPERS.md", "CHANGELOG.md")]
    return top + sorted((ROOT / "docs").rglob("*.md"))


def _copy(tmp_path: Path) -> Path:
    """What the generator reads and writes, copied: the committed files stay untouched."""
    shutil.copy(README, tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    suites = tmp_path / "benchmarks" / "suites"
    suites.mkdir()
    for path in (ROOT / "benchmarks" / "suites").glob("*.py"):
        shutil.copy(path, suites / path.name)
    return tmp_path


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_generated_docs_agree_with_the_result_files(capsys):
    tool = _tool()
    results = tool.load(ROOT)
    pages = tool.current(results)
    assert pages, "no current result files"
    for name in pages:
        for key in ("device", "mlx_version", "date", "method"):
            assert results[name][key], f"{name} lacks {key}"
    assert tool.main(["--check"]) == 0, capsys.readouterr().out


def test_a_changed_figure_makes_the_check_fail(tmp_path, capsys):
    tool = _tool()
    root = _copy(tmp_path)
    assert tool.main(["--check", "--root", str(root)]) == 0
    path = root / "benchmarks" / "results" / "norms-nvidia-h200.json"
    data = json.loads(path.read_text())
    row = next(r for r in data["results"] if r["impl"] == "dispatch" and r["op"] == "layer_norm")
    row["vs_baseline"] += 0.5
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert tool.main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "docs/benchmarks/norms-nvidia-h200.md" in out and "README.md" in out
    # Writing brings them back in line, and touches only the generated text.
    before = (root / "README.md").read_text()
    assert tool.main(["--root", str(root)]) == 0
    assert tool.main(["--check", "--root", str(root)]) == 0
    after = (root / "README.md").read_text()
    assert after.split(tool.START)[0] == before.split(tool.START)[0]
    assert after.split(tool.END)[1] == before.split(tool.END)[1]


def test_a_superseded_file_loses_its_page(tmp_path, capsys):
    tool = _tool()
    root = _copy(tmp_path)
    results = root / "benchmarks" / "results"
    data = json.loads((results / "norms-nvidia-h200.json").read_text())
    # Named to sort after the file it supersedes: the date decides, not the name.
    data["date"] = "2099-01-01T00:00:00+00:00"
    (results / "norms-z-nvidia-h200.json").write_text(json.dumps(data))
    assert tool.main(["--check", "--root", str(root)]) == 1
    assert "docs/benchmarks/norms-nvidia-h200.md" in capsys.readouterr().out
    assert tool.main(["--root", str(root)]) == 0
    assert not (root / "docs" / "benchmarks" / "norms-nvidia-h200.md").exists()
    assert (root / "docs" / "benchmarks" / "norms-z-nvidia-h200.md").exists()


def test_a_stopped_run_says_so_on_its_page(tmp_path):
    tool = _tool()
    root = _copy(tmp_path)
    path = root / "benchmarks" / "results" / "norms-nvidia-h200.json"
    data = json.loads(path.read_text())
    data["results"] = data["results"][:3]
    data["stopped"] = "stopped by SIGTERM after 1 problems"
    path.write_text(json.dumps(data))
    assert tool.main(["--root", str(root)]) == 0
    page = (root / "docs" / "benchmarks" / "norms-nvidia-h200.md").read_text()
    assert "**Stopped** before its end (stopped by SIGTERM after 1 problems)" in page


def test_the_readme_needs_its_results_block(tmp_path):
    tool = _tool()
    root = _copy(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace(tool.END, ""))
    with pytest.raises(ValueError, match=r"\[docs_pages\] README.md lacks the block"):
        tool.render(root)


def test_every_file_without_a_page_is_cited_by_a_note():
    tool = _tool()
    results = tool.load(ROOT)
    pages = tool.current(results) + [n for ns in tool.summaries(results).values() for n in ns]
    notes = [p.read_text() for p in (ROOT / "docs" / "notes").glob("*.md")]
    for name in set(results) - set(pages):
        assert any(name in text for text in notes), f"{name}: no page and no note cites it"


def test_notes_are_dated_and_indexed():
    index = (ROOT / "docs" / "README.md").read_text()
    notes = sorted((ROOT / "docs" / "notes").glob("*.md"))
    assert notes
    for note in notes:
        date = re.match(r"\d{4}-\d{2}-\d{2}", note.name)
        assert date, f"{note.name} is not named YYYY-MM-DD-topic.md"
        assert date[0] in note.read_text().splitlines()[0], f"{note.name}: title lacks its date"
        assert f"notes/{note.name}" in index, f"{note.name} is not linked from docs/README.md"


def test_every_link_in_the_docs_resolves():
    broken = []
    for page in _markdown():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_tests_named_in_the_docs_exist():
    missing = []
    for page in _markdown():
        for path, name in TEST_REF.findall(page.read_text()):
            source = ROOT / path
            if not source.exists() or f"def {name}(" not in source.read_text():
                missing.append(f"{page.relative_to(ROOT)}: {path}::{name}")
    assert not missing, missing


def test_readme_is_short_and_keeps_the_set_up_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    assert [line for line in lines if line.startswith("python3 -m venv")] == SET_UP
    # .ci/run greps the test command out of the README and runs it.
    pattern = re.search(r"grep -m1 '([^']+)' README.md", (ROOT / ".ci" / "run").read_text())
    assert pattern, ".ci/run no longer greps its command out of README.md"
    assert next(line for line in lines if re.search(pattern[1], line)) == SET_UP[1]


def test_the_readme_holds_no_figures_outside_its_generated_block():
    tool = _tool()
    text = README.read_text()
    outside = text.split(tool.START)[0] + text.split(tool.END)[1]
    figures = re.findall(r"\b\d+(?:\.\d+)?(?:x\b| ?(?:us|ms|GB/s|TB/s)\b|%)", outside)
    assert not figures, figures
