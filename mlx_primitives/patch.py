"""Serve unmodified programs: the tuned ops installed in ``mx.fast``.

``patch_mlx()`` replaces ``mx.fast.rms_norm``, ``layer_norm``, ``rope`` and
``scaled_dot_product_attention`` with this library's functions, which take every argument
MLX's take, so that models calling MLX (mlx-lm, mlx-vlm, anyone's) get the tuned variants
(an op no record of the machine could route elsewhere keeps MLX's function until that
changes); ``unpatch_mlx()`` puts MLX's back. The built-in variants call MLX's functions as
they were when this module was imported, so patching never makes them call themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from . import dispatch
from .dispatch import passing

NAMES = ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")
# The op that serves each of them.
OPS = {
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "rope": "rope",
    "scaled_dot_product_attention": "flash_attention",
}


def mlx_own(owner, name: str):
    """MLX's own ``owner.name`` (``mx.fast`` or ``mx``), as it is when this library is
    imported: the built-in variants call it, so a program that puts this library's function
    in its place never makes them call themselves.

    Args:
        owner: ``mx`` or ``mx.fast``.
        name: the function's name there.
    """
    fn = getattr(owner, name)
    if getattr(fn, "__module__", "").startswith("mlx_primitives"):
        raise ImportError(f"[mlx_primitives] {owner.__name__}.{name} is already this library's")
    return fn


# MLX's own functions, as they were before anything was patched.
MLX_FAST = {name: mlx_own(mx.fast, name) for name in NAMES}


def patch_mlx() -> list[str]:
    """Install the tuned ops in ``mx.fast``; returns the names it serves. Idempotent. Each
    hands its calls to MLX's own function where no tuning record could change them
    (:func:`passing`); an op whose calls no record of this machine could change leaves MLX's
    own function in ``mx.fast`` until the dispatch forgets its decisions (``dispatch.reset``,
    ``mp.record``), so that a patched program pays nothing for it."""
    import mlx_primitives as mp

    for name in NAMES:
        if name not in _INSTALLED:
            _INSTALLED[name] = passing(getattr(mp, name), MLX_FAST[name], OPS[name])
    _ACTIVE[0] = True
    _refresh()
    return list(NAMES)


# What patch_mlx installs, made once; whether it is in effect.
_INSTALLED: dict[str, Callable] = {}
_ACTIVE = [False]


def _refresh() -> None:
    """While patched, each op's function in ``mx.fast``: ours, or MLX's own where no call
    could go elsewhere (``dispatch.unused``); one that a program put there since is left."""
    if _ACTIVE[0]:
        for name in NAMES:
            if getattr(mx.fast, name) in (MLX_FAST[name], _INSTALLED[name]):
                fn = MLX_FAST[name] if dispatch.unused(OPS[name]) else _INSTALLED[name]
                setattr(mx.fast, name, fn)


dispatch._on_forget.append(_refresh)


def unpatch_mlx() -> None:
    """Put MLX's own functions back in ``mx.fast``."""
    _ACTIVE[0] = False
    for name, fn in MLX_FAST.items():
        setattr(mx.fast, name, fn)


def patched() -> bool:
    """Whether ``mx.fast`` is patched (:func:`patch_mlx`): it holds this library's functions
    where they may gain."""
    return _ACTIVE[0]
