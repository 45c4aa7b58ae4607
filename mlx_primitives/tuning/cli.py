"""``mlxp-tune``: tune this machine, and inspect or move tuning databases.

Exit codes: 0 success, 1 failure (a broken database, a problem that could not be tuned),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mlx.core as mx

from .. import __version__, dispatch
from ..check import TUNED_DTYPES
from ..hardware import current_backend, detect_chip
from ..problem import parse_dtype
from ..record import RecordError, TuningRecord
from ..registry import Example, Op, ops
from ..registry import op as get_op
from ..store import shipped
from ..store.database import DatabaseError, TuningDB, default_user_url, exists, url_path
from .tuner import BUDGETS, CANDIDATE_TIMEOUT_S, EXIT_HUNG, Budget, Tuner

COMMANDS = ("tune", "list", "show", "explain", "export", "import", "doctor", "clear")


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def _console(stderr: bool = False):
    from rich.console import Console

    # Tables stay readable when the output is a pipe or a CI log.
    return Console(stderr=stderr, highlight=False, width=None if sys.stdout.isatty() else 140)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--shape {text!r} is not of the form AxBxC") from None
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"--shape {text!r} needs positive sizes")
    return dims


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--option {text!r} is not KEY=VALUE")
    if value.lower() in ("true", "false"):  # as Python spells them too
        return key, value.lower() == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, value


def _ops(names: list[str] | None) -> list[Op]:
    if not names:
        return ops()
    try:
        return [get_op(n) for n in names]
    except KeyError as e:
        raise UsageError(str(e).strip("'\"")) from None


def _example(args) -> Example:
    if not args.dtype:
        raise UsageError("--shape needs --dtype")
    try:
        parse_dtype(args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.dtype not in TUNED_DTYPES:
        raise UsageError(f"--dtype {args.dtype}: tuning covers {', '.join(TUNED_DTYPES)}")
    options = tuple(sorted(_parse_option(o) for o in args.option or []))
    return Example(tuple(_parse_shape(s) for s in args.shape), args.dtype, options)


def _open(args, *, create: bool) -> TuningDB:
    url = args.db if args.db else default_user_url()
    return TuningDB(url, create=create)


def _checked(entry) -> tuple[TuningRecord | None, str | None]:
    """A database record or an export's entry as a record that fits a registered op, or why
    it is not one."""
    try:
        rec = entry if isinstance(entry, TuningRecord) else TuningRecord.from_dict(entry)
        rec.problem_of(get_op(rec.op))
    except KeyError:
        return None, f"unknown op {str(entry.get('op') if isinstance(entry, dict) else '')[:64]!r}"
    except RecordError as e:
        return None, str(e)
    return rec, None


def _row(entry, source: str) -> dict:
    """A record as shown: with its speedup, whether it is stale, and why it is unusable."""
    rec, why = _checked(entry)
    if rec is None:
        shown = entry.to_dict() if isinstance(entry, TuningRecord) else dict(entry)
        return {**shown, "source": source, "invalid": why, "stale": True, "speedup": None}
    out = {**rec.to_dict(), "source": source, "invalid": None}
    out["stale"] = rec.stale(get_op(rec.op)) is not None
    out["speedup"] = rec.speedup if rec.median_s > 0 else None
    return out


def _records_table(title: str, rows: list[dict]):
    from rich.table import Table

    table = Table(title=title)
    for col in ("op", "problem", "variant", "params", "median", "default", "speedup"):
        table.add_column(
            col, justify="right" if col in ("median", "default", "speedup") else "left"
        )
    for r in rows:
        if r["invalid"]:
            table.add_row(
                str(r.get("op"))[:32],
                str(r.get("problem"))[:64],
                f"(invalid: {r['invalid'][:60]})",
                "-",
                "-",
                "-",
                "-",
            )
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(r["params"].items())) or "-"
        stale = " (stale)" if r["stale"] else ""
        table.add_row(
            r["op"],
            r["problem"].split("|", 2)[-1] + " " + r["problem"].split("|")[1],
            r["variant"] + stale,
            params,
            f"{r['median_s'] * 1e6:.1f} us",
            f"{r['default_median_s'] * 1e6:.1f} us",
            f"{r['speedup']:.2f}x",
        )
    return table


def cmd_tune(args) -> int:
    selected = _ops(args.op)
    budget = BUDGETS[args.preset]
    if args.trials is not None:
        if args.trials < 1:
            raise UsageError("--trials must be at least 1")
        budget = Budget(args.trials, budget.problem_s, budget.bench_s)
    if args.shape:
        if len(selected) != 1 or not args.op:
            raise UsageError("--shape tunes one problem of one --op")
        work = [(selected[0], _example(args))]
    else:
        work = [(o, ex) for o in selected for ex in o.presets.get(args.preset, [])]
    db = _open(args, create=True)
    tuner = Tuner(
        db, budget, seed=args.seed, force=args.force, candidate_timeout_s=args.candidate_timeout
    )
    deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget
    outcomes, failures, unstarted = [], [], 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_console(stderr=True), transient=args.json) as progress:
        task = progress.add_task(f"tuning {tuner.chip.name}", total=len(work))
        for o, ex in work:
            if deadline is not None and time.perf_counter() > deadline:
                unstarted += 1
                progress.advance(task)
                continue
            progress.update(task, description=f"{o.name} {ex.label()}")
            try:
                outcome = tuner.tune(o, ex)
            except (ValueError, TypeError) as e:  # an --shape or --option the op rejects
                raise UsageError(str(e)) from None
            if outcome.record is None and outcome.note != "already tuned":
                failures.append(outcome)
            outcomes.append(outcome)
            progress.advance(task)
    rows = [_row(o.record, "user") for o in outcomes if o.record is not None]
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
    else:
        con = _console()
        con.print(_records_table(f"Winners on {tuner.chip.name} ({tuner.chip.slug})", rows))
        skipped = sum(o.note == "already tuned" for o in outcomes)
        if skipped:
            con.print(f"{skipped} problems already tuned (use --force to re-tune them)")
        if unstarted:
            con.print(f"{unstarted} problems not started: --time-budget ran out")
        con.print(f"database: {db.url}")
    for f in failures:
        print(f"error: {f.op} {f.example.label()}: {f.note}", file=sys.stderr)
    return 1 if failures else 0


def cmd_list(args) -> int:
    backend = current_backend()
    chip = detect_chip(backend)
    rows = []
    for o in ops():
        for v in o.variants:
            rows.append(
                {
                    "op": o.name,
                    "variant": v.name,
                    "backends": sorted(v.backends),
                    "available": v.available(backend),
                    "configs": len(v.configs()),
                    "space": {k: list(vals) for k, vals in v.space.items()},
                    "kernel": v.is_kernel,
                    "description": v.description,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"Ops and variants (this chip: {chip.name}, back-end {backend})")
    for col in ("op", "variant", "backends", "here", "configs", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["op"],
            r["variant"],
            ",".join(r["backends"]),
            "yes" if r["available"] else "no",
            str(r["configs"]),
            r["description"],
        )
    _console().print(table)
    return 0


def cmd_show(args) -> int:
    chip = args.chip or detect_chip().slug
    user = []
    url = args.db or default_user_url()
    if exists(url):
        db = TuningDB(url, create=False)
        user = db.records(chip=None if chip == "all" else chip)
        db.close()
    pretuned = []
    for slug in shipped.chips() if chip == "all" else [chip]:
        if shipped.path(slug) is not None:
            pretuned.extend(r for r in shipped.read(shipped.path(slug)) if isinstance(r, dict))
    rows = [_row(r, "user") for r in user] + [_row(r, "pretuned") for r in pretuned]
    if args.op:
        rows = [r for r in rows if r["op"] in args.op]
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
        return 0
    con = _console()
    for source in ("user", "pretuned"):
        part = [r for r in rows if r["source"] == source]
        if part:
            con.print(_records_table(f"{source} records ({chip})", part))
    if not rows:
        con.print(f"no tuning records for {chip}; run `mlxp-tune` to tune this machine")
    return 0


def cmd_explain(args) -> int:
    o = _ops([args.op_name])[0]
    if not args.shape:
        raise UsageError("explain needs --shape for each array argument")
    ex = _example(args)
    try:
        call = o.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
        decision = dispatch.choose(o, o.problem(*call))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(decision.to_dict(), sort_keys=True))
    else:
        params = json.dumps(decision.params, sort_keys=True)
        print(f"{decision.op} {decision.problem} -> {decision.variant} {params}")
        print(f"source: {decision.source} ({decision.reason})")
    return 0


def cmd_export(args) -> int:
    db = _open(args, create=False)
    chip = None if args.chip in (None, "all") else args.chip
    records = db.records(chip=chip)
    shipped.write(args.path, records)
    print(f"exported {len(records)} records to {args.path}")
    return 0


def cmd_import(args) -> int:
    valid, skipped = [], []
    for entry in shipped.read(args.path):
        rec, why = _checked(entry)
        if rec is None:
            skipped.append(why)
        else:
            valid.append(rec)
    db = _open(args, create=True)
    for rec in valid:
        db.put(rec)
    dispatch.reset()
    print(f"imported {len(valid)} records into {db.url}")
    if skipped:
        print(f"skipped {len(skipped)} malformed records, e.g.: {skipped[0]}", file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    backend = current_backend()
    chip = detect_chip(backend)
    url = args.db or default_user_url()
    report = {
        "mlx_primitives": __version__,
        "mlx": mx.__version__,
        "backend": backend,
        "chip": chip.to_dict(),
        "user_db": {"url": url},
        "shipped_db": {"chips": shipped.chips(), "this_chip": chip.slug in shipped.chips()},
        "dispatch": dispatch.mode(),
    }
    status = 0
    if not exists(url):
        report["user_db"]["status"] = "absent (created by the first `mlxp-tune`)"
    else:
        try:
            db = TuningDB(url, create=False)
            records = db.records()
            report["user_db"].update(
                status="ok" if db.integrity_ok() else "integrity check failed",
                records=len(records),
                this_chip=sum(r.chip == chip.slug for r in records),
                stale=sum(_row(r, "user")["stale"] for r in records),
            )
            db.close()
        except DatabaseError as e:
            status = 1
            report["user_db"]["status"] = f"unusable: {e}"
            report["user_db"]["recover"] = (
                "dispatch ignores it and uses the shipped database or the defaults; "
                "`mlxp-tune clear` moves it aside and starts a new one"
            )
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        con = _console()
        for key, value in report.items():
            con.print(f"[bold]{key}[/bold]: {value}")
    return status


def cmd_clear(args) -> int:
    url = args.db or default_user_url()
    if not exists(url):
        print(f"nothing to clear: no database at {url}")
        return 0
    path = url_path(url)
    try:
        db = TuningDB(url, create=False)
    except DatabaseError as e:
        if path is None:
            raise
        aside = path.with_name(f"{path.name}.unusable-{int(time.time())}")
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(aside.with_name(aside.name + suffix))
        print(f"{path} was unusable ({e}); moved it to {aside}")
        return 0
    chip = None if args.chip == "all" else (args.chip or detect_chip().slug)
    n = db.clear(op=args.op, chip=chip)
    dispatch.reset()
    print(f"cleared {n} records" + (f" of {chip}" if chip else "") + f" from {db.url}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlxp-tune",
        description="Tune mlx-primitives' kernels on this machine and manage tuning databases.",
    )
    p.add_argument("--version", action="version", version=f"mlx-primitives {__version__}")
    sub = p.add_subparsers(dest="command")

    def add(name, help_, db=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if db:
            sp.add_argument(
                "--db",
                help="path or SQLAlchemy URL (default: $MLXP_TUNING_DB or the user data folder)",
            )
        return sp

    t = add("tune", "tune ops on this machine (the default command)")
    t.add_argument("--op", action="append", help="an op to tune (repeatable; default all)")
    t.add_argument("--preset", choices=list(BUDGETS), default="default")
    t.add_argument(
        "--trials",
        type=int,
        help="most candidates measured per problem (the default and each variant's first "
        "configuration always are)",
    )
    t.add_argument(
        "--time-budget",
        type=float,
        help="start no problem after this many seconds (one running ends)",
    )
    t.add_argument("--shape", action="append", help="one problem: array shapes AxB (with --dtype)")
    t.add_argument("--dtype", help="dtype of the --shape problem")
    t.add_argument("--option", action="append", help="op flag KEY=VALUE for --shape (layout=BSHD)")
    t.add_argument("--force", action="store_true", help="re-tune problems already tuned")
    t.add_argument(
        "--candidate-timeout",
        type=float,
        default=CANDIDATE_TIMEOUT_S,
        help="seconds after which a candidate is recorded as hung and tuning stops "
        f"(exit code {EXIT_HUNG}; the next run skips it)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true")

    ls = add("list", "ops, variants and which run on this chip", db=False)
    ls.add_argument("--json", action="store_true")

    sh = add("show", "tuned records (this chip's unless --chip says otherwise)")
    sh.add_argument("--op", action="append")
    sh.add_argument("--chip", help="a chip slug, or 'all'")
    sh.add_argument("--json", action="store_true")

    ex = add("explain", "which variant a call would get and why", db=False)
    ex.add_argument("op_name", metavar="OP")
    ex.add_argument("--shape", action="append", help="shapes of the op's array arguments, in order")
    ex.add_argument("--dtype", required=True)
    ex.add_argument("--option", action="append", help="op flag KEY=VALUE (layout=BSHD)")
    ex.add_argument("--json", action="store_true")

    ep = add("export", "write records to a JSON file")
    ep.add_argument("path")
    ep.add_argument("--chip", help="only this chip slug (default: all)")

    ip = add("import", "add the records of a JSON export to the database")
    ip.add_argument("path")

    dr = add("doctor", "check the installation, the chip and the databases")
    dr.add_argument("--json", action="store_true")

    cl = add("clear", "delete tuning records (this chip's unless --chip says otherwise)")
    cl.add_argument("--op", help="only this op's records")
    cl.add_argument("--chip", help="a chip slug, or 'all'")
    return p


HANDLERS = {
    "tune": cmd_tune,
    "list": cmd_list,
    "show": cmd_show,
    "explain": cmd_explain,
    "export": cmd_export,
    "import": cmd_import,
    "doctor": cmd_doctor,
    "clear": cmd_clear,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "tune")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except UsageError as e:
        parser.error(str(e))
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished problems are saved; run again to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
