"""The custom-kernel variants of quantized_matmul and gather_qmm
(``kernel_variants/quantized_matmul/``).

``qmv``: for 1 to 32 rows, each packed weight read once per pass over the rows and dequantized
in registers. A threadgroup of ``warps`` warps serves ``32 / lanes_k * cols`` output columns:
a warp's lanes are ``32 / lanes_k`` columns side by side, each column split over ``lanes_k``
lanes along the in-features (their loads of one row coalesce; the columns side by side share
each load of x); every lane holds ``cols`` columns; the warps split the in-features too (their
sums meet in threadgroup memory). A lane loads ``vec`` words of each column per step. The
kernel takes ``rows`` rows per pass: all of them, or a half or a quarter (fewer accumulators;
the weights then come again from cache). ``scale="after"`` sums x times the integer codes and
applies the group's scale and bias to the sum (fewer operations per weight); ``"before"``
dequantizes each weight first (fewer per row).

``mma`` (CUDA only) forms the products on tensor cores: the rows fill the 16 rows of mma tiles
(one tile up to 16 rows, two up to 32), a warp takes ``tiles`` tiles of 8 output columns, and
a lane's 16 bytes of codes per step, dequantized two at a time in 16-bit registers, are its
operand as loaded (x is loaded in the same order). The ``warps`` of a threadgroup split the
in-features, and ``split`` threadgroups split them further into float32 partial sums.

gather_qmm's ``qmv`` and ``mma`` are the same kernels over (row, expert) pairs, sorted by expert
or as given: the threadgroups of the first pair of each run of one expert take the whole run,
so that each selected expert's weights are read once for all the rows routed to it.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..dialect.kernel import (
    MAX_GRID,
    SHARED,
    GpuKernel,
    Plans,
    itemsize,
    with_reference_transforms,
)
from ..registry import GPU_BACKENDS, Variant

QMV = GpuKernel(
    ("quantized_matmul/qmv.k", "quantized_matmul/qmv_core.k"),
    ["x", "w", "scales", "biases"],
    ["y"],
    headers=("quantized_matmul/codes.h",),
    aligned=("x", "w"),
)
MMA_HEADERS = ("_dialect/mma.cuda.h", "quantized_matmul/pairs.cuda.h")
MMA = GpuKernel(
    ("quantized_matmul/mma.k", "quantized_matmul/mma_core.k"),
    ["x", "w", "scales", "biases"],
    ["y"],
    headers=MMA_HEADERS,
    aligned=("x", "w"),
)
GATHER_MMA = GpuKernel(
    ("quantized_matmul/gather_mma.k", "quantized_matmul/mma_core.k"),
    ["x", "w", "scales", "biases", "experts", "x_rows", "y_rows"],
    ["y"],
    headers=MMA_HEADERS,
    aligned=("x", "w"),
)
GATHER_QMV = GpuKernel(
    ("quantized_matmul/gather_qmv.k", "quantized_matmul/qmv_core.k"),
    ["x", "w", "scales", "biases", "experts", "x_rows", "y_rows"],
    ["y"],
    headers=("quantized_matmul/codes.h",),
    aligned=("x", "w"),
)

# rows: the first allowed is the problem's rows (rounded up to a power of two), read once.
SPACE = {
    "lanes_k": (32, 8, 2),
    "cols": (4, 1, 2, 8),
    "warps": (2, 1, 4),
    "vec": (4, 2),
    "rows": (32, 16, 8, 4, 2, 1),
    "scale": ("after", "before"),
}
MMA_SPACE = {"tiles": (4, 2, 1, 8), "warps": (4, 8, 2), "split": (1, 2, 4)}
# The widths mma dequantizes two at a time, and its 16-bit types.
MMA_BITS = (4, 8)
MMA_DTYPES = ("float16", "bfloat16")
# Accumulators a lane may hold (16 x 8 tiles of rows by columns, 4 floats each).
MMA_MAX_TILES = 8
# gather_qmm's: the rows of an expert's run taken per pass (one or two tiles), and the sort.
GATHER_MMA_SPACE = {"tiles": (4, 2, 1, 8), "warps": (4, 8, 2), "rows": (16, 32),
                    "sort": (True, False)}  # fmt: skip
# gather_qmm's: the rows of one expert taken per pass (few at decoding), and whether the pairs
# are sorted by expert first (each expert read once) or taken as given (no sort and no
# gathers before the launch; an expert repeated apart is read again).
GATHER_SPACE = {**SPACE, "rows": (1, 2, 4, 8), "sort": (True, False)}
# The most pairs the gather kernel serves: a threadgroup per pair finds its expert's run.
MAX_PAIRS = 256
# The widths whose codes the kernel unpacks (a whole number of codes per half-word).
KERNEL_BITS = (2, 4, 8)
MAX_ROWS = 32
# Float registers a lane may hold (accumulators, codes, scales, x) before the kernel spills.
MAX_REGISTERS = 160
# The most passes over the rows a configuration may take (each reads the weights again).
MAX_PASSES = 4


def _fits(p: dict, q: dict, n: int) -> bool:
    """Whether config ``q`` serves the weights of problem ``p`` (``n`` output features)."""
    bits, k = p["bits"], p["in_features"]
    if itemsize(p["dtype"]) is None or bits not in KERNEL_BITS:
        return False
    per_word = 32 // bits
    chunk = q["vec"] * per_word  # a lane's codes of one column per step
    side = 32 // q["lanes_k"]  # columns side by side in a warp
    cols, warps, vec, rows = q["cols"], q["warps"], q["vec"], q["rows"]
    registers = rows * cols + cols * (vec + 2 + per_word) + per_word
    shared = warps * rows * cols * side * 4 if warps > 1 else 0
    return (
        p["group_size"] % chunk == 0  # a chunk lies in one quantization group
        and (k * bits // 32) % vec == 0  # rows of w start on a vector of words
        and registers <= MAX_REGISTERS
        and 2 * shared <= SHARED["cuda"]  # declared twice in the CUDA body (both alignments)
        and shared <= SHARED["metal"]
        and q["lanes_k"] * chunk * (warps - 1) < k  # every warp has a chunk
        and side * cols < 2 * n  # a group's columns are at least half used
    )


def _supports(p: dict, q: dict) -> bool:
    return (
        p.get("mode", "affine") == "affine"
        and p["transpose"]
        and p["rows"] <= MAX_ROWS
        and p["rows"] // MAX_PASSES <= q["rows"] <= p["rows"]  # p["rows"]: a power of 2
        and _fits(p, q, p["out_features"])
    )


def _mma_fits(p: dict, q: dict, m_tiles: int, split: int) -> bool:
    """Whether mma config ``q`` with ``m_tiles`` row tiles a pass serves problem ``p``."""
    bits, k, n = p["bits"], p["in_features"], p["out_features"]
    if p["dtype"] not in MMA_DTYPES or bits not in MMA_BITS:
        return False
    block = 4 * 4 * 32 // bits  # the in-features of a step of a warp
    shared = q["warps"] * 32 * m_tiles * q["tiles"] * 4 * 4 if q["warps"] > 1 else 0
    return (
        m_tiles * q["tiles"] <= MMA_MAX_TILES
        and 2 * shared <= SHARED["cuda"]  # declared twice in the body (both alignments)
        and -(-k // block) >= q["warps"] * split  # every warp has a step
        and 8 * q["tiles"] < 2 * n  # a group's columns are at least half used
    )


def _mma_supports(p: dict, q: dict) -> bool:
    if p.get("mode", "affine") != "affine" or not p["transpose"] or p["rows"] > MAX_ROWS:
        return False
    return _mma_fits(p, q, 1 if p["rows"] <= 16 else 2, q["split"])


def _mma_template(x, out, n: int, group_size: int, bits: int, tiles: int, rows: int,
                  warps: int, split: int) -> dict:  # fmt: skip
    """The mma kernels' template, for x as (rows, K) of a 16-bit type, ``out`` the output's
    type and ``rows`` the rows of a pass: one tile up to 16, two beyond."""
    return {
        "T": x.dtype,
        "Y": out,
        "BITS": bits,
        "GS": group_size,
        "K": x.shape[-1],
        "N": n,
        "NT": tiles,
        "MT": 1 if rows <= 16 else 2,
        "WARPS": warps,
        "SPLIT": split,
        "VEC": 8,
    }


def _template(x, k: int, n: int, group_size: int, bits: int, q: dict) -> dict:
    return {
        "T": x.dtype,
        "BITS": bits,
        "GS": group_size,
        "K": k,
        "N": n,
        "LK": q["lanes_k"],
        "COLS": q["cols"],
        "WARPS": q["warps"],
        "WV": q["vec"],
        "MT": q["rows"],
        "SCALE_AFTER": q["scale"] == "after",
        "VEC": min(32 // bits, 16 // x.dtype.size),
    }


def _column_groups(n: int, q: dict) -> int:
    return -(-n // (32 // q["lanes_k"] * q["cols"]))


def _mma_tiles(n: int, tiles: int) -> int:
    """The threadgroups of ``tiles`` tiles of 8 columns that cover ``n`` output columns."""
    return -(-n // (8 * tiles))


def _planned(
    kernel: GpuKernel, arrays: Callable, plan: Callable, reduce: Callable | None = None
) -> Callable:
    """A forward of ``kernel`` over x as (rows, K), launched with the settings
    ``plan(x, n, group_size, bits)`` gives (x's 2-D shape, the :meth:`GpuKernel.plan`, the
    output's shape), made once per x's shape and dtype, n, group size and bits; the kernel's
    output goes through ``reduce(y, x)`` where given."""
    plans = Plans()

    def forward(*args):
        x, w, scales, biases, group_size, bits = arrays(*args)
        key = (x.shape, x.dtype, w.shape[0], group_size, bits)
        made = plans.get(key)
        if made is None:
            made = plans.keep(key, plan(x, w.shape[0], group_size, bits))
        flat, launch, shape = made
        two_d = len(shape) == 2  # x as it comes: no reshape either way
        (y,) = kernel.launch([x if two_d else x.reshape(flat), w, scales, biases], launch)
        if reduce is not None:
            y = reduce(y, x)
        return y if two_d else y.reshape(shape)

    return forward


def _gather_forward(kernel: GpuKernel, arrays: Callable, sort: bool, warps: int, template,
                    groups) -> Callable:  # fmt: skip
    """A gather kernel's forward: a threadgroup of ``warps`` warps per pair and group of
    output columns (``groups(n)`` of them), its template ``template(x, n, group_size, bits)``;
    ``arrays`` as :func:`gather_qmv_variant` takes it."""

    def forward(*args):
        x, w, scales, biases, experts, x_rows, y_rows, batch, group_size, bits = arrays(
            *args, sort=sort
        )
        n, pairs = w.shape[1], experts.size
        threads = 32 * warps
        (y,) = kernel(
            [x, w, scales, biases, experts, x_rows, y_rows],
            template=template(x, n, group_size, bits),
            grid=(pairs * groups(n) * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[(pairs, n)],
            output_dtypes=[x.dtype],
        )
        return y.reshape(*batch, n)

    return forward


def qmv_variant(reference: Callable, arrays: Callable) -> Variant:
    """The ``qmv`` variant; ``reference`` gives it gradients, and ``arrays(*args)`` gives a
    call's ``(x, w, scales, biases, group_size, bits)``."""

    def factory(**q):
        def plan(x, n: int, group_size: int, bits: int) -> tuple:
            k = x.shape[-1]
            rows, threads = x.size // k, 32 * q["warps"]
            launch = QMV.plan(
                _template(x, k, n, group_size, bits, q),
                grid=(_column_groups(n, q) * threads, 1, 1),
                threadgroup=(threads, 1, 1),
                output_shapes=[(rows, n)],
                output_dtypes=[x.dtype],
            )
            return (rows, k), launch, (*x.shape[:-1], n)

        forward = _planned(QMV, arrays, plan)
        return with_reference_transforms(forward, reference)

    return Variant(
        "qmv",
        factory,
        backends=GPU_BACKENDS,
        space=SPACE,
        supports=_supports,
        sources=QMV.files,
        traced=True,
        description="custom kernel: 1-32 rows, each packed weight read once, dequantized in "
        "registers",
    )


def mma_variant(reference: Callable, arrays: Callable) -> Variant:
    """The ``mma`` variant (CUDA only); ``reference`` gives it gradients, and ``arrays(*args)``
    gives a call's ``(x, w, scales, biases, group_size, bits)``."""

    def factory(tiles: int, warps: int, split: int):
        def plan(x, n: int, group_size: int, bits: int) -> tuple:
            k = x.shape[-1]
            rows, threads = x.size // k, 32 * warps
            out = x.dtype if split == 1 else mx.float32
            launch = MMA.plan(
                _mma_template(x, out, n, group_size, bits, tiles, rows, warps, split),
                grid=(_mma_tiles(n, tiles) * split * threads, 1, 1),
                threadgroup=(threads, 1, 1),
                output_shapes=[(rows, n) if split == 1 else (split, rows, n)],
                output_dtypes=[out],
            )
            return (rows, k), launch, (*x.shape[:-1], n)

        def summed(y, x):  # the split's float32 partial sums, added
            return y.sum(axis=0).astype(x.dtype)

        forward = _planned(MMA, arrays, plan, None if split == 1 else summed)
        return with_reference_transforms(forward, reference)

    return Variant(
        "mma",
        factory,
        backends=frozenset({"cuda"}),
        space=MMA_SPACE,
        supports=_mma_supports,
        sources=MMA.files,
        traced=True,
        description="custom kernel on tensor cores: 1-32 rows, each packed weight read once, "
        "dequantized two at a time in 16-bit registers",
    )


def _gather_mma_supports(p: dict, q: dict) -> bool:
    threads = p["pairs"] * _mma_tiles(p["out_features"], q["tiles"]) * 32 * q["warps"]
    return (
        (q["rows"] == 16 or p["pairs"] > 16)
        and threads <= MAX_GRID  # a threadgroup per pair and column tile
        and _mma_fits(p, q, q["rows"] // 16, 1)
    )


def gather_mma_variant(reference: Callable, arrays: Callable) -> Variant:
    """The ``mma`` variant of gather_qmm (CUDA only); ``reference`` and ``arrays`` as for
    :func:`gather_qmv_variant`."""

    def factory(tiles: int, warps: int, rows: int, sort: bool):
        def template(x, n, group_size, bits):
            return _mma_template(x, x.dtype, n, group_size, bits, tiles, rows, warps, 1)

        forward = _gather_forward(
            GATHER_MMA, arrays, sort, warps, template, lambda n: _mma_tiles(n, tiles)
        )
        return with_reference_transforms(forward, reference)

    return Variant(
        "mma",
        factory,
        backends=frozenset({"cuda"}),
        space=GATHER_MMA_SPACE,
        supports=_gather_mma_supports,
        sources=GATHER_MMA.files,
        traced=True,
        description="custom kernel on tensor cores: the pairs in expert order, each selected "
        "expert's packed weights read once a pass of 16 or 32 of its rows",
    )


def _gather_supports(p: dict, q: dict) -> bool:
    return p["pairs"] <= MAX_PAIRS and q["rows"] <= p["pairs"] and _fits(p, q, p["out_features"])


def gather_qmv_variant(reference: Callable, arrays: Callable) -> Variant:
    """The ``qmv`` variant of gather_qmm; ``reference`` gives it gradients, and
    ``arrays(*args, sort=...)`` gives a call's ``(x, w, scales, biases, experts, x_rows,
    y_rows, batch, group_size, bits)``: x as rows, per pair (in expert order with ``sort``)
    its expert, its row of x and its row of the output, and the output's batch shape."""

    def factory(**q):
        def template(x, n, group_size, bits):
            return _template(x, x.shape[-1], n, group_size, bits, q)

        forward = _gather_forward(
            GATHER_QMV, arrays, q["sort"], q["warps"], template, lambda n: _column_groups(n, q)
        )
        return with_reference_transforms(forward, reference)

    return Variant(
        "qmv",
        factory,
        backends=GPU_BACKENDS,
        space=GATHER_SPACE,
        supports=_gather_supports,
        sources=GATHER_QMV.files,
        traced=True,
        description="custom kernel: the pairs in expert order, each selected expert's packed "
        "weights read once for all its rows, dequantized in registers",
    )
