"""The long reliability tests (``pytest tests/stress``): many processes, many crashes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

from mlx_primitives.problem import bucket
from mlx_primitives.store.database import EmptyDatabaseError

from .harness import ROOT, check_database, concurrent, finish, spawn


def test_eight_tuners_and_eight_dispatchers(tmp_path):
    """8 real tuning processes (overlapping problems) and 8 dispatching processes at once."""
    db = tmp_path / "shared.sqlite"
    shapes = ["1x64", "3x64", "64x64", "1000x64", "5x64", "17x64"]
    picks = [random.Random(i).sample(shapes, 3) for i in range(8)]
    procs = [spawn("tune", str(db), *p) for p in picks]
    procs += [spawn("read", str(db), "40") for _ in range(8)]
    results = finish(procs, timeout=900)
    assert sum(r.get("tuned", 0) for r in results) == 24
    buckets = {bucket(int(s.split("x")[0])) for p in picks for s in p}
    check_database(db, len(buckets))


def test_many_writers_and_readers_at_the_database_level(tmp_path):
    db = tmp_path / "shared.sqlite"
    concurrent(db, writers=8, readers=8, writes=120, read_s=20)
    check_database(db, problems=16)


def test_tuner_killed_at_random_moments_resumes(tmp_path, open_db):
    """SIGKILL mlxp-tune at random moments; the database stays whole and the next run
    finishes the rest without redoing finished problems."""
    db = tmp_path / "crash.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "mlx_primitives.tuning.cli",
        "tune",
        "--preset",
        "quick",
        "--op",
        "rms_norm",
        "--op",
        "layer_norm",
        "--op",
        "swiglu",
        "--db",
        str(db),
    ]
    rng = random.Random(7)
    for _ in range(10):
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if db.exists():
            try:
                handle = open_db(db, create=False)
            except EmptyDatabaseError:  # killed while creating it: nothing lost
                continue
            assert handle.integrity_ok()
            handle.close()
    done = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    check_database(db, problems=12)


def test_agreement_of_two_tuning_runs_is_reported(capsys):
    """Two full quick-preset runs: the report says how often winners differ, and why."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("agreement", ROOT / "tools" / "agreement.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    report = tool.run_twice("quick", None)
    print(json.dumps(report, indent=1))
    assert report["problems"] >= 20
    assert len(report["details"]) == report["disagreements"]
    for d in report["details"]:  # a disagreement is between two measured, usable winners
        for run in d["runs"]:
            assert run["median_s"] > 0 and run["default_median_s"] > 0


def test_blocked_attention_peak_memory_at_16384():
    """Blocked flash attention at 16384 positions (8 heads of 128, float16, 128x128 blocks)
    peaks within 1.5x the bytes of q, k, v and the output; dense scores would need 8 GiB."""
    import mlx.core as mx

    from mlx_primitives.registry import op

    q, k, v = (mx.random.normal((1, 8, 16384, 128)).astype(mx.float16) for _ in range(3))
    mx.eval(q, k, v)
    fn = op("flash_attention").variant("blocked").build(block_q=128, block_k=128)
    mx.reset_peak_memory()
    out = fn(q, k, v, causal=True)
    mx.eval(out)
    io = 3 * q.nbytes + out.nbytes
    assert mx.get_peak_memory() <= 1.5 * io, mx.get_peak_memory() / io
