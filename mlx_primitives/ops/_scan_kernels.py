"""The custom-kernel variants of the scans (``kernel_variants/scan/``).

``serial`` (linear_scan): one thread per state, stepping along the scan axis with the state in
a register; the threads of a group take neighbouring states, so where the scan axis is not the
last (a state-space model's ``(batch, length, channels)``) every step's loads coalesce.
``unroll`` steps' inputs are loaded before they are used.

``recurrent`` (selective_scan): one (batch, channel) row's states in registers of ``lanes``
lanes of a warp for every position, so the states are never written out but the last; the
step sizes' bias and softplus, the skip and the gate are applied on the way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..dialect.kernel import (
    GpuKernel,
    Plans,
    absent,
    itemsize,
    lanes_hold,
    with_reference_transforms,
)
from ..registry import GPU_BACKENDS, Variant

SERIAL = GpuKernel("scan/serial.k", ["a", "b", "h0"], ["y"])
SELECTIVE = GpuKernel(
    "scan/selective.k",
    ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"],
    ["y", "state_out"],
)
# States a lane may hold (with their decays) before the kernel spills.
MAX_PER_LANE = 32
_ABSENT = absent(mx.float32)


def serial_variant(reference: Callable) -> Variant:
    """The ``serial`` variant of linear_scan; ``reference`` gives it gradients."""

    def factory(threads, unroll):
        plans = Plans()

        def plan(b, axis: int, reverse: bool, given: bool) -> tuple:
            shape = b.shape
            outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
            three = (outer, shape[axis], inner)
            launch = SERIAL.plan(
                {"T": b.dtype, "REVERSE": reverse, "H0": given, "UNROLL": unroll},
                grid=(-(-outer * inner // threads) * threads, 1, 1),
                threadgroup=(threads, 1, 1),
                output_shapes=[three],
                output_dtypes=[b.dtype],
            )
            return three, launch

        def forward(a, b, h0, axis, reverse):
            axis = axis % b.ndim
            given = h0 is not None
            key = (b.shape, b.dtype, axis, reverse, given)
            made = plans.get(key)
            if made is None:
                made = plans.keep(key, plan(b, axis, reverse, given))
            three, launch = made
            inputs = [a.reshape(three), b.reshape(three), h0.reshape(-1) if given else _ABSENT]
            (y,) = SERIAL.launch(inputs, launch)
            return y.reshape(b.shape)

        return with_reference_transforms(forward, reference)

    return Variant(
        "serial",
        factory,
        backends=GPU_BACKENDS,
        space={"threads": (128, 256, 64), "unroll": (4, 1, 8)},
        supports=lambda p, q: itemsize(p["dtype"]) is not None,
        sources=SERIAL.files,
        traced=True,
        description="custom kernel: a thread per state, stepping along the axis",
    )


def selective_variant(reference: Callable) -> Variant:
    """The ``recurrent`` variant of selective_scan; ``reference`` gives it gradients."""

    def factory(lanes, warps):
        plans = Plans()

        def plan(u, delta, A, B, D, z, delta_bias, delta_softplus, state) -> dict:
            batch, length, channels = u.shape
            n = B.shape[-1]
            out_state = mx.float32 if state is None else state.dtype
            template = {
                "T": u.dtype,
                "S": out_state,
                "NS": n,
                "NC": channels,
                "NH": delta.shape[-1],
                "NG": 1 if B.ndim == 3 else B.shape[2],
                "LANES": lanes,
                "WARPS": warps,
                "A_ROW": A.ndim == 2,
                "HAS_D": D is not None,
                "HAS_Z": z is not None,
                "HAS_BIAS": delta_bias is not None,
                "SOFTPLUS": delta_softplus,
                "HAS_STATE": state is not None,
            }
            rows = warps * 32 // lanes
            return SELECTIVE.plan(
                template,
                grid=(-(-batch * channels // rows) * 32 * warps, 1, 1),
                threadgroup=(32 * warps, 1, 1),
                output_shapes=[(batch, length, channels), (batch, channels, n)],
                output_dtypes=[u.dtype, out_state],
            )

        def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_state, state):
            missing = (D is None, z is None, delta_bias is None)
            key = (u.shape, u.dtype, delta.shape[-1], B.shape, A.ndim, missing, delta_softplus,
                   None if state is None else state.dtype)  # fmt: skip
            launch = plans.get(key)
            if launch is None:
                launch = plans.keep(
                    key, plan(u, delta, A, B, D, z, delta_bias, delta_softplus, state)
                )
            inputs = [u, delta, A, B, C, D, z, delta_bias, state]
            return SELECTIVE.launch([_ABSENT if a is None else a for a in inputs], launch)

        return with_reference_transforms(forward, reference)

    return Variant(
        "recurrent",
        factory,
        backends=GPU_BACKENDS,
        space={"lanes": (4, 8, 2, 16, 1, 32), "warps": (4, 2, 1, 8)},
        supports=lanes_hold("states", MAX_PER_LANE),
        sources=SELECTIVE.files,
        traced=True,
        description="custom kernel: each row's states in registers of a few lanes",
    )
