"""Serve unmodified programs: the tuned ops installed in ``mx.fast``.

``patch_mlx()`` replaces ``mx.fast.rms_norm``, ``layer_norm``, ``rope`` and
``scaled_dot_product_attention`` with this library's functions, which take every argument
MLX's take, so that models calling MLX (mlx-lm, mlx-vlm, anyone's) get the tuned variants;
``unpatch_mlx()`` puts MLX's back. The built-in variants call MLX's functions as they were
when this module was imported, so patching never makes them call themselves.
"""

from __future__ import annotations

import mlx.core as mx

NAMES = ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")

# MLX's own functions, as they were before anything was patched.
MLX_FAST = {name: getattr(mx.fast, name) for name in NAMES}
for _name, _fn in MLX_FAST.items():
    if getattr(_fn, "__module__", "").startswith("mlx_primitives"):
        raise ImportError(f"[patch_mlx] mx.fast.{_name} is already this library's: reimported?")


def patch_mlx() -> list[str]:
    """Install the tuned ops in ``mx.fast``; returns the names replaced. Idempotent."""
    import mlx_primitives as mp

    for name in NAMES:
        setattr(mx.fast, name, getattr(mp, name))
    return list(NAMES)


def unpatch_mlx() -> None:
    """Put MLX's own functions back in ``mx.fast``."""
    for name, fn in MLX_FAST.items():
        setattr(mx.fast, name, fn)


def patched() -> bool:
    """Whether ``mx.fast`` holds this library's functions now."""
    return any(getattr(mx.fast, name) is not fn for name, fn in MLX_FAST.items())
