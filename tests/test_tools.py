"""The maintainer tools: comparing exports, building a pretuned database."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_primitives.store import shipped

from .toy import make_op, record

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_reports_added_removed_and_changed(tmp_path, capsys):
    op = make_op()
    a = [record(op, mx.ones((4, 64)), "default"), record(op, mx.ones((64, 64)), "slow")]
    b = [
        record(op, mx.ones((4, 64)), "tiled", {"block": 32, "unroll": 1}),
        record(op, mx.ones((512, 64)), "default"),
    ]
    tool = _load("compare_db")
    lines = tool.compare([r.to_dict() for r in a], [r.to_dict() for r in b])
    assert lines == [
        "+ toy toy|float32|rows=512,cols=64: default() 2.00x",
        "- toy toy|float32|rows=64,cols=64: slow() 2.00x",
        "~ toy toy|float32|rows=4,cols=64: default() 2.00x -> tiled(block=32,unroll=1) 2.00x",
    ]
    # From the files mlxp-tune export writes.
    shipped.write(tmp_path / "a.json", a)
    shipped.write(tmp_path / "b.json", b)
    capsys.readouterr()
    assert tool.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    assert tool.main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert capsys.readouterr().out.strip() == "no differences in winners"


def test_pretune_exports_this_chip(tmp_path, capsys):
    from mlx_primitives.hardware import detect_chip
    from mlx_primitives.registry import op
    from mlx_primitives.tuning_record import TuningRecord

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
    path = tmp_path / f"{slug}.json"
    records = [TuningRecord.from_dict(e) for e in shipped.read(path)]  # each well formed
    assert records and {r.chip for r in records} == {slug}
    assert {r.op for r in records} == {"rms_norm"}
    rms_norm = op("rms_norm")
    for r in records:  # each fits rms_norm and is current, so dispatch on this chip uses it
        r.problem_of(rms_norm)
        assert r.stale(rms_norm) is None
    # One per problem of the preset, and only this chip's file was written.
    assert len({r.problem for r in records}) == len(records) == len(rms_norm.presets["quick"])
    assert [p.name for p in tmp_path.glob("*.json")] == [path.name]
    assert json.loads(path.read_text())["format"] == shipped.FORMAT


def test_a_row_names_the_default_when_the_tuned_variant_failed_its_probe(db, monkeypatch):
    """The dispatch row says what served: a record's variant that fails its probe on the first
    call is disabled, and the default serves and is named."""
    from benchmarks import common
    from mlx_primitives.registry import Example

    toy = make_op()
    db.put(record(toy, mx.ones((64, 256)), "wrong"))
    common.dispatch.reset()
    fake = {
        "median_s": 1e-6,
        "spread_s": 0.0,
        "reps": 5,
        "chain": 1,
        "first_call_s": 0,
        "build_eval_s": 2e-6,
    }
    monkeypatch.setattr(common, "measure", lambda calls, *a: [dict(fake) for _ in calls])
    monkeypatch.setattr(common, "_variant_configs", lambda *a: [("default", {})])
    with pytest.warns(RuntimeWarning, match="variant 'wrong' failed"):
        rows = common.run_op(toy, Example(((64, 256),), "float32"), None, None, 0.002)
    assert (rows[0]["variant"], rows[0]["source"]) == ("default", "default")


def test_dispatch_overhead_reports_its_parts():
    """Overhead differs by host (2.0 to 4.6 us on GPU hosts): the file records the argument
    checks and the cache lookup apart, and the README line shows them."""
    from benchmarks.suites.norms import dispatch_overhead

    o = dispatch_overhead(200)
    assert set(o) == {"dispatch_s", "direct_s", "overhead_s", "checks_s", "lookup_s", "goal_s"}
    assert 0 < o["lookup_s"] < o["dispatch_s"] and 0 < o["checks_s"] < o["dispatch_s"]
    head = {"device": "D", "mlx_version": "0", "date": "2026", "method": "m", "results": []}
    table = _load("docs_pages").table(head | {"dispatch_overhead": o})
    assert f"the argument checks alone took {o['checks_s'] * 1e6:.1f} us" in table
    old = {k: o[k] for k in ("overhead_s", "goal_s")}
    assert "argument checks alone" not in _load("docs_pages").table(
        head | {"dispatch_overhead": old}
    )


def test_agreement_runs_under_load_and_makes_a_page(tmp_path, monkeypatch):
    """tools/agreement.py runs its busy processes for the runs' length only and writes a result
    file naming the device; its page says how many decisions agree and lists the others."""
    tool = _load("agreement")
    with tool.loaded(2) as busy:
        assert len(busy) == 2 and all(p.poll() is None for p in busy)
    assert all(p.returncode is not None for p in busy)
    report = {"problems": 20, "disagreements": 1, "rate": 0.05, "agreement": 0.95,
              "undecided": [0, 2], "undecided_details": [],
              "details": [{"problem": "toy|float32|rows=64", "runs": [
                  {"variant": "tiled", "params": {"block": 32}, "median_s": 1e-6,
                   "default_median_s": 2e-6, "note": "2.00x confirming"},
                  {"variant": "default", "params": {}, "median_s": 2e-6,
                   "default_median_s": 2e-6, "note": "the default kept"}]}]}  # fmt: skip
    loads = []
    monkeypatch.setattr(tool, "loaded", lambda n: loads.append(n) or contextlib.nullcontext())
    monkeypatch.setattr(tool, "run_twice", lambda preset, ops: report)
    out = tmp_path / "agreement-x.json"
    assert tool.main(["--load", "2", "-o", str(out)]) == 0
    assert loads == [2]
    data = json.loads(out.read_text())
    assert data["suite"] == "agreement" and data["load"] == 2 and data["mlx_version"]
    page = _load("docs_pages").agreement_page({out.name: data}, [out.name])
    assert "**19 of 20 problems decided by both runs got the same winner (95.0%).**" in page
    assert "Too noisy to decide: 0 problems in the first run, 2 in the second." in page
    # The key's pipes escaped, so that they do not split the table's cell.
    want = (
        "| `toy\\|float32\\|rows=64` | `tiled` (block=32): 1.00 us vs the default's 2.00 us "
        "(2.00x confirming) | `default`: 2.00 us vs the default's 2.00 us (the default kept) |"
    )
    assert want in page


def test_result_files_say_how_each_op_was_fed():
    from benchmarks import common

    assert "swiglu and geglu: as their second input" in common.METHOD
    assert "rms_norm" not in common.METHOD  # fed as the first input, like most ops


def test_a_problem_out_of_memory_is_reported_and_the_suite_goes_on(monkeypatch):
    """On an 80 GB card MLX's masked attention at 16384 ran out of memory and the whole
    attention suite was lost; now that problem is listed as not measured, with its error."""
    from benchmarks import common
    from mlx_primitives.registry import Example

    def oom(o, ex, *args, **kwargs):
        raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")

    monkeypatch.setattr(common, "run_op", oom)
    op, ex = make_op(), Example(((16384, 64),), "float16")
    failed = []
    assert common.run_or_skip(failed, op, ex, None, None, 0.1) == []
    assert failed == [
        {
            "op": "toy",
            "example": "16384x64 float16",
            "error": "cudaMallocAsync(&data, size, stream) failed: out of memory",
        }
    ]
    table = _load("docs_pages").table(
        {"device": "D", "mlx_version": "0", "date": "2026", "method": "m", "results": []}
        | {"failed": failed}
    )
    assert "Not measured, out of memory on this device: toy 16384x64 float16." in table

    # Any other error is a bug to see, not a row to skip.
    def broken(o, ex, *args, **kwargs):
        raise RuntimeError("[toy] wrong result")

    monkeypatch.setattr(common, "run_op", broken)
    with pytest.raises(RuntimeError, match="wrong result"):
        common.run_or_skip(failed, op, ex, None, None, 0.1)
    assert len(failed) == 1


def test_the_suites_list_a_problem_out_of_memory_and_keep_the_others(monkeypatch):
    from argparse import Namespace

    from benchmarks import common
    from benchmarks.suites import attention, norms

    real, seen = common.run_op, []

    def first_fails(o, ex, *args, **kwargs):
        seen.append(ex)
        if len(seen) == 1:
            raise RuntimeError("[malloc] Unable to allocate 68719476736 bytes.")
        return real(o, ex, *args, **kwargs)

    monkeypatch.setattr(common, "run_op", first_fails)
    args = Namespace(sizes="small", op=["rms_norm"], tune=None, budget=0.002, section=None)
    result = norms.run(args)
    assert [f["example"] for f in result["failed"]] == [seen[0].label()]
    assert len({r["problem"] for r in result["results"]}) == len(seen) - 1 > 0

    seen.clear()
    args = Namespace(sizes="small", op=None, tune=None, budget=0.002, section=["window"])
    result = attention.run(args)
    assert [f["example"] for f in result["failed"]] == [seen[0].label()]
    assert result["results"] == []


def test_the_copy_ceiling_waits_as_the_op_it_is_compared_with(monkeypatch):
    """The same-size copy starts from an idle device as long as the op's evaluations did,
    not after its own shorter build."""
    from benchmarks.suites import norms

    # The copy kernel needs a GPU: a stand-in that copies on any back-end.
    monkeypatch.setattr(norms, "_COPY", lambda inputs, **kwargs: [mx.array(inputs[0]) + 0])
    row = norms.copy_ceiling(4096, budget_s=0.002, idle_s=0.01)
    assert row["idle_s"] == 0.01 and row["gb_per_s"] > 0
    assert norms.copy_ceiling(4096, budget_s=0.002)["idle_s"] < 0.01


def test_the_host_suite_times_builds_and_both_starts():
    from argparse import Namespace

    from benchmarks.suites import host

    args = Namespace(op=["swiglu"], budget=0.002, section=None)
    rows = host.run(args)["results"]
    build = [r for r in rows if r["section"] == "build"]
    assert [r["impl"] for r in build] == ["baseline", "dispatch", "variant"]
    assert all(r["build_s"] > 0 for r in build)
    idle = [r for r in rows if r["section"] == "idle"]
    # 1 and 64 rows, four implementations, each start.
    assert len(idle) == 2 * 4 * 2
    # The overhead leaves out the variant's build: the kept decision was swapped for a stub.
    (over,) = [r for r in rows if r["section"] == "overhead"]
    assert 0 < over["overhead_s"] < over["dispatch_s"] - over["variant_s"] / 2
    assert {r["idle_s"] for r in idle if not r["equal_start"]} == {0.0}
    for example in {r["example"] for r in idle}:
        waits = {r["idle_s"] for r in idle if r["equal_start"] and r["example"] == example}
        assert len(waits) == 1 and waits.pop() > 0
    args = Namespace(op=["rope"], budget=0.002, section=["offset"])
    offset = host.run(args)["results"]
    assert [r["impl"] for r in offset] == ["python int", "new python int each call", "4-byte array"]
    assert offset[0]["vs_python_int"] == 1.0 and all(r["median_s"] > 0 for r in offset)
    with pytest.raises(SystemExit, match=r"\[host\] unknown sections \['bild'\]"):
        host.run(Namespace(op=["swiglu"], budget=0.002, section=["bild"]))


def test_a_dispatched_kernel_is_also_timed_in_inference_mode(monkeypatch):
    """Where the dispatch runs a custom kernel, its row also gives the dispatch timed inside
    inference_mode, in the same samples, and the README table shows that ratio."""
    import contextlib

    from benchmarks import common
    from mlx_primitives.registry import Example, Variant

    active, seen = [False], []

    def kernel_fn(x):  # records whether its graph is built in inference_mode
        seen.append(active[0])
        return x * 2

    # A variant with a kernel source stands for a custom kernel.
    # feed None: the op's feed reaches every measurement.
    toy = make_op([Variant("kernel", lambda: kernel_fn, sources=("rms_norm/row.k",))], feed=None)
    real = common.dispatch.choose

    @contextlib.contextmanager
    def spy():
        active[0] = True
        try:
            yield
        finally:
            active[0] = False

    timed, feeds = [], []

    def measure(calls, budget_s=0.3, feed=0):  # call i of a measurement takes i + 1 us
        timed.append(calls)
        feeds.append(feed)
        return [
            {
                "median_s": (i + 1) * 1e-6,
                "spread_s": 0.0,
                "reps": 5,
                "chain": 1,
                "first_call_s": 0,
                "build_eval_s": (i + 2) * 1e-6,
            }
            for i in range(len(calls))
        ]

    monkeypatch.setattr(
        common.dispatch, "choose", lambda o, p: real(o, p)._replace(variant="kernel")
    )
    monkeypatch.setattr(common, "inference_mode", spy)
    monkeypatch.setattr(common, "measure", measure)
    # The toy's faulty variants are not what this times.
    monkeypatch.setattr(common, "_variant_configs", lambda *a: [("default", {}), ("slow", {})])
    rows = common.run_op(toy, Example(((64, 256),), "float32"), None, None, 0.002)
    assert feeds == [None, None]
    d = rows[0]
    assert (d["median_s"], d["baseline_median_s"], d["inference_median_s"]) == (1e-6, 2e-6, 3e-6)
    assert d["inference_vs_baseline"] == 2 / 3
    assert not any("inference_median_s" in r for r in rows[1:])
    # The third call timed with the dispatch is the dispatch, its chain built in the mode.
    for (fn, args, kwargs), mode in zip(timed[0], (False, None, True)):
        seen.clear()
        fn(*args, **kwargs)
        assert seen == ([] if mode is None else [mode])
    result = {"device": "D", "mlx_version": "0", "date": "2026", "method": "m", "results": rows}
    table = _load("docs_pages").table(result)
    assert "| 2.00x | 0.67x |" in table

    monkeypatch.setattr(common.dispatch, "choose", real)
    rows = common.run_op(toy, Example(((64, 256),), "float32"), None, None, 0.002)
    assert len(timed[2]) == 2 and "inference_median_s" not in rows[0]  # no wrapper to skip
    assert "| 2.00x | - |" in _load("docs_pages").table(result | {"results": rows})


def test_a_gpu_test_summary_counts_every_shard(tmp_path):
    """tools/test_summary.py reads pytest's closing line of each shard; a shard that never
    finished counts as an error."""
    summary = _load("test_summary")
    (tmp_path / "shard.00.log").write_text("....\n4 passed, 2 skipped in 3.1s\n")
    (tmp_path / "shard.01.log").write_text("F.\nFAILED x\n1 failed, 1 passed, 1 error in 2s\n")
    (tmp_path / "shard.02.log").write_text("..\n")  # killed before its closing line
    out = summary.summarize(tmp_path)
    assert (out["passed"], out["failed"], out["skipped"], out["errors"]) == (5, 1, 2, 2)
    assert out["shards"] == 3 and out["mlx_version"] and out["device"] and out["commit"]
    assert summary.main([str(tmp_path)]) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == 1


def test_a_benchmark_run_stopped_midway_keeps_what_it_measured(tmp_path):
    """SIGTERM (a time limit) in the middle of a suite: the problems measured so far are
    written, marked as stopped, and the exit code says so."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "norms.json"
    cmd = [sys.executable, "-m", "benchmarks.runner", "--suite", "norms", "--sizes", "small",
           "--budget", "0.002", "-o", str(out)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MLXP_TUNING_DB": str(tmp_path / "none.sqlite")}
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # the first problem's line: it is measured
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 130, first + rest
    data = json.loads(out.read_text())
    assert data["stopped"].startswith("stopped by SIGTERM after ")
    problems = {r["problem"] for r in data["results"]}
    assert 1 <= len(problems) < 20 and data["suite"] == "norms" and data["device"]


def test_a_model_run_stopped_midway_keeps_the_sections_it_measured(tmp_path, monkeypatch):
    """The model suite stopped in its second model: the first model's sections are written,
    with the model they belong to, marked as stopped."""
    pytest.importorskip("mlx_lm")
    from benchmarks import runner
    from benchmarks.suites import model as suite

    tiny = {**suite.SMALL_LLAMA, "num_hidden_layers": 1, "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 2,
            "num_key_value_heads": 1}  # fmt: skip
    specs = (
        ("first", "llama", tiny, "float32", False),
        ("second", "llama", tiny, "float32", False),
    )
    monkeypatch.setitem(suite.MODELS, "cpu", specs)
    monkeypatch.setitem(suite.TOKENS, "cpu", (3, 8))
    monkeypatch.setattr(suite, "_tune_recorded", lambda *args: 0)
    compare = suite._compare

    def stop_in_the_second(modes, names, measure, rounds):
        if len(suite.MEASURED["rows"]) == 2:
            raise KeyboardInterrupt("stopped by SIGTERM")
        return compare(modes, names, measure, rounds=1)

    monkeypatch.setattr(suite, "_compare", stop_in_the_second)
    monkeypatch.setenv("MLXP_TUNING_DB", str(tmp_path / "none.sqlite"))
    out = tmp_path / "model.json"
    argv = ["--suite", "model", "--section", "decode", "--section", "build", "-o", str(out)]
    assert runner.main(argv) == 130
    data = json.loads(out.read_text())
    assert data["stopped"] == "stopped by SIGTERM after 2 sections of 1 models"
    assert [m["name"] for m in data["models"]] == ["first", "second"]
    assert [r["section"] for r in data["models"][0]["results"]] == ["decode", "build"]
    assert [(r["model"], r["section"]) for r in data["results"]] == [
        ("first", "decode"), ("first", "build")]  # fmt: skip


@pytest.mark.parametrize("section", ["decode", "prefill"])
def test_a_models_timed_calls_make_no_decision(section, served, monkeypatch):
    """The model suite's clock starts once the mode's first calls made their decisions (and
    probes): in the timed calls of a freshly patched model nothing is decided."""
    pytest.importorskip("mlx_lm")
    from benchmarks.suites import model as suite
    from mlx_primitives import dispatch, lm

    tiny = {**suite.SMALL_LLAMA, "num_hidden_layers": 1, "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 2,
            "num_key_value_heads": 1}  # fmt: skip
    model = suite._model("llama", tiny, "float32", True)
    prompt = mx.random.randint(0, tiny["vocab_size"], (16,), key=mx.random.key(0))
    events = []
    resolve = dispatch._resolve  # a problem's decision made (and its variant probed)
    monkeypatch.setattr(dispatch, "_resolve", lambda *a: events.append("decided") or resolve(*a))
    clock = time.perf_counter
    monkeypatch.setattr(suite.time, "perf_counter", lambda: events.append("clock") or clock())
    lm.patch(model)
    try:
        if section == "decode":
            suite._decode_s(model, prompt, 40)  # its KV cache past 32, then 64 positions
        else:
            suite._prefill_s(model, prompt)
    finally:
        lm.unpatch(model)
    assert "decided" in events and "decided" not in events[events.index("clock") :]
