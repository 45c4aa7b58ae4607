"""Running ``mlxp-tune`` in the test's process, for the CLI and fleet tests."""

from __future__ import annotations

import json

from mlx_primitives.tuning.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``mlxp-tune *argv``: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    """``mlxp-tune *argv --json``, which must succeed: its parsed output."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)
