"""``mlxp-tune``: tune this machine, and inspect or move tuning databases.

Exit codes: 0 success, 1 failure (a broken database, a problem that could not be tuned),
2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .. import __version__, dispatch
from ..check import TUNED_DTYPES
from ..hardware import current_backend, detect_chip
from ..problem import Problem, parse_dtype
from ..registry import Example, Op, ops
from ..registry import op as get_op
from ..store import as_url, shipped
from ..store.database import (
    DatabaseError,
    TuningDB,
    default_user_url,
    exists,
    shown_url,
    url_path,
)
from ..store.leases import DEFAULT_LEASE_S, MIN_LEASE_S, Leases
from ..tuning_record import RecordError, TuningRecord
from .progress import TuneProgress
from .tuner import BUDGETS, CANDIDATE_TIMEOUT_S, EXIT_HUNG, Outcome, Tuner

COMMANDS = (
    "tune", "list", "show", "explain", "hits", "report", "export", "import", "merge", "doctor",
    "clear",
)  # fmt: skip


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def _count(text: str) -> int:
    """An argument that counts something: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _seconds(text: str) -> float:
    """An argument in seconds: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _budget(text: str) -> float:
    """A time budget in seconds: a finite number, at least 0 (0: start nothing)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be at least 0 seconds, got {text}")
    return value


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
    if args.dtype not in TUNED_DTYPES:
        raise UsageError(f"--dtype {args.dtype}: tuning covers {', '.join(TUNED_DTYPES)}")
    options = tuple(sorted(_parse_option(o) for o in args.option or []))
    return Example(tuple(_parse_shape(s) for s in args.shape), args.dtype, options)


def _call(o: Op, ex: Example) -> tuple:
    """The arguments of the call ``ex`` describes, checked by the op: each shape given is the
    shape of the array argument in its place, and each option one the op takes."""
    takes = list(inspect.signature(o._example).parameters)[3:]  # after shapes, dtype, key
    unknown = [k for k, _ in ex.options if k not in takes]
    if unknown:
        raise UsageError(f"[{o.name}] no option {unknown[0]!r}; it takes {', '.join(takes)}")
    try:
        call = o.example(ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options))
        arrays = [a for a in call if isinstance(a, mx.array)]
        if len(ex.shapes) > len(arrays):
            raise ValueError(f"[{o.name}] takes {len(arrays)} arrays, got {len(ex.shapes)} shapes")
        for i, (shape, a) in enumerate(zip(ex.shapes, arrays)):
            if tuple(a.shape) != tuple(shape):
                raise ValueError(
                    f"[{o.name}] --shape {'x'.join(map(str, shape))} does not fit its array "
                    f"argument {i + 1}, which the op makes {'x'.join(map(str, a.shape))}"
                )
        o.problem(*call)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return call


def _url(args) -> str:
    """The database a command works on: ``--db`` (a path or URL), else the user's."""
    return as_url(args.db) if args.db else default_user_url()


def _open(args, *, create: bool) -> TuningDB:
    url = _url(args)
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
    """A record as shown: with its speedup and how sure it is (``speedup_low``), whether it is
    stale, and why it is unusable."""
    rec, why = _checked(entry)
    if rec is None:
        shown = entry.to_dict() if isinstance(entry, TuningRecord) else dict(entry)
        return {
            **shown,
            "source": source,
            "invalid": why,
            "stale": True,
            "speedup": None,
            "speedup_low": None,
        }
    out = {**rec.to_dict(), "source": source, "invalid": None}
    out["stale"] = rec.stale(get_op(rec.op)) is not None
    out["speedup"] = rec.speedup if rec.median_s > 0 else None
    out["speedup_low"] = rec.speedup_low if rec.median_s > 0 else None
    return out


def _fields(row: dict, chip: bool) -> list[str]:
    """What tells a row apart, as short fields: its chip (where the rows are of several), its
    dtype and the problem key's dims (the op is its table's); the whole key where it is not of
    the op|dtype|dims form."""
    key = str(row.get("problem"))
    parts = key.split("|")
    fields = [parts[1], *parts[2].split(",")] if len(parts) == 3 else [key]
    return [str(row.get("chip")), *fields] if chip else fields


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _records_tables(title: str, rows: list[dict]) -> list:
    """One table per op. The fields of the problem that all its rows share are shown once, in
    the caption; each row shows the rest, which wrap and are never cut."""
    from rich.table import Table

    chips = len({r.get("chip") for r in rows}) > 1
    by_op: dict[str, list[dict]] = {}
    for r in rows:
        by_op.setdefault(str(r.get("op"))[:64], []).append(r)
    tables = []
    for op_name, part in by_op.items():
        fields = [_fields(r, chips) for r in part]
        shared = []
        if len(part) > 1:
            shared = [f for f in fields[0] if all(f in other for other in fields[1:])]
        table = Table(
            title=f"{title}: {op_name}",
            caption=f"every row: {' '.join(shared)}" if shared else None,
            caption_justify="left",
        )
        table.add_column("problem", overflow="fold", ratio=3)
        table.add_column("variant", overflow="fold", ratio=2)
        for col in ("median", "default", "speedup", "at least"):
            table.add_column(col, justify="right", no_wrap=True)
        for r, own in zip(part, fields):
            problem = " ".join(f for f in own if f not in shared) or "-"
            if r["invalid"]:
                table.add_row(problem, f"(invalid: {r['invalid'][:60]})", "-", "-", "-", "-")
                continue
            params = " ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
            variant = r["variant"] + (f" {params}" if params else "")
            kept = r["variant"] == r["default_variant"] and r["params"] == r["default_params"]
            table.add_row(
                problem,
                variant + (" (stale)" if r["stale"] else ""),
                f"{r['median_s'] * 1e6:.1f} us",
                f"{r['default_median_s'] * 1e6:.1f} us",
                _times(r["speedup"]),
                "-" if kept else _times(r["speedup_low"]),
            )
        tables.append(table)
    return tables


def _result(outcome: Outcome, seconds: float) -> str:
    """One problem's outcome in a line."""
    rec = outcome.record
    if rec is None:
        return outcome.note
    params = ",".join(f"{k}={v}" for k, v in sorted(rec.params.items()))
    chosen = f"{rec.variant}({params})" if params else rec.variant
    if rec.kept_default:
        text = f"{chosen}, {outcome.note}" if outcome.note else chosen
    else:
        text = f"{chosen} {rec.speedup:.2f}x, at least {rec.speedup_low:.2f}x ({outcome.note})"
    return f"{text} [{seconds:.1f} s]"


def _hits(db: TuningDB, chip: str) -> list[dict]:
    """The chip's recorded problems, each with its op, problem and current decision on that
    chip (with ``db`` as the user database); problems of ops or dims this version lacks left
    out."""
    rows = []
    with _user_database(db.url):
        for hit in db.hits(chip):
            try:
                o = get_op(hit["op"])
                problem = Problem.parse(hit["problem"], o.dims)
            except (KeyError, ValueError):
                continue
            decision = dispatch.choose(o, problem, chip)
            rows.append({**hit, "op_": o, "problem_": problem, "decision": decision})
    return rows


def _default_s(o: Op, problem: Problem) -> float:
    """The op's default's time on a call of ``problem`` (a short measurement)."""
    from .timing import bench_many

    shapes, options = o.case(problem.as_dict())
    args = o.example(shapes, parse_dtype(problem.dtype), mx.random.key(0), **options)
    name, params = o.default(problem)
    fn = o.variant(name).positional(**params)
    return bench_many([(fn, args, {})], budget_s=0.05, max_reps=20, feed=o.feed)[0].median_s


def _recorded_work(db: TuningDB, chip: str, top: int | None) -> list[tuple[Op, Example]]:
    """The recorded problems that no record of their own serves, the most costly first
    (calls times the default's time)."""
    todo = [h for h in _hits(db, chip) if h["decision"].source in ("nearest", "default")]
    left = [h for h in todo if h["problem_"].dtype not in TUNED_DTYPES]
    for h in left:
        print(f"not tuned: {h['problem']} (the tuner takes {', '.join(TUNED_DTYPES)})",
              file=sys.stderr)  # fmt: skip
    todo = [h for h in todo if h not in left]
    costed = []
    for h in todo:
        o, problem = h["op_"], h["problem_"]
        shapes, options = o.case(problem.as_dict())
        example = Example(tuple(map(tuple, shapes)), problem.dtype, tuple(options.items()))
        costed.append((h["calls"] * _default_s(o, problem), o, example))
    costed.sort(key=lambda c: -c[0])
    return [(o, ex) for _, o, ex in costed[:top]]


def cmd_hits(args) -> int:
    db = _open(args, create=False)
    chip = args.chip or detect_chip().slug
    try:
        hits = _hits(db, chip)
    finally:
        db.close()
    rows = [
        {
            "op": h["op"],
            "problem": h["problem"],
            "calls": h["calls"],
            "variant": h["decision"].variant,
            "params": h["decision"].params,
            "source": h["decision"].source,
            "last_seen": h["last_seen"],
        }
        for h in hits
    ]
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
        return 0
    from rich.table import Table

    table = Table(title=f"Recorded problems on {chip} (most called first)")
    for col in ("calls", "problem", "served by", "source"):
        table.add_column(col)
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        table.add_row(
            str(r["calls"]), r["problem"], f"{r['variant']} {params}".strip(), r["source"]
        )
    con = _console()
    con.print(table)
    if not rows:
        con.print(
            "nothing recorded: run your program inside `with mp.record():` or with MLXP_RECORD=1"
        )
    return 0


def cmd_tune(args) -> int:
    selected = _ops(args.op)
    preset = args.preset or "default"
    budget = BUDGETS[preset]
    if args.trials is not None:
        if args.trials < 1:
            raise UsageError("--trials must be at least 1")
        budget = dataclasses.replace(budget, trials=args.trials)
    if args.top is not None and (not args.recorded or args.top < 1):
        raise UsageError("--top N (N >= 1) goes with --recorded")
    if args.recorded and (args.shape or args.op):
        raise UsageError("--recorded tunes what was recorded: no --op or --shape with it")
    if not args.lease >= MIN_LEASE_S:
        raise UsageError(f"--lease must be at least {MIN_LEASE_S:g} seconds")
    if args.shape:
        if len(selected) != 1 or not args.op:
            raise UsageError("--shape tunes one problem of one --op")
        work = [(selected[0], _example(args))]
        _call(*work[0])
    elif args.recorded:
        with_hits = _open(args, create=True)
        try:
            work = _recorded_work(with_hits, detect_chip().slug, args.top)
        finally:
            with_hits.close()
    else:
        work = [(o, ex) for o in selected for ex in o.presets.get(preset, [])]
    db = _open(args, create=True)
    tuner = Tuner(
        db,
        budget,
        seed=args.seed,
        force=args.force,
        candidate_timeout_s=args.candidate_timeout,
        leases=Leases(db, seconds=args.lease),
    )
    chosen = "" if args.preset else " (the default; --preset quick|default|full chooses)"
    print(
        f"mlxp-tune: {len(work)} problems of {len({o.name for o, _ in work})} ops on "
        f"{tuner.chip.name} ({tuner.chip.slug}), preset {preset}{chosen}, into {db.shown}",
        file=sys.stderr,
        flush=True,
    )
    deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget
    outcomes, failures, unstarted = [], [], 0
    progress = TuneProgress(
        len(work), _console(stderr=True), transient=args.json, deadline=deadline
    )
    tuner.on_candidate = progress.candidate

    def attempt(o: Op, ex: Example, force: bool | None = None) -> Outcome | None:
        """One try at a problem; where another worker holds its lease, the outcome that says
        so (try again later), else None."""
        nonlocal unstarted
        what = f"{o.name} {ex.label()}"
        if deadline is not None and time.perf_counter() > deadline:
            unstarted += 1
            progress.finish(what, "not started: --time-budget ran out")
            return None
        progress.start(what)
        begun = time.perf_counter()
        if args.shape:  # an --shape or --option the op rejects is a usage error
            try:
                o.problem(
                    *o.example(
                        ex.shapes, parse_dtype(ex.dtype), mx.random.key(0), **dict(ex.options)
                    )
                )
            except (ValueError, TypeError) as e:
                raise UsageError(str(e)) from None
        outcome = tuner.tune(o, ex, force=force)
        if outcome.held:
            return outcome
        if outcome.record is None and outcome.note != "already tuned":
            failures.append(outcome)
        outcomes.append(outcome)
        progress.finish(what, _result(outcome, time.perf_counter() - begun))
        return None

    def written(o: Op, problem: str) -> str | None:
        """When the problem's record on this chip was written (None: it has none)."""
        found = [r for r in db.records(tuner.chip.slug, o.name) if r.problem == problem]
        return found[0].created_at if found else None

    with progress:
        held = []
        for o, ex in work:
            busy = attempt(o, ex)
            if busy is not None:
                print(f"{o.name} {ex.label()}: {busy.note}", file=sys.stderr, flush=True)
                held.append((o, ex, busy.problem, written(o, busy.problem)))
        if held:
            print(
                f"mlxp-tune: {len(held)} problems are held by other workers: waiting until they "
                "finish them, or their leases expire and this worker takes them over",
                file=sys.stderr,
                flush=True,
            )
        while held:
            time.sleep(min(5.0, args.lease / 4))
            # What the holder finished (a record written since) is done: not tuned again here,
            # whatever --force says; what it left (it died) is taken over as asked.
            held = [
                (o, ex, problem, before)
                for o, ex, problem, before in held
                if attempt(o, ex, force=None if written(o, problem) == before else False)
                is not None
            ]
    rows = [_row(o.record, "user") for o in outcomes if o.record is not None]
    noisy = [o for o in outcomes if o.noisy]
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
    else:
        con = _console()
        for table in _records_tables(f"Winners on {tuner.chip.name} ({tuner.chip.slug})", rows):
            con.print(table)
        skipped = sum(o.note == "already tuned" for o in outcomes)
        if skipped:
            con.print(f"{skipped} problems already tuned (use --force to re-tune them)")
        if unstarted:
            con.print(f"{unstarted} problems not started: --time-budget ran out")
        con.print(f"database: {db.shown}")
    if noisy:
        print(
            f"{len(noisy)} problems this machine was too noisy to decide: their defaults are "
            "kept (tune them again with --force when it is quieter):",
            file=sys.stderr,
        )
        for o in noisy:
            print(f"  {o.op} {o.example.label()}: {o.note}", file=sys.stderr)
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
    _ops(args.op)  # an unknown op is a usage error
    chip = args.chip or detect_chip().slug
    user = []
    url = _url(args)
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
            for table in _records_tables(f"{source} records ({chip})", part):
                con.print(table)
    if not rows:
        con.print(f"no tuning records for {chip}; run `mlxp-tune` to tune this machine")
    return 0


@contextmanager
def _user_database(url: str | None):
    """Dispatch reads ``url`` as the user database while inside (``MLXP_TUNING_DB``)."""
    if url is None:
        yield
        return
    before = os.environ.get("MLXP_TUNING_DB")
    os.environ["MLXP_TUNING_DB"] = url
    dispatch.reset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLXP_TUNING_DB"]
        else:
            os.environ["MLXP_TUNING_DB"] = before
        dispatch.reset()


def cmd_explain(args) -> int:
    o = _ops([args.op_name])[0]
    if not args.shape:
        raise UsageError("explain needs --shape for each array argument")
    call = _call(o, _example(args))
    with _user_database(args.db):
        decision = dispatch.choose(o, o.problem(*call))
    if args.json:
        print(json.dumps(decision.to_dict(), sort_keys=True))
    else:
        params = json.dumps(decision.params, sort_keys=True)
        print(f"{decision.op} {decision.problem} -> {decision.variant} {params}")
        print(f"source: {decision.source} ({decision.reason})")
    return 0


def cmd_report(args) -> int:
    from . import report  # matplotlib, only for this command
    from .report_figures import MissingExtra

    selected = _ops(args.op)
    chip = args.chip or detect_chip().slug
    url = _url(args)
    if args.png:
        os.makedirs(args.png, exist_ok=True)
    try:
        with _user_database(url):
            sections = report.collect(url, chip, selected)
            text, pngs = report.page(sections, chip, url, Path(args.png) if args.png else None)
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    Path(args.output).write_text(text)
    figures = f", {len(pngs)} PNG figures in {args.png}" if args.png else ""
    print(f"wrote {args.output}: {len(sections)} sections (chip and op){figures}")
    return 0


def cmd_export(args) -> int:
    db = _open(args, create=False)
    chip = None if args.chip in (None, "all") else args.chip
    records = db.records(chip=chip)
    shipped.write(args.path, records)
    print(f"exported {len(records)} records to {args.path}")
    return 0


def cmd_import(args) -> int:
    from .merge import fold

    valid, skipped = [], []
    for entry in shipped.read(args.path):
        rec, why = _checked(entry)
        if rec is None:
            skipped.append(why)
        else:
            valid.append((rec, str(args.path)))
    db = _open(args, create=True)
    try:
        merge = fold(db, valid)  # a record of a problem the database holds: merge's rule
    finally:
        db.close()
    dispatch.reset()
    print(
        f"imported {merge.count('added') + merge.count('replaced')} records into {db.shown} "
        f"({merge.count('added')} added, {merge.count('replaced')} replaced, "
        f"{merge.count('kept')} kept the database's own, which ranks higher)"
    )
    if skipped:
        print(f"skipped {len(skipped)} malformed records, e.g.: {skipped[0]}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from .merge import fold

    incoming, rejected, unreadable = [], [], []
    for path in args.files:
        try:
            entries = shipped.read(path)
        except DatabaseError as e:
            unreadable.append(str(e))
            continue
        for entry in entries:
            rec, why = _checked(entry)
            if rec is None:
                rejected.append(f"{path}: {why}")
            else:
                incoming.append((rec, path))
    db = _open(args, create=True)
    try:
        merge = fold(db, incoming)
    finally:
        db.close()
    dispatch.reset()
    for kind, line in merge.lines:
        print(f"{kind}: {line}")
    for line in rejected:
        print(f"rejected: {line}")
    print(
        f"merged into {db.shown}: {merge.count('added')} added, {merge.count('replaced')} "
        f"replaced, {merge.count('kept')} kept, {len(rejected)} rejected"
    )
    for error in unreadable:
        print(f"error: {error}", file=sys.stderr)
    return 1 if unreadable else 0


def cmd_doctor(args) -> int:
    backend = current_backend()
    chip = detect_chip(backend)
    url = _url(args)
    report = {
        "mlx_primitives": __version__,
        "mlx": mx.__version__,
        "backend": backend,
        "chip": chip.to_dict(),
        "user_db": {"url": shown_url(url)},
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
        print(_doctor_text(report))
    return status


def _doctor_text(report: dict) -> str:
    """``doctor``'s report as lines a person reads."""
    chip, user, ship = report["chip"], report["user_db"], report["shipped_db"]
    about = [chip["arch"] or chip["family"]]
    if chip.get("gpu_cores"):
        about.append(f"{chip['gpu_cores']} GPU cores")
    if chip.get("cpu_cores"):
        about.append(f"{chip['cpu_cores']} CPU cores")
    if chip.get("memory_bytes"):
        about.append(f"{chip['memory_bytes'] / 2**30:.0f} GiB")
    lines = [
        f"mlx-primitives {report['mlx_primitives']}, MLX {report['mlx']}, "
        f"back-end {report['backend']}",
        f"chip:             {chip['name']} ({chip['slug']}): {', '.join(a for a in about if a)}",
        f"dispatch:         {report['dispatch']} (MLXP_DISPATCH)",
        f"user database:    {user['url']}",
        f"  status:         {user['status']}",
    ]
    if "records" in user:
        lines.append(
            f"  records:        {user['records']}, {user['this_chip']} of this chip, "
            f"{user['stale']} stale or invalid"
        )
    if "recover" in user:
        lines.append(f"  recover:        {user['recover']}")
    lines.append(
        f"shipped records:  {', '.join(ship['chips']) or 'none'} "
        f"({'this chip is among them' if ship['this_chip'] else 'none for this chip'})"
    )
    return "\n".join(lines)


def cmd_clear(args) -> int:
    url = _url(args)
    if not exists(url):
        print(f"nothing to clear: no database at {shown_url(url)}")
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
    names = [o.name for o in _ops(args.op)] if args.op else [None]
    n = sum(db.clear(op=name, chip=chip) for name in names)
    dispatch.reset()
    of = " and ".join(filter(None, (", ".join(args.op or []), chip)))
    print(f"cleared {n} records" + (f" of {of}" if of else "") + f" from {db.shown}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlxp-tune",
        description="Tune mlx-primitives' kernels on this machine and manage tuning databases. "
        "With no command, tunes (`mlxp-tune` alone runs the default preset).",
    )
    p.add_argument("--version", action="version", version=f"mlx-primitives {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.commands = sub.choices  # each command's parser: its usage goes with its errors

    def add(name, help_, db=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if db:
            sp.add_argument(
                "--db",
                metavar="PATH_OR_URL",
                help="path or SQLAlchemy URL (default: $MLXP_TUNING_DB or the user data folder)",
            )
        return sp

    def as_json(sp, what):
        sp.add_argument("--json", action="store_true", help=f"print {what} as JSON")

    t = add("tune", "tune ops on this machine (the default command)")
    t.add_argument("--op", action="append", help="an op to tune (repeatable; default all)")
    t.add_argument(
        "--preset",
        choices=list(BUDGETS),
        help="which problems and how hard: quick (minutes on a CPU), default (the shapes of "
        "common LLMs; the default), full (more shapes, more candidates)",
    )
    t.add_argument(
        "--trials",
        type=_count,
        help="most candidates measured per problem (the default and each variant's first "
        "configuration always are)",
    )
    t.add_argument(
        "--time-budget",
        type=_budget,
        metavar="SECONDS",
        help="start no problem after this many seconds (one running ends)",
    )
    t.add_argument(
        "--shape",
        action="append",
        metavar="AxB",
        help="one problem: the shape of each array argument, in order (with --dtype)",
    )
    t.add_argument("--dtype", help="dtype of the --shape problem (float32, float16, bfloat16)")
    t.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="op flag for --shape (layout=BSHD; repeatable)",
    )
    t.add_argument(
        "--recorded",
        action="store_true",
        help="tune the problems recorded on this chip (mp.record, MLXP_RECORD=1) that no "
        "record of their own serves, the most costly first (calls x the default's time)",
    )
    t.add_argument("--top", type=_count, metavar="N", help="with --recorded: only the N costliest")
    t.add_argument("--force", action="store_true", help="re-tune problems already tuned")
    t.add_argument(
        "--candidate-timeout",
        type=_seconds,
        default=CANDIDATE_TIMEOUT_S,
        metavar="SECONDS",
        help="seconds after which a candidate is recorded as hung and tuning stops "
        f"(exit code {EXIT_HUNG}; the next run skips it)",
    )
    t.add_argument(
        "--seed",
        type=_count,
        default=0,
        help="seed of the search and of the timing inputs (default 0)",
    )
    t.add_argument(
        "--lease",
        type=_seconds,
        default=DEFAULT_LEASE_S,
        metavar="SECONDS",
        help="how long this worker's claim on a problem holds without its heartbeat: workers "
        "sharing a database skip the problems others hold, and take over those of a worker "
        f"that died after this long (default {DEFAULT_LEASE_S:g})",
    )
    as_json(t, "the records made (instead of tables)")

    ls = add("list", "ops, variants and which run on this chip", db=False)
    as_json(ls, "the variants")

    sh = add("show", "tuned records (this chip's unless --chip says otherwise)")
    sh.add_argument("--op", action="append", help="only this op's records (repeatable)")
    sh.add_argument("--chip", help="a chip slug, or 'all' (default: this chip)")
    as_json(sh, "the records, each with speedup, speedup_low and stale")

    ex = add("explain", "which variant a call would get and why")
    ex.add_argument("op_name", metavar="OP", help="the op's name (mlxp-tune list)")
    ex.add_argument(
        "--shape",
        action="append",
        metavar="AxB",
        help="shapes of the op's array arguments, in signature order (repeatable)",
    )
    ex.add_argument("--dtype", required=True, help="dtype of the arrays")
    ex.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="op flag (layout=BSHD; repeatable)"
    )
    as_json(ex, "the decision")

    hi = add("hits", "problems recorded on this chip, with what serves each now")
    hi.add_argument("--chip", help="a chip slug (default: this chip)")
    as_json(hi, "the recorded problems")

    rp = add("report", "an HTML page of the tuning records with plots (the report extra)")
    rp.add_argument("--op", action="append", help="only this op (repeatable; default all)")
    rp.add_argument("--chip", help="a chip slug, or 'all' (default: this chip)")
    rp.add_argument("-o", "--output", required=True, metavar="PATH", help="the HTML file to write")
    rp.add_argument("--png", metavar="DIR", help="also write each figure as a PNG into DIR")

    ep = add("export", "write records to a JSON file")
    ep.add_argument("path", help="the JSON file to write")
    ep.add_argument("--chip", help="only this chip slug (default: all)")

    ip = add(
        "import",
        "add the records of a JSON export to the database; of two records of one problem "
        "the one merge's rule ranks higher stays",
    )
    ip.add_argument("path", help="a JSON export (mlxp-tune export, or tuning_db/<chip>.json)")

    mg = add(
        "merge",
        "fold the exports of a fleet into the database; of two records of one problem the "
        "current one stays, then the larger speedup_low, then the later",
    )
    mg.add_argument("files", nargs="+", metavar="FILE", help="JSON exports (mlxp-tune export)")

    dr = add("doctor", "check the installation, the chip and the databases")
    as_json(dr, "the report")

    cl = add("clear", "delete tuning records (this chip's unless --chip says otherwise)")
    cl.add_argument("--op", action="append", help="only this op's records (repeatable)")
    cl.add_argument("--chip", help="a chip slug, or 'all' (default: this chip)")
    return p


HANDLERS = {
    "tune": cmd_tune,
    "list": cmd_list,
    "show": cmd_show,
    "explain": cmd_explain,
    "hits": cmd_hits,
    "report": cmd_report,
    "export": cmd_export,
    "import": cmd_import,
    "merge": cmd_merge,
    "doctor": cmd_doctor,
    "clear": cmd_clear,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "tune")
    parser = _parser()
    args = parser.parse_args(argv)
    # What timeout(1) and job schedulers send stops a run as Ctrl-C does: the candidate being
    # measured is marked interrupted (tried again next time), its lease released.
    terminated = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return HANDLERS[args.command](args)
    except UsageError as e:
        parser.commands.get(args.command, parser).error(str(e))
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished problems are saved; run again to resume", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader left (| head): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a path to write that cannot be (a missing folder, a directory)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, terminated)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
