"""Where the package's data folders are.

``kernel_variants/`` and ``tuning_db/`` sit at the top of the repository and are placed inside
the package in the wheel (pyproject.toml); a source checkout or an editable install finds them
beside the package.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@cache
def data_dir(name: str) -> Path:
    """The folder ``kernel_variants`` or ``tuning_db``, installed or in the checkout."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"[mlx_primitives] the data folder {name!r} is missing from the install"
    )


def kernel_source(rel: str) -> str:
    """The text of ``kernel_variants/<rel>``."""
    return (data_dir("kernel_variants") / rel).read_text()


def dialect_source() -> bytes:
    """The dialect layer (its tokens and both preludes): every kernel's hash covers it."""
    preludes = data_dir("kernel_variants") / "_dialect"
    parts = [(_PACKAGE / "dialect" / "render.py").read_bytes()]
    parts += [(preludes / name).read_bytes() for name in ("cuda.h", "metal.h")]
    return b"\n".join(parts)
