"""Processes that hammer one tuning database; run as ``python -m tests.stress.workloads``.

    write DB WORKER N    put N records (problems shared between workers) with their trials
    read DB SECONDS      dispatch and explain in a loop, re-reading the database each time
    tune DB SHAPE...     tune rms_norm at each shape with the CLI (one real tuning process)
    fleet URL CHIP LEASE SLOW ROWS...
                         one worker of a fleet: mlxp-tune over rms_norm at ROWS x 64 as chip
                         CHIP, with leases of LEASE seconds, each candidate SLOW seconds longer

Each prints one JSON line and exits 1 on any exception or database warning.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings


def _record(problem_rows: int, worker: int):
    import mlx.core as mx

    import mlx_primitives as mp
    from mlx_primitives.hardware import detect_chip
    from mlx_primitives.registry import op
    from mlx_primitives.tuning_record import TuningRecord

    x, w = mx.ones((problem_rows, 64)), mx.ones((64,))
    return TuningRecord(
        chip=detect_chip().slug,
        op="rms_norm",
        problem=op("rms_norm").problem(x, w, 1e-5).key,
        variant=("builtin", "eager", "compiled")[worker % 3],
        params={},
        median_s=1e-5 * (1 + worker),
        spread_s=1e-7,
        default_variant="builtin",
        default_params={},
        default_median_s=2e-5,
        error=0.0,
        mlx_version=mx.__version__,
        package_version=mp.__version__,
        source_hash="",
        created_at="2026-11-26T00:00:00+00:00",
    )


def write(db: str, worker: int, n: int) -> dict:
    from mlx_primitives.store.database import TuningDB

    handle = TuningDB(db)
    for i in range(n):
        rows = 2 ** (i % 16)  # 16 problems, written by every worker
        rec = _record(rows, worker)
        trial = {
            "op": "rms_norm",
            "problem": rec.problem,
            "variant": rec.variant,
            "params": {},
            "status": "pending",
        }
        tid = handle.add_trial(rec.chip, trial)
        handle.finish_trial(tid, {**trial, "status": "ok", "median_s": rec.median_s})
        handle.put(rec)
        if i % 10 == 9:  # also cold opens, as new processes do
            handle.close()
            handle = TuningDB(db)
    handle.close()
    return {"worker": worker, "written": n}


def read(db: str, seconds: float) -> dict:
    import os

    import mlx.core as mx

    import mlx_primitives as mp
    from mlx_primitives import dispatch

    os.environ["MLXP_TUNING_DB"] = db
    deadline = time.time() + seconds
    sources: dict[str, int] = {}
    calls = 0
    while time.time() < deadline:
        dispatch.reset()
        for rows in (1, 3, 64, 1000):
            x, w = mx.ones((rows, 64)), mx.ones((64,))
            d = mp.explain("rms_norm", x, w, 1e-5)
            sources[d.source] = sources.get(d.source, 0) + 1
            mx.eval(mp.rms_norm(x, w, 1e-5))
            calls += 1
    return {"calls": calls, "sources": sources}


def tune(db: str, *shapes: str) -> dict:
    from mlx_primitives.tuning.cli import main

    codes = []
    for shape in shapes:
        codes.append(
            main(
                [
                    "tune",
                    "--op",
                    "rms_norm",
                    "--shape",
                    shape,
                    "--dtype",
                    "float32",
                    "--preset",
                    "quick",
                    "--trials",
                    "3",
                    "--db",
                    db,
                    "--json",
                ]
            )
        )
    if any(codes):
        raise RuntimeError(f"mlxp-tune exit codes {codes}")
    return {"tuned": len(shapes)}


def fleet(url: str, chip: str, lease: str, slow: str, *rows: str) -> dict:
    """One worker of a fleet sharing ``url``: ``mlxp-tune tune`` over rms_norm at each of
    ``rows`` x 64 (the quick preset made of them), as the chip ``chip`` (this machine's chip
    renamed, so that workers of two chips share one machine), holding leases of ``lease``
    seconds; each candidate takes ``slow`` seconds more (a worker to kill mid-problem)."""
    import dataclasses

    from mlx_primitives import hardware
    from mlx_primitives.registry import Example, op
    from mlx_primitives.tuning.cli import main as tune
    from mlx_primitives.tuning.tuner import Tuner

    detect = hardware._detect
    hardware._detect = lambda backend: dataclasses.replace(detect(backend), name=chip)
    op("rms_norm").presets["quick"] = [Example(((int(r), 64),), "float32") for r in rows]
    evaluate = Tuner._evaluate

    def slowed(self, *args, **kwargs):
        time.sleep(float(slow))
        return evaluate(self, *args, **kwargs)

    Tuner._evaluate = slowed
    argv = ["tune", "--op", "rms_norm", "--preset", "quick", "--trials", "3", "--db", url]
    code = tune([*argv, "--lease", lease, "--json"])
    if code:
        raise RuntimeError(f"mlxp-tune exit code {code}")
    return {"chip": hardware.detect_chip().slug}


def main(argv: list[str]) -> int:
    name, db, *rest = argv
    warnings.simplefilter("error")  # a database warning (e.g. ignored as unreadable) fails
    try:
        if name == "write":
            out = write(db, int(rest[0]), int(rest[1]))
        elif name == "read":
            out = read(db, float(rest[0]))
        elif name == "fleet":
            out = fleet(db, *rest)
        else:
            out = tune(db, *rest)
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
