"""One process tunes into a database; a second process dispatches from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SECOND = """
import json, mlx.core as mx, mlx_primitives as mp
x, w = mx.random.normal((16, 128)), mx.ones((128,))
d = mp.explain("rms_norm", x, w, 1e-5)
y = mp.rms_norm(x, w, 1e-5)
ok = bool(mx.allclose(y, x * mx.rsqrt(mx.mean(x * x, -1, keepdims=True) + 1e-5), atol=1e-5))
print(json.dumps({"decision": d.to_dict(), "ok": ok}))
"""


def test_second_process_dispatches_from_the_first_ones_database(tmp_path):
    env = {**os.environ, "MLXP_TUNING_DB": str(tmp_path / "shared.sqlite")}
    env.pop("MLXP_DISPATCH", None)
    tune = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_primitives.tuning.cli",
            "tune",
            "--op",
            "rms_norm",
            "--shape",
            "16x128",
            "--dtype",
            "float32",
            "--preset",
            "quick",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert tune.returncode == 0, tune.stderr
    (record,) = json.loads(tune.stdout)
    second = subprocess.run(
        [sys.executable, "-c", SECOND],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["ok"]
    decision = result["decision"]
    assert decision["source"] == "user"
    assert (decision["variant"], decision["params"]) == (record["variant"], record["params"])
    assert (
        decision["problem"]
        == record["problem"]
        == "rms_norm|float32|rows=16,dims=128,weight=float32"
    )
    env["MLXP_DISPATCH"] = "default"
    bypass = subprocess.run(
        [sys.executable, "-c", SECOND],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert json.loads(bypass.stdout)["decision"]["source"] == "default"
