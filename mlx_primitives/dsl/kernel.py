"""Custom GPU kernels built lazily from ``kernel_variants/`` sources."""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from functools import cached_property

import mlx.core as mx

from .._paths import kernel_source
from ..hardware import current_backend
from .dialect import header, render

# While set, kernels fill their outputs with NaN before running, so a check catches any
# element a kernel forgot to write.
_POISON: ContextVar[float | None] = ContextVar("mlxp_poison", default=None)


@contextlib.contextmanager
def poisoned():
    """Make custom kernels called in this block start from NaN-filled outputs."""
    token = _POISON.set(math.nan)
    try:
        yield
    finally:
        _POISON.reset(token)


def float_bits(value: float) -> int:
    """The float32 bit pattern of a non-negative ``value`` as an int (a kernel template
    constant; MLX writes template values into CUDA kernel names, so no minus sign)."""
    if not value >= 0:
        raise ValueError(f"[kernel] float template constants must be >= 0, got {value}")
    return struct.unpack("<i", struct.pack("<f", value + 0.0))[0]  # -0.0 becomes 0.0


class GpuKernel:
    """One kernel body of ``kernel_variants/``, rendered for the running GPU back-end.

    The MLX kernel object is made on first use: ``mx.fast.cuda_kernel`` raises where there is
    no CUDA back-end, so nothing is built at import.

    Args:
        source: the body, e.g. ``"rms_norm/row.k"``.
        inputs: input names, in call order.
        outputs: output names.
        headers: extra headers after the prelude, e.g. ``("gated/act.h",)``.
    """

    def __init__(
        self,
        source: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        headers: tuple[str, ...] = (),
    ):
        self.source = source
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.headers = headers
        self.name = "mlxp_" + source.removesuffix(".k").replace("/", "_")

    @property
    def files(self) -> tuple[str, ...]:
        """Every kernel_variants/ file this kernel is made of (for source hashes)."""
        return (*self.headers, self.source)

    @cached_property
    def _kernel(self):
        backend = current_backend()
        body = render(kernel_source(self.source), backend)
        head = header(backend, self.headers)
        if backend == "cuda":
            return mx.fast.cuda_kernel(self.name, self.inputs, self.outputs, body, head)
        if backend == "metal":
            return mx.fast.metal_kernel(self.name, self.inputs, self.outputs, body, head)
        raise RuntimeError(f"[{self.name}] custom kernels need a GPU back-end, not {backend}")

    def __call__(
        self,
        inputs: Sequence[mx.array],
        *,
        template: dict,
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        output_shapes: Sequence[tuple],
        output_dtypes: Sequence[mx.Dtype],
    ) -> list[mx.array]:
        return self._kernel(
            inputs=list(inputs),
            template=list(template.items()),
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=list(output_shapes),
            output_dtypes=list(output_dtypes),
            init_value=_POISON.get(),
        )


def with_reference_vjp(forward: Callable, reference: Callable) -> Callable:
    """``forward`` (a custom kernel, which has no VJP) differentiated through ``reference``.

    Both take the same positional arguments; floating arrays among them get gradients by
    recomputing ``reference`` under ``mx.vjp``, everything else gets None.
    """
    fn = mx.custom_function(forward)

    @fn.vjp
    def _vjp(primals, cotangent, output):
        wrt = [
            i
            for i, p in enumerate(primals)
            if isinstance(p, mx.array) and mx.issubdtype(p.dtype, mx.floating)
        ]

        def ref(*arrays):
            full = list(primals)
            for i, a in zip(wrt, arrays):
                full[i] = a
            return reference(*full)

        _, grads = mx.vjp(ref, [primals[i] for i in wrt], [cotangent])
        out = [None] * len(primals)
        for i, g in zip(wrt, grads):
            out[i] = g
        return tuple(out)

    return fn
