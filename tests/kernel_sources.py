"""The full sources MLX compiles for our kernels, and the launches that every kernel variant makes.

:func:`full_source` wraps a kernel body the way ``mx.fast.metal_kernel`` and
``mx.fast.cuda_kernel`` do in MLX 0.32 (``mlx/backend/common/metal_kernel.cpp``,
``mlx/backend/cuda/custom_kernel.cpp``): the signature is generated from the inputs, outputs and
template arguments of one launch. The Metal output is compared with MLX's own in
``test_kernel_syntax``; the CUDA output matched MLX 0.32.4's for every launch on an H100.

:func:`kernel_launches` records those launches by running every kernel variant's own launch
code on small CPU arrays with the kernel call intercepted, so the template constants come from
the code that ships, not from a copy of it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import mlx.core as mx

from mlx_primitives import registry
from mlx_primitives.dialect.kernel import GpuKernel
from mlx_primitives.dialect.render import header

DTYPES = (mx.float32, mx.float16, mx.bfloat16)

# Metal: inputs of fewer elements are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# The thread attributes MLX's Metal back-end declares, with their types, in its order; each is
# added to the signature when its name occurs anywhere in the body.
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint",
    "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3",
    "grid_origin": "uint3",
    "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint",
    "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}

METAL_TYPES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint32: "uint32_t",
    mx.bool_: "bool",
}
CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint32: "uint32_t",
    mx.bool_: "bool",
}

# What cuda_kernel puts before a kernel's own header.
CUDA_DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)


def _template_kind(value) -> str:
    # bool before int: True is an int in Python, and MLX's binding checks bool first too.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, mx.Dtype):
        return "typename"
    raise TypeError(f"template values must be a Dtype, an int or a bool, got {value!r}")


def _shape_args(body: str, name: str) -> tuple[bool, bool, bool]:
    # MLX looks for the names as plain substrings of the body.
    return (f"{name}_shape" in body, f"{name}_strides" in body, f"{name}_ndim" in body)


def kernel_name(kernel: GpuKernel, backend: str, template: dict, inputs, output_dtypes) -> str:
    """The function name MLX gives one launch; ``inputs`` are ``(dtype, ndim, size)`` triples."""
    name = "custom_kernel_" + kernel.name
    if backend == "cuda":
        for value in template.values():
            kind = _template_kind(value)
            if kind == "bool":
                name += "_t" if value else "_f"
            else:
                # The hash spells dtypes as the Metal back-end does (get_type_string).
                name += "_" + (METAL_TYPES[value] if kind == "typename" else str(value))
        return name
    if template:
        # MLX 0.32.4 spells a minus sign '_' here (the CUDA back-end keeps it).
        name += "__" + "_".join(_metal_value(v) for v in template.values()).replace("-", "_")
    for dtype, ndim, size in inputs:
        suffix = "s" if ndim == 0 else "c" if size < MAX_CONSTANT_ARRAY_SIZE else ""
        name += "_" + METAL_TYPES[dtype] + suffix
    return name + "".join("_" + METAL_TYPES[d] for d in output_dtypes)


def _metal_value(value) -> str:
    kind = _template_kind(value)
    if kind == "typename":
        return METAL_TYPES[value]
    return str(int(value))  # an ostream prints a bool as 1 or 0


def _metal_source(kernel, template, inputs, output_dtypes, body, head) -> str:
    name = kernel_name(kernel, "metal", template, inputs, output_dtypes)
    out = [head]
    if template:
        params = ", ".join(f"{_template_kind(v)} {k}" for k, v in template.items())
        out.append(f"template <{params}>\n")
    out.append(f"[[kernel]] void {name}(\n")
    index = 0
    for input_name, (dtype, ndim, size) in zip(kernel.inputs, inputs):
        space = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if ndim == 0 else "*"
        out.append(f"  const {space} {METAL_TYPES[dtype]}{ref} {input_name} [[buffer({index})]],\n")
        index += 1
        if ndim == 0:
            continue
        shape, strides, ndims = _shape_args(body, input_name)
        for wanted, arg in (
            (shape, f"const constant int* {input_name}_shape"),
            (strides, f"const constant int64_t* {input_name}_strides"),
            (ndims, f"const constant int& {input_name}_ndim"),
        ):
            if wanted:
                out.append(f"  {arg} [[buffer({index})]],\n")
                index += 1
    attributes = [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES.items() if a in body]
    n_buffers = len(kernel.inputs) + len(kernel.outputs)
    for output_name, dtype in zip(kernel.outputs, output_dtypes):
        out.append(f"  device {METAL_TYPES[dtype]}* {output_name} [[buffer({index})]]")
        # MLX's own test for the last parameter (it counts shape buffers in index).
        out.append(",\n" if index < n_buffers - 1 or attributes else ") {\n")
        index += 1
    if attributes:
        out.append(",\n".join(attributes) + ") {\n")
    out.append(body + "\n}\n")
    if template:
        values = "<" + ", ".join(_metal_value(v) for v in template.values()) + ">"
        out.append(
            f'\ntemplate [[host_name("{name}")]] [[kernel]] '
            f"decltype({name}{values}) {name}{values};\n"
        )
    return "".join(out)


def _cuda_source(kernel, template, inputs, output_dtypes, body, head) -> str:
    name = kernel_name(kernel, "cuda", template, inputs, output_dtypes)
    out = [CUDA_DEFAULT_HEADER, head]
    out.append("namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n")
    out.append(f"__global__ void {name}(\n")
    for input_name, (dtype, ndim, _) in zip(kernel.inputs, inputs):
        out.append(f"    const {CUDA_TYPES[dtype]}* {input_name},\n")
        if ndim == 0:
            continue
        shape, strides, ndims = _shape_args(body, input_name)
        for wanted, arg in (
            (shape, f"Shape {input_name}_shape"),
            (strides, f"Strides {input_name}_strides"),
            (ndims, f"int {input_name}_ndim"),
        ):
            if wanted:
                out.append(f"    const __grid_constant__ {arg},\n")
    for i, (output_name, dtype) in enumerate(zip(kernel.outputs, output_dtypes)):
        last = i == len(kernel.outputs) - 1
        out.append(f"    {CUDA_TYPES[dtype]}* {output_name}" + (") {\n" if last else ",\n"))
    if template:
        for key, value in template.items():
            kind = _template_kind(value)
            if kind == "typename":
                out.append(f"  using {key} = {CUDA_TYPES[value]};\n")
            elif kind == "bool":
                out.append(f"  constexpr bool {key} = {'true' if value else 'false'};\n")
            else:
                out.append(f"  constexpr int {key} = {value};\n")
        out.append("\n")
    out.append(body + "\n}\n\n} // namespace mlx::core::cu\n")
    return "".join(out)


def full_source(
    kernel: GpuKernel,
    backend: str,
    template: dict,
    input_dtypes: list,
    input_ndims: list[int],
    input_sizes: list[int],
    output_dtypes: list,
    *,
    body: str | None = None,
) -> str:
    """The source MLX compiles for one launch of ``kernel`` on ``backend``.

    Args:
        kernel: the kernel; its body is read from ``kernel_variants/`` unless ``body`` (the
            dialect text) is given.
        backend: ``"metal"`` or ``"cuda"``.
        template: the launch's template arguments, in order.
        input_dtypes, input_ndims, input_sizes: of each input, in ``kernel.inputs`` order.
        output_dtypes: of each output.
    """
    if not len(kernel.inputs) == len(input_dtypes) == len(input_ndims) == len(input_sizes):
        raise ValueError(f"[{kernel.name}] expected {len(kernel.inputs)} inputs")
    if len(output_dtypes) != len(kernel.outputs):
        raise ValueError(f"[{kernel.name}] expected {len(kernel.outputs)} outputs")
    rendered = kernel.body(backend, body)
    head = header(backend, kernel.headers_for(backend))
    inputs = list(zip(input_dtypes, input_ndims, input_sizes))
    make = _cuda_source if backend == "cuda" else _metal_source
    return make(kernel, template, inputs, list(output_dtypes), rendered, head)


@dataclass(frozen=True)
class Launch:
    """One call of a custom kernel, as a kernel variant makes it."""

    op: str
    variant: str
    params: tuple[tuple[str, object], ...]
    case: str
    dtype: mx.Dtype  # of the call (a kernel's own inputs may be float32 partial results)
    kernel: GpuKernel
    template: tuple[tuple[str, object], ...]
    input_dtypes: tuple
    input_ndims: tuple[int, ...]
    input_sizes: tuple[int, ...]
    output_dtypes: tuple

    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.op}/{self.variant}[{params}] {self.case}"

    def source(self, backend: str) -> str:
        return full_source(
            self.kernel,
            backend,
            dict(self.template),
            list(self.input_dtypes),
            list(self.input_ndims),
            list(self.input_sizes),
            list(self.output_dtypes),
        )


@contextlib.contextmanager
def _intercepted(calls: list) -> Iterator[None]:
    """Make GpuKernel calls record their arguments and return zeros instead of running."""

    def fake(self, inputs, plan):
        calls.append((self, list(inputs), dict(plan["template"]), plan["output_dtypes"]))
        return [mx.zeros(s, d) for s, d in zip(plan["output_shapes"], plan["output_dtypes"])]

    with mock.patch.object(GpuKernel, "launch", fake):  # every call of a kernel goes through it
        yield


# Each op's calls: ``calls(op, dtype)`` yields ``(label, args)`` (the op's arguments in order)
# covering the template flags its kernels take, and the parameters crossed with every call
# rather than covered once.
Calls = Callable[[registry.Op, mx.Dtype], Iterator[tuple[str, tuple]]]


def _example(op, shapes, dtype, seed=0, **options):
    return op.example(shapes, dtype, mx.random.key(seed), **options)


def _norm_calls(op, dtype):
    # A row of 6 elements puts the weight (and bias) in Metal's constant address space.
    affines = ("wb", "w", "b", "") if op.name == "layer_norm" else ("w", "")
    for d in (4096, 256, 6):
        for affine in affines:
            args = _example(op, ((16, d),), dtype)
            args = (args[0], *(a if n in affine else None for a, n in zip(args[1:-1], "wb")))
            yield f"{d=} affine={affine or 'none'}", (*args, 1e-5)
        if dtype != mx.float32:  # a float32 weight makes the output float32
            args = _example(op, ((16, d),), dtype)
            args = (args[0], args[1].astype(mx.float32), *args[2:])
            yield f"{d=} float32 weight", args
    # -0.0 passes the argument checks; its bits are a negative template constant.
    args = _example(op, ((16, 256),), dtype)
    yield "eps=-0.0", (*args[:-1], -0.0)


def _with(op, args: tuple, **changes) -> tuple:
    """``args`` with the named arguments replaced."""
    out = list(args)
    for name, value in changes.items():
        out[op.params.index(name)] = value
    return tuple(out)


def _rope_calls(op, dtype):
    # dims=8 rotates a quarter of each head and makes a table of 4 (Metal constant) floats.
    flags = itertools.product(("BHSD", "BSHD"), (False, True), (64, 8), (False, True), (3, None))
    for layout, traditional, dims, freqs, offset in flags:
        shape = (2, 8, 32, 64) if layout == "BHSD" else (2, 32, 8, 64)
        options = {"layout": layout, "traditional": traditional, "dims": dims, "freqs": freqs}
        args = _example(op, (shape,), dtype, **options)
        # None: one offset per batch entry (the kernel's PER_BATCH).
        offset = mx.array([3, 5], mx.int32) if offset is None else offset
        label = f"{layout} {traditional=} {dims=} {freqs=} per_batch={offset is None}"
        yield label, _with(op, args, offset=offset)
    args = _example(op, ((2, 8, 16, 64),), dtype)
    yield "scale=-0.0", _with(op, args, scale=-0.0)
    # 6 elements: x itself in Metal's constant address space.
    yield "tiny traditional", _example(op, ((1, 1, 3, 2),), dtype, traditional=True, dims=2)


def _gated_calls(op, dtype):
    approximations = ("none", "tanh", "fast") if op.name == "geglu" else (None,)
    # 1x4: inputs of fewer than 8 elements go to Metal's constant address space.
    for shape, approximate in itertools.product(((8, 1024), (3, 6), (1, 4)), approximations):
        args = _example(op, (shape,), dtype)
        args = args if approximate is None else (*args[:2], approximate)
        yield f"{shape=} {approximate=}", args


def _attention_calls(op, dtype):
    # Head dims 64 and 80 (a partial lane group), GQA 4 and 1, both layouts, 1 and 3 queries.
    window = op.name == "sliding_window_attention"
    for layout, d, heads, lq in itertools.product(("BHSD", "BSHD"), (64, 80), (4, 1), (1, 3)):
        if layout == "BSHD":
            shapes = ((2, lq, 4, d), (2, 40, 4 // heads, d))
        else:
            shapes = ((2, 4, lq, d), (2, 4 // heads, 40, d))
        label = f"{layout} {d=} group={heads} q_len={lq}"
        if window:
            yield label, _example(op, shapes, dtype, layout=layout, window=16)
            continue
        for causal in (False, True):
            yield f"{label} {causal=}", _example(op, shapes, dtype, layout=layout, causal=causal)
    # A prefill (every query tile size is allowed) and a long cache (every split size).
    options = {"window": 7} if window else {"causal": True}
    yield "prefill", _example(op, ((1, 2, 40, 96), (1, 1, 40, 96)), dtype, **options)
    # A long cache, where every split size is allowed: a window as long as the largest split.
    options = {"window": 4096} if window else {}
    yield "long cache", _example(op, ((1, 8, 1, 128), (1, 2, 5000, 128)), dtype, **options)


def _quantized_calls(op, dtype):
    # Each width the kernel unpacks and each group size; 1, 3 and 17 rows; in-features that
    # are not powers of two; out-features that leave a group's columns partly empty; a long
    # row (every warp count and chunk allowed); scales of fewer than 8 elements (Metal's
    # constant address space).
    cases = (
        (1, 4096, 64, 4, 64),
        (3, 320, 40, 8, 32),
        (17, 192, 24, 2, 64),
        (32, 256, 16, 4, 128),
        (2, 2048, 8, 8, 128),
        (1, 64, 2, 4, 32),
        (5, 4160, 24, 4, 64),  # in-features that end inside a step of the mma kernel
    )
    for rows, k, n, bits, group_size in cases:
        shapes = ((rows, k), (n, k * bits // 32))
        args = _example(op, shapes, dtype, bits=bits, group_size=group_size)
        yield f"{rows}x{k} out={n} {bits=} {group_size=}", args


def _gather_qmm_calls(op, dtype):
    # Decoding (one token, eight; unsorted), a sorted run of pairs, each width and group
    # size, experts whose runs are longer than a pass, in-features not a power of two.
    cases = (
        (1, 8, 2, 256, 64, 4, 64, False),
        (8, 16, 4, 320, 40, 8, 32, False),
        (24, 4, 1, 192, 24, 2, 64, True),
        (3, 2, 2, 2048, 8, 4, 128, False),
    )
    for tokens, experts, top_k, k, n, bits, group_size, is_sorted in cases:
        shapes = ((tokens, k), (experts, n, k * bits // 32))
        options = {"top_k": top_k, "bits": bits, "group_size": group_size}
        args = _example(op, shapes, dtype, sorted_indices=is_sorted, **options)
        yield f"{tokens}x{k} {experts=} {top_k=} out={n} {bits=} {is_sorted=}", args


def _linear_scan_calls(op, dtype):
    # Each flag: reversed or not, an initial state or not; the axis in the middle and last.
    for reverse, h0, axis in itertools.product((False, True), (None, "given"), (1, -1)):
        args = _example(op, ((2, 37, 5),), dtype, h0=h0, axis=axis, reverse=reverse)
        yield f"{reverse=} h0={h0 is not None} {axis=}", args


def _gated_delta_calls(op, dtype):
    # Each flag: a gate per key dim or per head, a mask or none, a state or none.
    for gate, mask, state in itertools.product(("scalar", "vector"), (False, True),
                                               ("float32", "none")):  # fmt: skip
        args = _example(op, ((1, 3, 2, 64),), dtype, heads_v=4, gate=gate, mask=mask, state=state)
        yield f"{gate=} {mask=} {state=}", args


def _selective_scan_calls(op, dtype):
    # Each flag: Mamba-1 (a decay per state) or Mamba-2 (per head, groups), a state or none,
    # the skip, gate, bias and softplus together or none of them.
    for decay, state, extras in itertools.product(("matrix", "scalar"), ("float32", "none"),
                                                  (False, True)):  # fmt: skip
        options = {"gate": extras, "bias": extras, "softplus": extras, "skip": extras}
        heads = 4 if decay == "scalar" else None
        args = _example(op, ((1, 3, 64),), dtype, heads=heads, states=32, groups=2, decay=decay,
                        state=state, **options)  # fmt: skip
        yield f"{decay=} {state=} {extras=}", args


CALLS: dict[str, tuple[Calls, tuple[str, ...]]] = {
    "rms_norm": (_norm_calls, ()),
    "layer_norm": (_norm_calls, ()),
    "rope": (_rope_calls, ("angles", "fast_math")),
    "swiglu": (_gated_calls, ("fast_math",)),
    "geglu": (_gated_calls, ("fast_math",)),
    "flash_attention": (_attention_calls, ()),
    "sliding_window_attention": (_attention_calls, ()),
    "quantized_matmul": (_quantized_calls, ("scale",)),
    "gather_qmm": (_gather_qmm_calls, ("scale",)),
    "linear_scan": (_linear_scan_calls, ()),
    "gated_delta": (_gated_delta_calls, ()),
    "selective_scan": (_selective_scan_calls, ()),
}


def _plan(variant: registry.Variant, cases: list, crossed: tuple[str, ...]) -> list:
    """``(case, params)`` pairs: each case with its first allowed config (and with each value of
    the ``crossed`` parameters), then each value of each parameter in some allowed config."""
    configs = variant.configs()  # the first value of each parameter first
    crossed = tuple(k for k in crossed if k in variant.space)
    allowed = [[c for c in configs if variant.allows(problem, c)] for _, problem in cases]
    chosen: list[tuple[int, dict]] = []

    def take(i: int, config: dict) -> None:
        if (i, config) not in chosen:
            chosen.append((i, config))

    for i, ok in enumerate(allowed):
        for values in itertools.product(*(variant.space[k] for k in crossed)):
            fixed = dict(zip(crossed, values))
            match = next((c for c in ok if fixed.items() <= c.items()), None)
            if match is not None:
                take(i, match)
    for key, values in variant.space.items():
        for value in values:
            match = next(
                ((i, c) for i, ok in enumerate(allowed) for c in ok if c[key] == value), None
            )
            if match is not None:
                take(*match)
    return [(cases[i][0], config) for i, config in chosen]


def op_cases(op: registry.Op, dtype: mx.Dtype) -> list[tuple[tuple, dict]]:
    """``((label, args), problem dict)`` for each representative call of ``op``."""
    calls = CALLS[op.name][0](op, dtype)
    return [(call, op.problem(*call[1]).as_dict()) for call in calls]


def kernel_launches() -> list[Launch]:
    """Every launch that the kernel variants of every registered op make for a representative
    set of calls: each dtype of :data:`DTYPES`, each template flag, each parameter value."""
    launches = []
    for op in registry.ops():
        kernel_variants = [v for v in op.variants if v.is_kernel]
        if not kernel_variants:
            continue
        if op.name not in CALLS:
            raise KeyError(f"[kernel_sources] no calls for {op.name!r}: add them to CALLS")
        crossed = CALLS[op.name][1]
        for dtype in DTYPES:
            cases = op_cases(op, dtype)
            for variant in kernel_variants:
                for (label, args), params in _plan(variant, cases, crossed):
                    recorded: list = []
                    with _intercepted(recorded):
                        # The factory, not build(): nothing is memoised on the variant.
                        fn = variant.factory(**variant.validate(params))
                        mx.eval(fn(*args))
                    for kernel, inputs, template, output_dtypes in recorded:
                        launches.append(
                            Launch(
                                op.name,
                                variant.name,
                                tuple(params.items()),
                                label,
                                dtype,
                                kernel,
                                tuple(template.items()),
                                tuple(a.dtype for a in inputs),
                                tuple(a.ndim for a in inputs),
                                tuple(a.size for a in inputs),
                                tuple(output_dtypes),
                            )
                        )
    return launches
