"""The custom-kernel variant of linear_scan (``kernel_variants/scan/``).

``serial``: one thread per state, stepping along the scan axis with the state in a register;
the threads of a group take neighbouring states, so where the scan axis is not the last (a
state-space model's ``(batch, length, channels)``) every step's loads coalesce. ``unroll``
steps' inputs are loaded before they are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..dialect.kernel import GpuKernel, itemsize, with_reference_transforms
from ..registry import GPU_BACKENDS, Variant

SERIAL = GpuKernel("scan/serial.k", ["a", "b", "h0"], ["y"])


def serial_variant(reference: Callable) -> Variant:
    """The ``serial`` variant of linear_scan; ``reference`` gives it gradients."""

    def factory(threads, unroll):
        def forward(a, b, h0, axis, reverse):
            shape = b.shape
            axis = axis % len(shape)
            outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
            states = outer * inner
            three = (outer, shape[axis], inner)
            given = h0 is not None
            (y,) = SERIAL(
                [a.reshape(three), b.reshape(three), h0.reshape(-1) if given else mx.zeros((1,))],
                template={"T": b.dtype, "REVERSE": reverse, "H0": given, "UNROLL": unroll},
                grid=(-(-states // threads) * threads, 1, 1),
                threadgroup=(threads, 1, 1),
                output_shapes=[three],
                output_dtypes=[b.dtype],
            )
            return y.reshape(shape)

        return with_reference_transforms(forward, reference)

    return Variant(
        "serial",
        factory,
        backends=GPU_BACKENDS,
        space={"threads": (128, 256, 64), "unroll": (4, 1, 8)},
        supports=lambda p, q: itemsize(p["dtype"]) is not None,
        sources=SERIAL.files,
        description="custom kernel: a thread per state, stepping along the axis",
    )
