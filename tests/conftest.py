"""Every test gets its own empty user database and a fresh dispatcher."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_primitives import dispatch


def pytest_ignore_collect(collection_path, config):
    """tests/stress runs only when asked for by path (``pytest tests/stress``)."""
    if collection_path.name == "stress" and not any("stress" in str(a) for a in config.args):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if mx.cuda.is_available() or mx.metal.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU back-end (CUDA or Metal)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def user_db(tmp_path, monkeypatch):
    """The path of this test's user database (not created until something writes to it)."""
    path = tmp_path / "tuning.sqlite"
    monkeypatch.setenv("MLXP_TUNING_DB", str(path))
    monkeypatch.delenv("MLXP_DISPATCH", raising=False)
    dispatch.reset()
    yield path
    dispatch.reset()
