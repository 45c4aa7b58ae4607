"""The wheel ships kernel_variants/ and tuning_db/ inside the package and imports from a clean
virtual environment; a source checkout or editable install finds them beside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from mlx_primitives import _paths

ROOT = Path(__file__).resolve().parent.parent


def test_data_folders_found_from_this_install():
    for name in ("kernel_variants", "tuning_db"):
        assert _paths.data_dir(name).is_dir()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    (whl,) = out.glob("mlx_primitives-*.whl")
    return whl


def test_wheel_contains_the_data_folders(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("mlx_primitives/kernel_variants/") for n in names)
    assert any(n.startswith("mlx_primitives/tuning_db/") for n in names)
    assert "mlx_primitives/tuning/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "mlxp-tune = mlx_primitives.tuning.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    )


def test_wheel_imports_from_a_clean_venv(wheel, tmp_path):
    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # The dependencies come from this environment's site-packages; PYTHONPATH entries do not
    # run .pth files, so an editable install of the checkout stays out of the way.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    check = (
        "import mlx_primitives as mp, mlx.core as mx; from mlx_primitives import _paths;"
        "print(mp.__file__); print(_paths.data_dir('kernel_variants'));"
        "print(mp.rms_norm(mx.ones((2, 8)), None).shape)"
    )
    out = subprocess.run(
        [py, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr
    module, kernels, shape = out.stdout.split("\n")[:3]
    assert module.startswith(site) and kernels.startswith(site)
    assert shape == "(2, 8)"
