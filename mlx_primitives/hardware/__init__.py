"""Which chip runs MLX ops here: the key that tuning records are stored under."""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from .apple import detect_apple
from .chip import BACKENDS, Chip
from .cpu import available_cores, detect_cpu
from .nvidia import parse_nvidia

__all__ = ["Chip", "current_backend", "detect_chip"]


def current_backend() -> str:
    """Return "cuda" or "metal" where MLX's default device is a GPU of that back-end, else "cpu"."""
    if mx.default_device() == mx.gpu:
        if mx.cuda.is_available():
            return "cuda"
        if mx.metal.is_available():
            return "metal"
    return "cpu"


def _is_available(backend: str) -> bool:
    if backend == "cuda":
        return mx.cuda.is_available()
    if backend == "metal":
        return mx.metal.is_available()
    return True


def _device_info(device: Any) -> dict[str, Any]:
    # Detection must never stop a program: a back-end that cannot answer reports nothing.
    try:
        return dict(mx.device_info(device))
    except Exception:
        return {}


@functools.cache
def _detect(backend: str) -> Chip:
    if backend not in BACKENDS:
        raise ValueError(f"[detect_chip] backend must be one of {BACKENDS}, got {backend!r}.")
    if not _is_available(backend):
        raise ValueError(f"[detect_chip] The {backend} back-end is not available here.")
    cores = available_cores()
    if backend == "metal":
        return detect_apple(_device_info(mx.gpu), cores)
    if backend == "cuda":
        return parse_nvidia(_device_info(mx.gpu), cores)
    return detect_cpu(_device_info(mx.cpu), cores)


def detect_chip(backend: str | None = None) -> Chip:
    """The chip that runs MLX ops on ``backend``, detected once per back-end and process.

    Args:
        backend: "metal", "cuda" or "cpu"; default: ``current_backend()``. On a GPU back-end
            the chip is that of the first GPU.
    """
    return _detect(backend or current_backend())


# The functools.lru_cache interface callers expect, e.g. to detect again in a changed environment.
detect_chip.cache_clear = _detect.cache_clear  # type: ignore[attr-defined]
