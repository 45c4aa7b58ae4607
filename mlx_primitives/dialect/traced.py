"""Kernel forwards traced once per call shape by ``mx.compile`` and replayed after."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .kernel import _INFERENCE, _POISON

# The most traces a forward keeps before it drops them all: MLX looks a call up among its
# function's traces one by one, and a server's prompts of every length would grow them.
MAX_TRACES = 16


class Traced:
    """``fn``, a custom kernel's forward, as ``mx.compile`` traces it once per call shape and
    constants: later calls replay the trace, so the Python of the forward, its
    ``mx.custom_function`` and the kernel call (MLX assembles a kernel's whole source at each)
    cost host time once per shape instead of once per call.

    What a forward reads besides its arguments is part of the trace: a trace is kept per
    :func:`~mlx_primitives.dialect.poisoned` state and :func:`~mlx_primitives.inference_mode`
    (MLX keeps one per stream itself). Only forwards whose Python depends on nothing else
    may be traced (not on strides either: MLX's kernels copy a strided input).

    Args:
        fn: the forward, called with positional arguments: arrays and constants (``int``,
            ``float``, ``bool``, ``str``, ``None``, tuples of them) that ``mx.compile``
            keys its traces on.
    """

    def __init__(self, fn: Callable):
        self._fn = fn
        self._compiled: list[tuple] = []  # (poison, inference mode, compiled fn)
        self.traces = 0

    def _trace(self, *args):
        self.traces += 1
        return self._fn(*args)

    def forget(self) -> None:
        """Drop every trace (MLX frees a compiled function's traces with it)."""
        self._compiled.clear()
        self.traces = 0

    def __call__(self, *args):
        poison, inference = _POISON.get(), _INFERENCE.get()
        fn = None
        for p, i, f in self._compiled:
            if p is poison and i is inference:
                fn = f
                break
        if fn is None:
            fn = mx.compile(self._trace)
            self._compiled.append((poison, inference, fn))
        out = fn(*args)
        if self.traces > MAX_TRACES:
            self.forget()
        return out
