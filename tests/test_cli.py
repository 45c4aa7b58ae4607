"""``mlxp-tune``: every subcommand, --json outputs and exit codes."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import pytest

from mlx_primitives.hardware import current_backend, detect_chip
from mlx_primitives.store import shipped
from mlx_primitives.tuning.cli import main
from mlx_primitives.tuning_record import TuningRecord

from .cli_run import run, run_json
from .toy import record

TUNE = ["--op", "rms_norm", "--shape", "8x64", "--dtype", "float32", "--preset", "quick"]


def user_rows(capsys, *argv) -> list[dict]:
    """``show --json``'s records of the user database (a chip with a shipped database has
    pretuned ones too)."""
    return [r for r in run_json(capsys, "show", *argv) if r["source"] == "user"]


def test_list(capsys):
    rows = run_json(capsys, "list")
    ops = {r["op"] for r in rows}
    assert {"rms_norm", "layer_norm", "rope", "swiglu", "geglu"} <= ops
    builtin = next(r for r in rows if r["op"] == "rms_norm" and r["variant"] == "builtin")
    assert builtin["available"] and builtin["configs"] == 1


def test_tune_one_problem_then_show_and_explain(capsys, user_db):
    records = run_json(capsys, "tune", *TUNE)
    (rec,) = records
    for key in (
        "chip",
        "op",
        "problem",
        "variant",
        "params",
        "median_s",
        "default_median_s",
        "speedup",
        "stale",
    ):
        assert key in rec
    assert (
        rec["problem"] == "rms_norm|float32|rows=8,dims=64,weight=float32" and rec["stale"] is False
    )
    assert rec["speedup"] == pytest.approx(rec["default_median_s"] / rec["median_s"])
    shown = user_rows(capsys)
    assert [(r["problem"], r["variant"]) for r in shown] == [(rec["problem"], rec["variant"])]
    explained = run_json(
        capsys, "explain", "rms_norm", "--shape", "8x64", "--shape", "64", "--dtype", "float32"
    )
    assert explained["source"] == "user" and explained["variant"] == rec["variant"]
    for key in ("op", "problem", "variant", "params", "source"):
        assert key in explained


def test_tune_is_the_default_command_and_prints_a_table(capsys):
    code, out, _ = run(capsys, *TUNE)
    assert code == 0
    assert "Winners on" in out and "rms_norm" in out and "speedup" in out


def test_tune_resumes(capsys):
    run(capsys, *TUNE)
    code, out, _ = run(capsys, *TUNE)
    assert code == 0 and "1 problems already tuned" in out


def test_time_budget_stops_starting_problems(capsys, open_db):
    code, out, _ = run(capsys, "tune", "--op", "swiglu", "--preset", "quick", "--time-budget", "0")
    assert code == 0 and "not started" in out
    assert open_db(create=False).records() == []


def test_explain_default_text(capsys):
    code, out, _ = run(
        capsys,
        "explain",
        "rope",
        "--shape",
        "1x4x8x16",
        "--dtype",
        "float16",
        "--option",
        "layout=BSHD",
    )
    assert code == 0
    assert (
        "rope|float16|batch=1,heads=8,seq=4,head_dim=16,dims=16,traditional=false,layout=BSHD"
        in out
    )
    assert "source: default" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["tune", "--op", "nope"], "unknown op 'nope'"),
        (["tune", "--op", "rms_norm", "--shape", "8x64"], "--shape needs --dtype"),
        (["tune", "--op", "rms_norm", "--shape", "8by64", "--dtype", "float32"], "not of the form"),
        (["tune", "--op", "rms_norm", "--shape", "8x0", "--dtype", "float32"], "positive sizes"),
        (["tune", "--op", "rms_norm", "--shape", "8x64", "--dtype", "int4"], "int4: tuning covers"),
        (["tune", "--shape", "8x64", "--dtype", "float32"], "one problem of one --op"),
        (["tune", "--op", "rms_norm", "--trials", "0"], "--trials must be at least 1"),
        (["tune", "--preset", "huge"], "invalid choice"),
        (["tune", "--seed", "-3"], "argument --seed: must be at least 0, got -3"),
        (["tune", "--candidate-timeout", "-1"], "must be a positive number of seconds, got -1"),
        (["tune", "--time-budget", "-5"], "argument --time-budget: must be at least 0 seconds"),
        (["tune", "--recorded", "--top", "-2"], "argument --top: must be at least 0, got -2"),
        (
            ["explain", "rms_norm", "--shape", "8x64", "--shape", "63", "--dtype", "float32"],
            "[rms_norm] weight has shape (63,), expected (64,)",
        ),
        (["explain", "rms_norm", "--dtype", "float32"], "explain needs --shape"),
        (
            ["explain", "swiglu", "--shape", "4x256", "--shape", "4x128", "--dtype", "float32"],
            "[swiglu] --shape 4x128 does not fit its array argument 2",
        ),
        (
            [
                "explain",
                "rms_norm",
                *["--shape", "8x64", "--shape", "64"] * 2,
                "--dtype",
                "float32",
            ],
            "[rms_norm] takes 2 arrays, got 4 shapes",
        ),
        (
            [
                "tune",
                "--op",
                "rms_norm",
                "--shape",
                "8x64",
                "--dtype",
                "float32",
                "--option",
                "a=1",
            ],
            "[rms_norm] no option 'a'; it takes weight",
        ),
        (["frobnicate"], "unrecognized arguments: frobnicate"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if argv[0] != "frobnicate":  # the command's own usage line
        assert err.startswith(f"usage: mlxp-tune {argv[0]} "), err


def test_a_path_that_cannot_be_written_is_an_error_not_a_traceback(capsys, tmp_path):
    """export to a missing folder or onto a directory: an error line, exit 1, and no
    temporary file left beside the destination."""
    run(capsys, *TUNE)
    for dest in (tmp_path / "missing" / "x.json", tmp_path):
        code, _, err = run(capsys, "export", str(dest))
        assert code == 1 and err.startswith("error: "), err
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.tmp*"))


def test_sigterm_stops_a_command_as_ctrl_c_does():
    """What timeout(1) and job schedulers send interrupts a run as Ctrl-C does (the tuner then
    marks its candidate interrupted); the program's own handler is put back after. In a
    process of its own: without the handler SIGTERM ends the process."""
    import subprocess
    import sys

    script = (
        "import os, signal, time\n"
        "from mlx_primitives.tuning import cli\n"
        "def terminated(args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "cli.HANDLERS['list'] = terminated\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "code = cli.main(['list'])\n"
        "assert signal.getsignal(signal.SIGTERM) is before\n"
        "raise SystemExit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "interrupted: finished problems are saved" in done.stderr


def test_export_import(capsys, tmp_path, open_db):
    run(capsys, *TUNE)
    path = tmp_path / "out.json"
    code, out, _ = run(capsys, "export", str(path))
    assert code == 0 and "exported 1 records" in out
    other = tmp_path / "other.sqlite"
    code, out, _ = run(capsys, "import", str(path), "--db", str(other))
    assert code == 0 and "imported 1 records" in out
    assert open_db(other).records() == open_db().records()


def test_import_keeps_a_record_that_ranks_higher(capsys, tmp_path, open_db):
    """An export's stale record of a problem the database holds a current record of does not
    replace it (merge's rule): nothing is lost by importing an old file."""
    run(capsys, *TUNE)
    (current,) = open_db().records()
    stale = {
        **current.to_dict(),
        "mlx_version": "0.20.0",
        "created_at": "2020-01-01T00:00:00+00:00",
    }
    path = tmp_path / "old.json"
    shipped.write(path, [TuningRecord.from_dict(stale)])
    code, out, err = run(capsys, "import", str(path))
    assert code == 0 and "1 kept the database's own" in out, out + err
    assert open_db().records() == [current]


def test_import_of_a_bad_file_fails_cleanly(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{]")
    code, _, err = run(capsys, "import", str(bad))
    assert code == 1 and "not a readable tuning export" in err and "Traceback" not in err


def test_doctor(capsys, user_db):
    report = run_json(capsys, "doctor")
    assert report["backend"] == current_backend()
    assert report["chip"]["slug"] == detect_chip().slug
    assert report["user_db"]["status"].startswith("absent")
    user_db.write_bytes(b"garbage" * 200)
    code, out, err = run(capsys, "doctor", "--json")
    assert code == 1 and "Traceback" not in err
    assert json.loads(out)["user_db"]["status"].startswith("unusable")
    assert user_db.read_bytes() == b"garbage" * 200


def test_clear(capsys, user_db):
    run(capsys, *TUNE)
    code, out, _ = run(capsys, "clear", "--op", "layer_norm")
    assert "cleared 0 records of layer_norm" in out
    for command in ("clear", "show"):
        with pytest.raises(SystemExit):
            run(capsys, command, "--op", "nosuch")
        assert "unknown op 'nosuch'" in capsys.readouterr().err
    code, out, _ = run(capsys, "clear", "--op", "layer_norm", "--op", TUNE[TUNE.index("--op") + 1])
    assert code == 0 and "cleared 1 records" in out
    run(capsys, *TUNE)
    code, out, _ = run(capsys, "clear")
    assert code == 0 and "cleared 1 records" in out
    assert user_rows(capsys) == []


@pytest.mark.parametrize("given", ["environment", "--db"])
def test_clear_moves_an_unusable_database_aside(capsys, user_db, given):
    """The database named by MLXP_TUNING_DB or by --db as a path: the same."""
    user_db.write_bytes(b"garbage" * 200)
    code, out, _ = run(capsys, "clear", *(["--db", str(user_db)] if given == "--db" else []))
    assert code == 0 and "moved it to" in out
    assert not user_db.exists()
    (aside,) = user_db.parent.glob("tuning.sqlite.unusable-*")
    assert aside.read_bytes() == b"garbage" * 200


def _rms_record(variant: str = "eager", **overrides):
    from mlx_primitives.registry import op

    args = (mx.ones((8, 64)), mx.ones((64,)), 1e-5)
    return record(op("rms_norm"), args, variant, default_variant="builtin", **overrides)


def _other_chip() -> str:
    """A shipped chip that is not this one (both NVIDIA cards ship: one always differs)."""
    return next(c for c in shipped.chips() if c != detect_chip().slug)


def test_show_export_and_clear_take_this_chips_records_unless_told(capsys, db, tmp_path):
    """A record of another chip in the user database is kept and shown with --chip, never
    mixed into this chip's."""
    here, other = detect_chip().slug, _other_chip()
    db.put(_rms_record())
    db.put(_rms_record(chip=other, variant="compiled"))

    def shown(*argv):
        return {(r["chip"], r["variant"]) for r in user_rows(capsys, *argv)}

    assert shown() == {(here, "eager")}
    assert shown("--chip", other) == {(other, "compiled")}
    assert shown("--chip", "all") == {(here, "eager"), (other, "compiled")}
    pretuned = [r for r in run_json(capsys, "show", "--chip", other) if r["source"] == "pretuned"]
    assert pretuned and {r["chip"] for r in pretuned} == {other}
    everything = run_json(capsys, "show", "--chip", "all")
    assert {r["chip"] for r in everything if r["source"] == "pretuned"} == set(shipped.chips())

    path = tmp_path / "other.json"
    code, out, _ = run(capsys, "export", str(path), "--chip", other)
    assert code == 0 and "exported 1 records" in out
    assert [(e["chip"], e["variant"]) for e in shipped.read(path)] == [(other, "compiled")]

    code, out, _ = run(capsys, "clear")
    assert code == 0 and f"cleared 1 records of {here}" in out
    assert [r.chip for r in db.records()] == [other]
    code, out, _ = run(capsys, "clear", "--chip", "all")
    assert code == 0 and "cleared 1 records from" in out
    assert db.records() == []


def test_show_and_doctor_mark_stale_records(capsys, db):
    """A record holds for the MLX minor series it was tuned on."""
    major, minor, *_ = mx.__version__.split(".")
    db.put(_rms_record())
    db.put(
        _rms_record(
            problem="rms_norm|float32|rows=32,dims=64,weight=float32",
            mlx_version=f"{major}.{int(minor) + 1}.0",
        )
    )
    db.put(
        _rms_record(
            problem="rms_norm|float32|rows=64,dims=64,weight=float32",
            mlx_version=f"{major}.{minor}.999",
        )
    )  # another patch: still current
    rows = user_rows(capsys)
    assert [(r["problem"].split("|")[2].split(",")[0], r["stale"], r["invalid"]) for r in rows] == [
        ("rows=32", True, None),
        ("rows=64", False, None),
        ("rows=8", False, None),
    ]
    assert rows[2]["speedup"] == pytest.approx(2.0)
    code, out, _ = run(capsys, "show")
    assert code == 0 and "eager (stale)" in out
    report = run_json(capsys, "doctor")["user_db"]
    assert (report["status"], report["records"], report["this_chip"], report["stale"]) == (
        "ok",
        3,
        3,
        1,
    )


def test_show_marks_a_record_that_does_not_fit_its_op(capsys, db):
    """Well formed (so the store keeps it) but naming a variant rms_norm lacks: shown as
    invalid and stale, with the fields that identify it."""
    db.put(_rms_record("nope"))
    (row,) = user_rows(capsys)
    assert row["stale"] is True and row["speedup"] is None
    assert "no variant named 'nope'" in row["invalid"]
    assert run_json(capsys, "doctor")["user_db"]["stale"] == 1
    code, out, _ = run(capsys, "show")
    assert code == 0 and "(invalid: " in out


def test_show_keeps_the_fields_of_a_record_that_does_not_fit_its_op(capsys, db):
    rec = _rms_record("nope")
    db.put(rec)
    (row,) = user_rows(capsys)
    assert (row["chip"], row["op"], row["problem"], row["variant"]) == (
        rec.chip,
        rec.op,
        rec.problem,
        "nope",
    )
    code, out, _ = run(capsys, "show")
    assert "rms_norm" in out and "rows=8" in out


def test_show_reports_a_broken_database(capsys, user_db):
    user_db.write_bytes(b"garbage" * 200)
    code, _, err = run(capsys, "show")
    assert code == 1 and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            [
                "tune",
                "--op",
                "rope",
                "--shape",
                "1x2x4x8",
                "--dtype",
                "float32",
                "--option",
                "traditional=1",
            ],
            "[rope] traditional must be a bool",
        ),
        (
            [
                "tune",
                "--op",
                "rms_norm",
                "--shape",
                "4x8",
                "--dtype",
                "float32",
                "--option",
                "foo=1",
            ],
            "[rms_norm] no option 'foo'; it takes weight",
        ),
        (
            ["tune", "--op", "rms_norm", "--shape", "4x8", "--dtype", "float64"],
            "tuning covers float32, float16, bfloat16",
        ),
    ],
)
def test_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("url", ["foo://bar", "/proc/no/such/dir/x.sqlite"])
def test_unusable_database_locations_fail_cleanly(capsys, url):
    code = main([*TUNE, "--db", url])
    out, err = capsys.readouterr()
    assert code == 1 and "cannot open a tuning database" in err and "Traceback" not in err


# What a person meets: progress, tables, help, explain --db, doctor ----------------------------


def test_progress_is_plain_lines_when_not_a_terminal(capsys):
    """In a log or a pipe: a line naming the run, then one line per problem as it ends."""
    code, _, err = run(capsys, *TUNE)
    assert code == 0
    lines = err.splitlines()
    assert "1 problems of 1 ops" in lines[0] and "preset quick" in lines[0]
    assert lines[1].startswith("[1/1] rms_norm 8x64 float32: ")
    assert "━" not in err


def test_progress_is_a_bar_on_a_terminal(capsys, monkeypatch):
    from rich.console import Console

    from mlx_primitives.tuning import cli

    monkeypatch.setattr(
        cli, "_console", lambda stderr=False: Console(stderr=stderr, force_terminal=True)
    )
    code, _, err = run(capsys, *TUNE)
    assert code == 0
    assert "━" in err and "1/1" in err
    assert "[1/1]" not in err


def test_no_arguments_says_which_preset_it_runs(capsys):
    code, out, err = run(capsys, "--time-budget", "0")
    assert code == 0
    assert "preset default (the default; --preset quick|default|full chooses)" in err
    code, out, err = run(capsys, "--preset", "quick", "--time-budget", "0")
    assert "preset quick," in err and "(the default" not in err


def _actions(parser):
    import argparse

    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def test_every_option_and_command_has_help():
    from mlx_primitives.tuning.cli import COMMANDS, _parser

    seen = set()
    for prog, action in _actions(_parser()):
        name = action.dest if not action.option_strings else action.option_strings[-1]
        assert action.help and action.help.strip(), f"{prog} {name} has no help"
        seen.add(prog.split()[-1])
    assert set(COMMANDS) <= seen


def test_explain_takes_db(capsys, tmp_path):
    other = tmp_path / "other.sqlite"
    run(capsys, *TUNE, "--db", str(other))
    argv = ["explain", "rms_norm", "--shape", "8x64", "--shape", "64", "--dtype", "float32"]
    assert run_json(capsys, *argv, "--db", str(other))["source"] == "user"
    assert run_json(capsys, *argv)["source"] != "user"  # the test's own user database is empty


def test_doctor_prints_readable_text(capsys, user_db):
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    assert out.startswith("mlx-primitives ")
    for label in ("chip:", "dispatch:", "user database:", "status:", "shipped records:"):
        assert label in out
    assert detect_chip().slug in out and "{" not in out
    user_db.write_bytes(b"garbage" * 200)
    code, out, _ = run(capsys, "doctor")
    assert code == 1 and "unusable" in out and "recover:" in out


def _flash_records(db):
    """Records of the four quick flash-attention problems, which differ only by dtype and
    causal flag."""
    from mlx_primitives.problem import parse_dtype
    from mlx_primitives.registry import op

    fa = op("flash_attention")
    keys = []
    for i, ex in enumerate(fa.presets["quick"]):
        args = fa.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
        rec = record(fa, args, "dense" if i % 2 else "builtin", default_variant="builtin")
        rec = dataclasses.replace(rec, median_s=1e-4 if i % 2 else 2e-4, spread_s=1e-5)
        db.put(dataclasses.replace(rec, default_median_s=2e-4))
        keys.append(rec.problem)
    return keys


def test_show_never_cuts_the_fields_that_tell_rows_apart(capsys, db, monkeypatch):
    keys = _flash_records(db)
    code, out, _ = run(capsys, "show")
    assert code == 0 and "…" not in out
    # The op once, in the title; the fields every row shares once, below the table.
    assert out.count("flash_attention") == 1
    assert "every row: batch=1 q_heads=4 group=2" in out
    for key in keys:
        dtype, fields = key.split("|")[1:]
        causal = next(f for f in fields.split(",") if f.startswith("causal="))
        assert f"{dtype} {causal}" in out
    # However narrow the terminal, a row wraps rather than losing its end.
    from rich.console import Console

    from mlx_primitives.tuning import cli

    monkeypatch.setattr(cli, "_console", lambda stderr=False: Console(stderr=stderr, width=60))
    code, out, _ = run(capsys, "show", "--chip", "all")
    assert code == 0 and "…" not in out


def test_show_reports_how_sure_each_decision_is(capsys, db):
    _flash_records(db)
    rows = user_rows(capsys)
    for r in rows:
        if r["variant"] == r["default_variant"]:
            assert r["speedup_low"] == 1.0
        else:
            want = r["default_median_s"] / (r["median_s"] + r["spread_s"])
            assert r["speedup_low"] == pytest.approx(want)
            assert r["speedup_low"] < r["speedup"]
    code, out, _ = run(capsys, "show")
    assert "at least" in out and "1.82x" in out  # 2e-4 / (1e-4 + 1e-5)


def test_tune_says_when_the_machine_is_too_noisy_to_decide(capsys, monkeypatch):
    from .test_tuner import SCATTERED, fake_machine

    fake_machine(monkeypatch, (0.5e-3,), SCATTERED)
    code, out, err = run(capsys, *TUNE)
    assert code == 0  # not a failure: the default serves, never worse than itself
    prefix = "rms_norm 8x64 float32: builtin, the default kept, too noisy to decide (confirming):"
    assert f"[1/1] {prefix}" in err
    assert "1 problems this machine was too noisy to decide: their defaults are kept" in err
    assert f"  {prefix}" not in err  # the list gives the note, not the variant again
    (row,) = user_rows(capsys)
    assert row["variant"] == row["default_variant"] == "builtin"
