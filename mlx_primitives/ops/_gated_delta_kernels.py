"""The custom-kernel variant of gated_delta (``kernel_variants/gated_delta/``).

``recurrent``: each row of a head's state (a value dim) held by ``lanes`` lanes of a warp in
registers across all tokens, so the state is read and written once per call; decoding and
prefill alike step through the tokens in order.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..dialect.kernel import GpuKernel, Plans, absent, lanes_hold, with_reference_transforms
from ..registry import GPU_BACKENDS, Variant

RECURRENT = GpuKernel(
    "gated_delta/recurrent.k",
    ["q", "k", "v", "g", "beta", "state", "mask"],
    ["y", "state_out"],
)
_NO_STATE, _NO_MASK = absent(mx.float32), absent(mx.bool_)
# Key dims a lane may hold (twice: the state and the next state) before the kernel spills.
MAX_PER_LANE = 64


def recurrent_variant(reference: Callable) -> Variant:
    """The ``recurrent`` variant; ``reference`` gives it gradients."""

    def factory(lanes, warps):
        plans = Plans()

        def plan(q, v, g, state, mask) -> dict:
            batch, tokens, hk, dk = q.shape
            hv, dv = v.shape[2:]
            out_state = mx.float32 if state is None else state.dtype
            rows = warps * 32 // lanes
            template = {
                "T": q.dtype,
                "S": out_state,
                "DK": dk,
                "DV": dv,
                "HK": hk,
                "HV": hv,
                "LANES": lanes,
                "WARPS": warps,
                "GATE_VEC": g.ndim == 4,
                "MASK": mask is not None,
                "HAS_STATE": state is not None,
            }
            return RECURRENT.plan(
                template,
                grid=(batch * hv * -(-dv // rows) * 32 * warps, 1, 1),
                threadgroup=(32 * warps, 1, 1),
                output_shapes=[(batch, tokens, hv, dv), (batch, hv, dv, dk)],
                output_dtypes=[q.dtype, out_state],
            )

        def forward(q, k, v, g, beta, state, mask):
            key = (q.shape, q.dtype, v.shape, g.ndim, None if state is None else state.dtype,
                   mask is None)  # fmt: skip
            launch = plans.get(key)
            if launch is None:
                launch = plans.keep(key, plan(q, v, g, state, mask))
            inputs = [
                q, k, v, g, beta,
                _NO_STATE if state is None else state,
                _NO_MASK if mask is None else mask,
            ]  # fmt: skip
            y, s = RECURRENT.launch(inputs, launch)
            return y, s

        return with_reference_transforms(forward, reference)

    return Variant(
        "recurrent",
        factory,
        backends=GPU_BACKENDS,
        space={"lanes": (4, 8, 2, 16), "warps": (4, 2, 1, 8)},
        supports=lanes_hold("k_dims", MAX_PER_LANE),
        sources=RECURRENT.files,
        traced=True,
        description="custom kernel: each state row in registers of a few lanes for all tokens",
    )
