"""Custom GPU kernels built lazily from ``kernel_variants/`` sources."""

from __future__ import annotations

import contextlib
import math
import re
import struct
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from functools import cached_property

import mlx.core as mx

from .._paths import kernel_source
from ..hardware import current_backend
from .render import BACKENDS, header, render

# While set, kernels fill their outputs with NaN before running, so a check catches any
# element a kernel forgot to write.
_POISON: ContextVar[float | None] = ContextVar("mlxp_poison", default=None)
# While set, custom kernels run without their gradient wrapper (see inference_mode).
_INFERENCE: ContextVar[bool] = ContextVar("mlxp_inference", default=False)


@contextlib.contextmanager
def poisoned():
    """Make custom kernels called in this block start from NaN-filled outputs."""
    token = _POISON.set(math.nan)
    try:
        yield
    finally:
        _POISON.reset(token)


# The dtypes the custom kernels are written for.
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
_FLOAT32_MAX = 3.4028234663852886e38
# MLX passes grid sizes (in threads) as 32-bit ints.
MAX_GRID = 2**31 - 1
# The most launch plans a kernel forward keeps (Plans).
MAX_PLANS = 256
# Threadgroup memory a kernel may take without opting in, by back-end (a CUDA body compiled
# for both alignments declares its $shared arrays twice).
SHARED = {"cuda": 49152, "metal": 32768}


def _drop_comment(line: str) -> str:
    """``line`` up to a ``//`` comment that starts outside a string or character literal."""
    quote, i = None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1  # an escaped character never ends the literal
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif line.startswith("//", i):
            return line[:i]
        i += 1
    return line


# What compact() cannot shorten safely: block comments, raw strings, continued lines.
_UNCOMPACTABLE = re.compile(r'/\*|\bR"|\\\s*$', re.M)


def compact(text: str) -> str:
    """``text`` without ``//`` comments, indentation and blank lines: the same tokens, each
    remaining line kept whole (so preprocessor lines stay intact). MLX's CUDA back-end hashes
    a custom kernel's whole source at each evaluation, so its length costs time per call.

    Raises ValueError on a block comment, a raw string or a line continued with a backslash,
    whose meaning dropping lines or comments could change.
    """
    found = _UNCOMPACTABLE.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise ValueError(f"[kernel] compact() does not take {found.group()!r} (line {line})")
    lines = (_drop_comment(line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def itemsize(dtype_name: str) -> int | None:
    """Bytes per element of a dtype the kernels support, by name; None for any other."""
    return getattr(mx, dtype_name).size if dtype_name in KERNEL_DTYPES else None


def lanes_hold(row: str, max_per_lane: int):
    """``supports`` of a kernel that holds a row of the problem's dim ``row`` across
    ``lanes`` lanes of a warp in registers, at most ``max_per_lane`` elements each, reading a
    state of the problem's ``state`` dtype (or none) and arguments of its dtype."""

    def supports(p: dict, q: dict) -> bool:
        state_ok = p["state"] == "none" or itemsize(p["state"]) is not None
        size = p[row]
        return (
            itemsize(p["dtype"]) is not None
            and state_ok
            and size % q["lanes"] == 0
            and size // q["lanes"] <= max_per_lane
        )

    return supports


def float_bits(value: float) -> int:
    """The float32 bit pattern of a non-negative ``value`` as an int (a kernel template
    constant; MLX writes template values into CUDA kernel names, so no minus sign)."""
    if not 0 <= value <= _FLOAT32_MAX:
        raise ValueError(
            f"[kernel] float template constants must be in [0, float32 max], got {value}"
        )
    return struct.unpack("<i", struct.pack("<f", value + 0.0))[0]  # -0.0 becomes 0.0


class GpuKernel:
    """One kernel body of ``kernel_variants/``, rendered for the running GPU back-end.

    The MLX kernel object is made on first use: ``mx.fast.cuda_kernel`` raises where there is
    no CUDA back-end, so nothing is built at import.

    Args:
        source: the body, e.g. ``"rms_norm/row.k"``, or several files that make it in order
            (kernels that share their main loop, ``("quantized_matmul/qmv.k",
            "quantized_matmul/qmv_core.k")``); the first names the kernel.
        inputs: input names, in call order.
        outputs: output names.
        headers: extra headers after the prelude, e.g. ``("gated/act.h",)``; ``{backend}`` in
            a name stands for the back-end (``"_dialect/warp.{backend}.h"``).
        aligned: arrays the body loads and stores as vectors of its ``VEC`` constant, each
            access at the array's start plus a multiple of ``VEC`` elements. The CUDA body is
            then compiled twice, with ``constexpr bool ALIGNED`` true where all of them start
            on a vector boundary (no test per access; ``_dialect/aligned.cuda.h``), and its
            ``$shared`` arrays are declared twice; Metal loads element-wise either way and
            gets one copy with ``ALIGNED`` false. The split is not in the source hash: a
            change to it must come with one to ``_dialect/aligned.*.h``.
    """

    def __init__(
        self,
        source: str | tuple[str, ...],
        inputs: Sequence[str],
        outputs: Sequence[str],
        headers: tuple[str, ...] = (),
        aligned: tuple[str, ...] = (),
    ):
        self.parts = (source,) if isinstance(source, str) else tuple(source)
        self.source = self.parts[0]
        self.name = "mlxp_" + self.parts[0].removesuffix(".k").replace("/", "_")
        unknown = set(aligned) - set(inputs) - set(outputs)
        if unknown:
            raise ValueError(f"[{self.name}] aligned names {sorted(unknown)} are not arrays")
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.headers = headers + (("_dialect/aligned.{backend}.h",) if aligned else ())
        self.aligned = aligned

    def headers_for(self, backend: str) -> tuple[str, ...]:
        """The extra headers as rendered for ``backend``."""
        return tuple(h.format(backend=backend) for h in self.headers)

    @property
    def files(self) -> tuple[str, ...]:
        """Every kernel_variants/ file this kernel is made of, for all back-ends (for source
        hashes)."""
        heads = dict.fromkeys(h for b in BACKENDS for h in self.headers_for(b))
        return (*heads, *self.parts)

    def text(self) -> str:
        """The body as written: its source files, joined."""
        return "\n".join(kernel_source(part) for part in self.parts)

    def body(self, backend: str, text: str | None = None) -> str:
        """The body (``text``, else the source files') rendered for ``backend``."""
        body = render(self.text() if text is None else text, backend)
        if not self.aligned:
            return body
        if backend != "cuda":
            return f"constexpr bool ALIGNED = false;\n{body}"
        test = " && ".join(f"mlxp_aligned<VEC>({name})" for name in self.aligned)
        return (
            f"if ({test}) {{\nconstexpr bool ALIGNED = true;\n{body}\n}} else {{\n"
            f"constexpr bool ALIGNED = false;\n{body}\n}}"
        )

    def sources(self, backend: str) -> tuple[str, str]:
        """The body and header handed to MLX for ``backend``, compacted."""
        return compact(self.body(backend)), compact(header(backend, self.headers_for(backend)))

    @cached_property
    def _kernel(self):
        backend = current_backend()
        body, head = self.sources(backend)
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
        plan = self.plan(template, grid, threadgroup, output_shapes, output_dtypes)
        return self.launch(inputs, plan)

    def plan(
        self,
        template: dict,
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        output_shapes: Sequence[tuple],
        output_dtypes: Sequence[mx.Dtype],
    ) -> dict:
        """A launch's settings, checked and in MLX's form, for :meth:`launch`: a caller that
        keeps one per shape spares each call the work (microseconds of host time, which a
        small call's chain waits on)."""
        if any(g > MAX_GRID for g in grid):
            raise ValueError(f"[{self.name}] a grid of {grid} threads is over MLX's 32-bit limit")
        return {
            "template": list(template.items()),
            "grid": grid,
            "threadgroup": threadgroup,
            "output_shapes": list(output_shapes),
            "output_dtypes": list(output_dtypes),
        }

    def launch(self, inputs: list[mx.array], plan: dict) -> list[mx.array]:
        """The kernel on ``inputs`` with the settings of a :meth:`plan`."""
        return self._kernel(inputs=inputs, init_value=_POISON.get(), **plan)


class Plans(dict):
    """A forward's launch plans (:meth:`GpuKernel.plan`), kept per call shape: at most
    ``MAX_PLANS``, then started afresh (a server's prompts of every length would grow it
    without end)."""

    def keep(self, key, plan):
        """``plan`` kept for ``key``, and returned."""
        if len(self) >= MAX_PLANS:
            self.clear()
        self[key] = plan
        return plan


def absent(dtype: mx.Dtype) -> mx.array:
    """What a kernel gets for an optional input not given (it never reads it): one element,
    made as data rather than as an op, so that no call launches a fill for it. Keep it."""
    return mx.array([0], dtype)


@contextlib.contextmanager
def inference_mode():
    """Run the custom kernels called in this block without their ``mx.custom_function``.

    That wrapper gives a kernel its gradient, JVP and vmap; it is one more graph node per
    call, whose evaluation costs host time that large calls do not fully hide. In this block
    MLX raises when a transformation reaches a custom kernel. The mode is read when a graph is
    built: a function ``mx.compile`` traced outside the block keeps its wrappers when called
    in it. Built-ins and compositions are unaffected.
    """
    token = _INFERENCE.set(True)
    try:
        yield
    finally:
        _INFERENCE.reset(token)


_ARRAY = mx.array


class _Rest:
    """The non-array arguments of a call and where its arrays go: one opaque leaf to MLX."""

    __slots__ = ("at", "values")

    def __init__(self, at: tuple[int, ...], values: tuple):
        self.at, self.values = at, values

    def merge(self, arrays) -> list:
        """The call's arguments in their order, with ``arrays`` in the array positions."""
        out = list(self.values)
        for i, a in zip(self.at, arrays):
            out.insert(i, a)
        return out


def _pack(args: tuple) -> list:
    """``args`` as the arrays, then a :class:`_Rest` of everything else."""
    arrays, at, values = [], [], []
    for i, a in enumerate(args):
        if isinstance(a, mx.array):
            arrays.append(a)
            at.append(i)
        else:
            values.append(a)
    arrays.append(_Rest(tuple(at), tuple(values)))
    return arrays


def _unpack(primals) -> tuple[list, _Rest]:
    """The arrays of a custom function's arguments and the rest, packed or not."""
    if isinstance(primals[-1], _Rest):
        return list(primals[:-1]), primals[-1]
    n = next((i for i, a in enumerate(primals) if not isinstance(a, mx.array)), len(primals))
    return list(primals[:n]), _Rest(tuple(range(n)), tuple(primals[n:]))


def with_reference_transforms(forward: Callable, reference: Callable) -> Callable:
    """``forward`` (a custom kernel, which has no transformations of its own) with its VJP,
    JVP and vmap computed through ``reference``; in :func:`inference_mode`, ``forward`` alone.

    Both take the same positional arguments; floating arrays among them are differentiated
    (by recomputing ``reference``), everything else is held constant.
    """
    # MLX 0.32 pairs a custom function's vmap axes with its arguments counting the non-arrays
    # too (python/src/transforms.cpp): a call with an array after a non-array goes packed.
    fn = mx.custom_function(forward)
    fn_packed = mx.custom_function(lambda *packed: forward(*packed[-1].merge(packed[:-1])))

    def call(*args):
        if _INFERENCE.get():
            return forward(*args)
        other = False
        for a in args:
            if type(a) is not _ARRAY:  # isinstance with mx.array costs more on a per-call path
                other = True
            elif other:
                return fn_packed(*_pack(args))
        return fn(*args)

    def floating(arrays) -> list[int]:
        return [i for i, a in enumerate(arrays) if mx.issubdtype(a.dtype, mx.floating)]

    def over(arrays, rest: _Rest, chosen: list[int]):
        """``reference`` as a function of the arrays numbered ``chosen``, the rest fixed."""

        def ref(*values):
            full = list(arrays)
            for i, v in zip(chosen, values):
                full[i] = v
            return reference(*rest.merge(full))

        return ref

    def _vjp(primals, cotangent, output):
        arrays, rest = _unpack(primals)
        chosen = floating(arrays)
        # One cotangent per output: a kernel of several outputs gets them as a sequence.
        cotangents = list(cotangent) if isinstance(cotangent, (list, tuple)) else [cotangent]
        _, grads = mx.vjp(over(arrays, rest, chosen), [arrays[i] for i in chosen], cotangents)
        # MLX drops None entries, then takes the arrays' gradients by position: every array
        # gets one (zeros where held constant); only the non-arrays after them may be None.
        out = [mx.zeros_like(a) for a in arrays] + [None] * (len(primals) - len(arrays))
        for i, g in zip(chosen, grads):
            out[i] = g
        return tuple(out)

    def _jvp(primals, tangents):
        arrays, rest = _unpack(primals)
        # MLX passes None for the arrays the outer jvp holds constant.
        chosen = [i for i in floating(arrays) if tangents[i] is not None]
        _, outs = mx.jvp(
            over(arrays, rest, chosen),
            [arrays[i] for i in chosen],
            [tangents[i] for i in chosen],
        )
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _vmap(inputs, axes):
        arrays, rest = _unpack(inputs)
        mapped = mx.vmap(
            over(arrays, rest, list(range(len(arrays)))), in_axes=tuple(axes[: len(arrays)])
        )
        out = mapped(*arrays)
        return out, 0 if isinstance(out, mx.array) else tuple(0 for _ in out)

    for f in (fn, fn_packed):
        f.vjp(_vjp)
        f.jvp(_jvp)
        f.vmap(_vmap)
    return call
