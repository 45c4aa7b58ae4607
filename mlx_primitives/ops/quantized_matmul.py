"""Matrix products with quantized weights, ``x @ dequantize(w).T``, like ``mx.quantized_matmul``
on MLX's own packed format (the output of ``mx.quantize``)."""

from __future__ import annotations

import math

import mlx.core as mx

from ..patch import mlx_own
from ..problem import EXACT, Dim, Unmodelled, bucket
from ..registry import Example, Op, Variant, register
from ._common import accumulator, check_array, check_bool, check_int, random
from ._quantized_kernels import mma_variant, qmv_variant

NAME = "quantized_matmul"

MLX_QUANTIZED_MATMUL = mlx_own(mx, "quantized_matmul")

# MLX's quantization modes and their default (group_size, bits). The variants model "affine";
# mp.quantized_matmul passes the others to MLX's own op.
MODES = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
GROUP_SIZES = (32, 64, 128)
BITS = (1, 2, 3, 4, 5, 6, 8)

DIMS = (
    Dim("rows"),
    Dim("in_features", EXACT),
    Dim("out_features", EXACT),
    Dim("bits", EXACT),
    Dim("group_size", EXACT),
    Dim("transpose", EXACT),
    # Affine quantization always has biases; a mode modelled later keys its problems by it.
    Dim("mode", EXACT, default="affine"),
)
# Past this many multiply-adds (and CHECK_ROWS * 3 rows), a candidate is checked on the first,
# middle and last CHECK_ROWS rows: the float64 reference of a whole prefill takes minutes.
CHECK_MACS = 2**28
CHECK_ROWS = 16
# What a candidate's check allows: a dot product over the in-features whose weights are
# dequantized into 16 bits (as MLX's kernels and the dequantize variant do) errs by a few units
# of that rounding times the output's scale, not of each output. MLX's CUDA kernel for fewer
# than 8 rows also sums in bfloat16 per lane: about 0.023 off on unit outputs at 14336
# in-features (emulated in NumPy), which its default must pass.
TOLERANCES = {"float32": (2e-5, 1e-4), "float16": (4e-3, 1e-2), "bfloat16": (5e-2, 4e-2)}

_ARRAY = mx.array


def sizes(group_size, bits, op: str = NAME) -> tuple[int, int]:
    """The affine mode's group size and bits of a call (None: MLX's defaults, 64 and 4);
    errors name ``op``."""
    group_size = 64 if group_size is None else check_int(op, "group_size", group_size)
    bits = 4 if bits is None else check_int(op, "bits", bits)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"[{op}] group_size must be one of {list(GROUP_SIZES)}, got {group_size}")
    if bits not in BITS:
        raise ValueError(f"[{op}] bits must be one of {list(BITS)}, got {bits}")
    return group_size, bits


def check_packed(op: str, w, scales, biases, group_size: int, bits: int, ndim: int = 2):
    """Checks of MLX's packed format, of ``ndim``-D weights (3: stacked matrices); returns
    the dims of ``w`` before its last (its rows) and the values each row holds."""
    if not isinstance(w, mx.array):
        raise TypeError(f"[{op}] w must be an mlx.core.array, got {type(w).__name__}")
    if w.dtype != mx.uint32:
        raise ValueError(f"[{op}] w must be packed in uint32 (mx.quantize), got {w.dtype}")
    shape = w.shape
    if len(shape) != ndim or 0 in shape:
        raise ValueError(f"[{op}] w must be a non-empty {ndim}-D array, got shape {shape}")
    values, extra = divmod(shape[-1] * 32, bits)
    if extra or values % group_size:
        raise ValueError(
            f"[{op}] w of shape {shape} does not hold whole groups of {group_size} "
            f"{bits}-bit values per row"
        )
    want = (*shape[:-1], values // group_size)
    for name, a in (("scales", scales), ("biases", biases)):
        if a is None:
            raise ValueError(f"[{op}] {name} must be given for mode='affine'")
        _, got = check_array(op, name, a)
        if got != want:
            raise ValueError(
                f"[{op}] {name} has shape {got}, expected {want} for w of shape {shape} "
                f"with group_size={group_size} and bits={bits}"
            )
    return shape[:-1], values


def _problem(x, w, scales, biases, transpose, group_size, bits, mode):
    if mode != "affine":
        raise Unmodelled(f"[{NAME}] the variants model mode='affine', got {mode!r}")
    # Stacked weights and mixed dtypes (which MLX promotes) are MLX's; arguments that are not
    # arrays get this op's errors below.
    if _ARRAY is x.__class__ is w.__class__ is scales.__class__ is biases.__class__ and (
        w.ndim != 2 or not x.dtype == scales.dtype == biases.dtype
    ):
        raise Unmodelled(f"[{NAME}] the variants model 2-D weights of x's dtype")
    dtype, shape = check_array(NAME, "x", x)
    check_bool(NAME, "transpose", transpose)
    group_size, bits = sizes(group_size, bits)
    (rows,), values = check_packed(NAME, w, scales, biases, group_size, bits)
    in_features, out_features = (values, rows) if transpose else (rows, values)
    if shape[-1] != in_features:
        raise ValueError(
            f"[{NAME}] x has {shape[-1]} features (its last dim), expected {in_features} from "
            f"w of shape {w.shape} with bits={bits} and transpose={transpose}"
        )
    rows_x = x.size // in_features
    return dtype, (bucket(rows_x), in_features, out_features, bits, group_size, transpose, mode)


def reference(x, w, scales, biases, transpose, group_size, bits, mode):
    """Weights dequantized in float32 (float64 for float64 inputs), then one matmul."""
    group_size, bits = sizes(group_size, bits)
    acc = accumulator(x.dtype)
    wf = mx.dequantize(w, scales.astype(acc), biases.astype(acc), group_size, bits, mode)
    y = x.astype(acc) @ (wf.T if transpose else wf)
    return y.astype(mx.result_type(x, scales, biases))


def dequantized(x, w, scales, biases, transpose, group_size, bits, mode):
    """Weights dequantized into x's dtype, then one matmul (for long prefills)."""
    group_size, bits = sizes(group_size, bits)
    wf = mx.dequantize(w, scales, biases, group_size, bits, mode)
    return x @ (wf.T if transpose else wf)


def _check_slices(args):
    x, *rest = args
    k = x.shape[-1]
    rows = x.size // k
    out = rest[0].shape[0] if rest[3] else rest[0].shape[1] * 32 // sizes(*rest[4:6])[1]
    if rows <= 3 * CHECK_ROWS or rows * k * out <= CHECK_MACS:
        return None
    x2 = x.reshape(rows, k)
    slices = []
    for a in (0, (rows - CHECK_ROWS) // 2, rows - CHECK_ROWS):
        part = slice(a, a + CHECK_ROWS)
        select = (lambda p: lambda outs: [o.reshape(-1, o.shape[-1])[p] for o in outs])(part)
        slices.append(((x2[part], *rest), select))
    return slices


def _example(shapes, dtype, key, bits=4, group_size=64, transpose=True):
    """``shapes``: x's, then optionally w's packed shape (else w is square)."""
    k1, k2 = mx.random.split(key)
    x_shape = tuple(shapes[0])
    k = x_shape[-1]
    out = k
    if len(shapes) > 1:
        packed = tuple(shapes[1])
        out = packed[0] if transpose else packed[1] * 32 // bits
    # Unit-scale outputs: weights of variance 1 / k.
    wf = mx.random.normal((out, k) if transpose else (k, out), key=k2) / math.sqrt(k)
    w, scales, biases = mx.quantize(wf, group_size, bits)
    x = random(x_shape, dtype, k1)
    return x, w, scales.astype(dtype), biases.astype(dtype), transpose, group_size, bits, "affine"


def _case(p):
    bits, k, n = p["bits"], p["in_features"], p["out_features"]
    packed = (n, k * bits // 32) if p["transpose"] else (k, n * bits // 32)
    options = {"bits": bits, "group_size": p["group_size"], "transpose": p["transpose"]}
    return ((p["rows"], k), packed), options


# From this many rows MLX's CUDA op gave wrong float32 outputs (both its kernels, at 64 output
# features): docs/notes/2026-12-08-cuda-first-calls-and-float32-qmm.md
CUDA_FLOAT32_ROWS = 2


def mlx_serves(dtype: str, backend: str, rows: int) -> bool:
    """Whether MLX's own op may serve a problem of ``rows`` (bucketed: rows or pairs) in
    ``dtype`` on ``backend``: not in float64, which it does not take, nor in float32 on CUDA
    from :data:`CUDA_FLOAT32_ROWS`."""
    cuda_float32 = (backend, dtype) == ("cuda", "float32")
    return dtype != "float64" and not (cuda_float32 and rows >= CUDA_FLOAT32_ROWS)


def mlx_default(dtype: str, backend: str) -> bool:
    """Whether MLX's own op is the default of every problem of ``dtype`` on ``backend``."""
    return mlx_serves(dtype, backend, CUDA_FLOAT32_ROWS)


def _default(problem, backend):
    # Where MLX's own op cannot serve, the composition does.
    if mlx_serves(problem["dtype"], backend, problem["rows"]):
        return "builtin", {}
    return "dequantize", {}


def _example_of(rows: int, k: int, n: int, dtype: str, bits: int = 4, group_size: int = 64):
    options = (("bits", bits), ("group_size", group_size))
    return Example(((rows, k), (n, k * bits // 32)), dtype, options)


# (in_features, out_features) of the layers of Llama-3-8B, Mistral-7B and Qwen3-8B/30B, the
# most common first.
LAYERS = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (2048, 6144))
# The rows of the full preset: decoding, batches of sequences, chunks of a prefill.
ROWS = (1, 2, 4, 8, 16, 32, 256, 2048)


def _presets() -> dict:
    main = LAYERS[:3]
    # The problems where the choice matters most first: a run cut short by --time-budget has
    # tuned decoding (1 row) and small batches, where kernels win, before prefills.
    default = [_example_of(1, k, n, t) for k, n in LAYERS for t in ("float16", "bfloat16")]
    default += [_example_of(16, k, n, t) for k, n in LAYERS for t in ("float16", "bfloat16")]
    default += [_example_of(r, k, n, "float16") for r in (8, 32) for k, n in main]
    default += [_example_of(1, k, n, "float16", bits=8) for k, n in main[:2]]
    default += [_example_of(2048, k, n, "float16") for k, n in main[:2]]
    more = [
        *(
            _example_of(r, k, n, t)
            for r in ROWS
            for k, n in LAYERS
            for t in ("float16", "bfloat16")
        ),
        *(_example_of(r, k, n, "float16", bits=8) for r in (1, 8, 32) for k, n in LAYERS),
        *(_example_of(r, *main[0], "float16", 4, g) for r in (1, 16) for g in (32, 128)),
    ]
    full = default + [ex for ex in dict.fromkeys(more) if ex not in default]
    quick = [
        _example_of(r, k, n, "float32", bits)
        for r, k, n, bits in ((1, 512, 512, 4), (16, 512, 512, 4), (1, 1024, 256, 8))
    ]
    return {"quick": quick, "default": default, "full": full}


def _served_by_mlx(x, w, scales, biases, transpose, group_size, bits, mode):
    """MLX's own op, for the calls the variants do not model (other modes, stacked weights,
    arguments of several dtypes, which MLX promotes), with its own errors; but a ``mode`` it
    does not know, and scales whose rows are not w's (which MLX computes on), are ours."""
    if not isinstance(mode, str):
        raise TypeError(f"[{NAME}] mode must be a str, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"[{NAME}] mode must be one of {list(MODES)}, got {mode!r}")
    both = isinstance(w, mx.array) and isinstance(scales, mx.array)
    if both and scales.shape[:-1] != w.shape[:-1]:
        raise ValueError(
            f"[{NAME}] scales has shape {scales.shape}, expected {w.shape[:-1]} before its "
            f"last dim like w's {w.shape}"
        )
    return MLX_QUANTIZED_MATMUL(x, w, scales, biases, transpose, group_size, bits, mode)


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None = None,
    transpose: bool = True,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    stream: mx.Stream | None = None,
) -> mx.array:
    """The product of ``x`` with a quantized matrix, like ``mx.quantized_matmul``: ``x @ W.T``
    (or ``x @ W`` without ``transpose``) where ``W`` is ``w`` dequantized, in MLX's packed
    format (``mx.quantize``). In the affine mode each group of ``group_size`` consecutive values
    of a row of ``W`` is ``scales * q + biases``, ``q`` the ``bits``-bit codes packed from the
    lowest bits up in ``w``'s uint32 words.

    Args:
        x: input, ``(..., in_features)``.
        w: the packed codes, ``(out_features, in_features * bits / 32)`` (with ``transpose``).
        scales: one per group, ``(out_features, in_features / group_size)``.
        biases: one per group, like ``scales`` (the affine mode needs them).
        transpose: multiply by ``W.T`` (as linear layers do) or by ``W``.
        group_size: values per scale and bias: 32, 64 or 128 (default: the mode's, 64).
        bits: bits per code: 1 to 6 or 8 (default: the mode's, 4).
        mode: ``"affine"``, or MLX's ``"mxfp4"``, ``"mxfp8"``, ``"nvfp4"`` (served by MLX).
        stream: the stream or device to run on (default: the default stream).
    """
    return OP.serve(x, w, scales, biases, transpose, group_size, bits, mode, stream)


def _kernel_args(x, w, scales, biases, transpose, group_size, bits, mode):
    return x, w, scales, biases, *sizes(group_size, bits)


OP = register(
    Op(
        NAME,
        signature=quantized_matmul,
        dims=DIMS,
        problem=_problem,
        outside=_served_by_mlx,
        mlx_default=mlx_default,
        reference=reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[
            # MLX's op takes the op's arguments in its canonical order: no wrapper to call.
            Variant("builtin", lambda: MLX_QUANTIZED_MATMUL, description="mx.quantized_matmul"),
            Variant("dequantize", lambda: dequantized, description="mx.dequantize, then a matmul"),
            Variant(
                "compiled",
                lambda: mx.compile(dequantized),
                description="mx.compile'd dequantize and matmul",
            ),
            qmv_variant(reference, _kernel_args),
            mma_variant(reference, _kernel_args),
        ],
        presets=_presets(),
        tolerances=TOLERANCES,
        check_slices=_check_slices,
    )
)
