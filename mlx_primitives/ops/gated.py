"""Gated activations of feed-forward blocks: ``swiglu = silu(gate) * up`` and
``geglu = gelu(gate) * up``."""

from __future__ import annotations

import math

import mlx.core as mx

from ..dsl.kernel import GpuKernel, itemsize, with_reference_transforms
from ..hardware import detect_chip
from ..problem import EXACT, Dim, bucket
from ..registry import GPU_BACKENDS, Op, Variant, register
from ._common import accumulator, check_choice, check_same, mlx_variants, random, row_presets

APPROXIMATIONS = ("none", "tanh", "fast")
DIMS = (Dim("rows"), Dim("dims", EXACT))
GELU_DIMS = (*DIMS, Dim("approximate", EXACT))


def _problem(name: str):
    def problem(gate, up):
        kind, shape = check_same(name, "gate", gate, "up", up)
        return kind, (bucket(gate.size // shape[-1]), shape[-1])

    return problem


# Built once, not at each call: it runs on the dispatch's hot path.
_geglu_problem = _problem("geglu")


def _gelu_problem(gate, up, approximate="none"):
    check_choice("geglu", "approximate", approximate, APPROXIMATIONS)
    kind, values = _geglu_problem(gate, up)
    return kind, (*values, approximate)


def swiglu_reference(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` computed in float32 (float64 for float64 inputs)."""
    acc = accumulator(gate.dtype)
    g = gate.astype(acc)
    return (g * mx.sigmoid(g) * up.astype(acc)).astype(gate.dtype)


def gelu(g: mx.array, approximate: str = "none") -> mx.array:
    """GELU of ``g`` in ``g``'s dtype: exact (erf), ``tanh`` or the ``fast`` sigmoid form."""
    if approximate == "tanh":
        return 0.5 * g * (1 + mx.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    if approximate == "fast":
        return g * mx.sigmoid(1.702 * g)
    return 0.5 * g * (1 + mx.erf(g / math.sqrt(2)))


def geglu_reference(gate: mx.array, up: mx.array, approximate: str = "none") -> mx.array:
    """``gelu(gate) * up`` computed in float32 (float64 for float64 inputs)."""
    acc = accumulator(gate.dtype)
    return (gelu(gate.astype(acc), approximate) * up.astype(acc)).astype(gate.dtype)


_BLOCKED = GpuKernel("gated/blocked.k", ["gate", "up"], ["out"], headers=("gated/act.h",))
_STRIDED = GpuKernel("gated/strided.k", ["gate", "up"], ["out"], headers=("gated/act.h",))
# The kernels' ACT template constant.
_ACT = {"silu": 0, "none": 1, "tanh": 2, "fast": 3}
# Multiprocessors assumed when the chip does not say (an H100 has 132).
_DEFAULT_SMS = 128


def _launch(kernel: GpuKernel, vec: int, threads: int, groups, fast: bool, extra: dict):
    """``forward(gate, up, act)`` running ``kernel``; ``act`` names the activation."""

    def forward(gate, up, act):
        flat = gate.reshape(-1)
        template = {"T": gate.dtype, "VEC": vec, **extra, "ACT": _ACT[act], "FAST": fast}
        (out,) = kernel(
            [flat, up.reshape(-1)],
            template=template,
            grid=(groups(flat.size // vec) * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[flat.shape],
            output_dtypes=[gate.dtype],
        )
        return out.reshape(gate.shape)

    return forward


def _kernel_variants(public) -> list[Variant]:
    """The kernel variants, ``public(forward)`` giving each the op's own signature."""

    def blocked(vec, unroll, threads, fast_math):
        groups = lambda nv: -(-nv // (threads * unroll))
        return public(_launch(_BLOCKED, vec, threads, groups, fast_math, {"UNROLL": unroll}))

    def strided(vec, waves, threads, fast_math):
        sms = detect_chip().gpu_cores or _DEFAULT_SMS
        groups = lambda nv: max(1, min(waves * sms, -(-nv // threads)))
        return public(_launch(_STRIDED, vec, threads, groups, fast_math, {}))

    def supports(p: dict, params: dict) -> bool:
        size = itemsize(p["dtype"])
        # Only silu and the sigmoid GELU use an exponential that fast math changes.
        fast_ok = not params["fast_math"] or p.get("approximate", "silu") in ("silu", "fast")
        return (
            size is not None
            and params["vec"] * size <= 16
            and p["dims"] % params["vec"] == 0
            and fast_ok
        )

    return [
        Variant(
            "blocked",
            blocked,
            backends=GPU_BACKENDS,
            space={
                "vec": (8, 2, 4),
                "unroll": (1, 2, 4),
                "threads": (256, 128, 512, 1024),
                "fast_math": (False, True),
            },
            supports=supports,
            sources=_BLOCKED.files,
            description="custom kernel: unrolled vector loads, one block of vectors per group",
        ),
        Variant(
            "strided",
            strided,
            backends=GPU_BACKENDS,
            space={
                "vec": (8, 2, 4),
                "waves": (1, 2, 4, 8),
                "threads": (256, 512, 1024),
                "fast_math": (False, True),
            },
            supports=supports,
            sources=_STRIDED.files,
            description="custom kernel: a few waves of groups striding over the array",
        ),
    ]


def _swiglu_public(forward):
    fn = with_reference_transforms(forward, lambda gate, up, act: swiglu_reference(gate, up))
    return lambda gate, up: fn(gate, up, "silu")


def _geglu_public(forward):
    fn = with_reference_transforms(forward, geglu_reference)
    return lambda gate, up, approximate="none": fn(gate, up, approximate)


def _example(shapes, dtype, key, approximate=None):
    k1, k2 = mx.random.split(key)
    shape = tuple(shapes[0])
    args = (random(shape, dtype, k1, 2.0), random(shape, dtype, k2))
    return args, ({} if approximate is None else {"approximate": approximate})


def _case(p):
    options = {"approximate": p["approximate"]} if "approximate" in p else {}
    return ((p["rows"], p["dims"]),), options


def _default(problem, backend):
    return "compiled", {}


def _presets(**options):
    return row_presets(
        14336,
        (1, 64, 16384),
        ((64, 1024), (512, 2048)),
        (2048, 4096, 5632, 8192, 11008),
        tuple(options.items()),
    )


# Outputs fed back as the next gate grow to inf in float16 within a timing chain, and the
# kernels' division then takes its slow path for special values; fed back as `up` they are
# only multiplied, so timing feeds that argument.
SWIGLU = register(
    Op(
        "swiglu",
        dims=DIMS,
        problem=_problem("swiglu"),
        reference=swiglu_reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[*mlx_variants(swiglu_reference), *_kernel_variants(_swiglu_public)],
        presets=_presets(),
        differentiable=(0, 1),
        feed=1,
    )
)

GEGLU = register(
    Op(
        "geglu",
        dims=GELU_DIMS,
        problem=_gelu_problem,
        reference=geglu_reference,
        example=_example,
        case=_case,
        default=_default,
        variants=[*mlx_variants(geglu_reference), *_kernel_variants(_geglu_public)],
        presets=_presets(approximate="none"),
        differentiable=(0, 1),
        feed=1,
    )
)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, the gate of SwiGLU feed-forward blocks.

    Args:
        gate: the gate projection's output.
        up: the up projection's output, same shape and dtype as ``gate``.
    """
    return SWIGLU(gate, up)


def geglu(gate: mx.array, up: mx.array, approximate: str = "none") -> mx.array:
    """``gelu(gate) * up``, the gate of GeGLU feed-forward blocks.

    Args:
        gate: the gate projection's output.
        up: the up projection's output, same shape and dtype as ``gate``.
        approximate: ``"none"`` for the exact erf GELU (like ``mlx.nn.gelu``), ``"tanh"``
            (like ``mlx.nn.gelu_approx``) or ``"fast"`` (like ``mlx.nn.gelu_fast_approx``).
    """
    return GEGLU(gate, up, approximate)
