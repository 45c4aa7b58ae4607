"""The custom-kernel variants of the gated activations (``kernel_variants/gated/``).

- ``blocked``: unrolled vector loads, one block of vectors per group;
- ``strided``: a few waves of groups striding over the array.
"""

from __future__ import annotations

from collections.abc import Callable

from ..dialect.kernel import GpuKernel, Plans, itemsize
from ..hardware import detect_chip
from ..registry import GPU_BACKENDS, Variant

_BLOCKED = GpuKernel("gated/blocked.k", ["gate", "up"], ["out"], headers=("gated/act.h",))
_STRIDED = GpuKernel("gated/strided.k", ["gate", "up"], ["out"], headers=("gated/act.h",))
# The kernels' ACT template constant.
_ACT = {"silu": 0, "none": 1, "tanh": 2, "fast": 3}
# Multiprocessors assumed when the chip does not say.
_DEFAULT_SMS = 128


def _launch(kernel: GpuKernel, vec: int, threads: int, groups, fast: bool, extra: dict):
    """``forward(gate, up, act)`` running ``kernel``; ``act`` names the activation. Its launch
    settings are kept per size, dtype and activation."""
    plans = Plans()

    def plan(gate, act) -> dict:
        return kernel.plan(
            {"T": gate.dtype, "VEC": vec, **extra, "ACT": _ACT[act], "FAST": fast},
            grid=(groups(gate.size // vec) * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[(gate.size,)],
            output_dtypes=[gate.dtype],
        )

    def forward(gate, up, act):
        key = (gate.size, gate.dtype, act)
        launch = plans.get(key)
        if launch is None:
            launch = plans.keep(key, plan(gate, act))
        (out,) = kernel.launch([gate.reshape(-1), up.reshape(-1)], launch)
        return out.reshape(gate.shape)

    return forward


def gated_variants(wrap: Callable[[Callable], Callable]) -> list[Variant]:
    """The kernel variants; ``wrap(forward)`` turns a ``forward(gate, up, act)`` into a
    callable taking the op's arguments."""

    def blocked(vec, unroll, threads, fast_math):
        groups = lambda nv: -(-nv // (threads * unroll))
        return wrap(_launch(_BLOCKED, vec, threads, groups, fast_math, {"UNROLL": unroll}))

    def strided(vec, waves, threads, fast_math):
        sms = detect_chip().gpu_cores or _DEFAULT_SMS
        groups = lambda nv: max(1, min(waves * sms, -(-nv // threads)))
        return wrap(_launch(_STRIDED, vec, threads, groups, fast_math, {}))

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
            traced=True,
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
            traced=True,
            description="custom kernel: a few waves of groups striding over the array",
        ),
    ]
