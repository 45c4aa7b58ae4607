"""The dialect layer: one kernel text rendered for CUDA or for Metal.

A kernel body in ``kernel_variants/`` is C++ that uses the helpers of the back-end preludes
(``kernel_variants/_dialect/{cuda,metal}.h``: ``mlxp_load``, ``mlxp_warp_sum``,
``mlxp_rsqrt``, ...) and these ``$tokens`` for what the languages spell differently:

======================  ===============================  =======================================
token                   CUDA                             Metal
======================  ===============================  =======================================
``$tid``                ``threadIdx.x``                  ``thread_position_in_threadgroup.x``
``$group``              ``blockIdx.x``                   ``threadgroup_position_in_grid.x``
``$group_size``         ``blockDim.x``                   ``threads_per_threadgroup.x``
``$num_groups``         ``gridDim.x``                    ``threadgroups_per_grid.x``
``$gid``                global thread index (64-bit)     ``thread_position_in_grid.x``
``$shared``             ``__shared__``                   ``threadgroup``
``$barrier``            ``__syncthreads()``              ``threadgroup_barrier(mem_flags::...)``
======================  ===============================  =======================================

Tokens are substituted as text because MLX's Metal back-end adds a thread attribute to the
kernel's signature only when its name appears in the body.
"""

from __future__ import annotations

from string import Template

from .._paths import kernel_source

BACKENDS = ("cuda", "metal")

_TOKENS = {
    "cuda": {
        "tid": "threadIdx.x",
        "group": "blockIdx.x",
        "group_size": "blockDim.x",
        "num_groups": "gridDim.x",
        "gid": "((int64_t)blockIdx.x * blockDim.x + threadIdx.x)",
        "shared": "__shared__",
        "barrier": "__syncthreads()",
    },
    "metal": {
        "tid": "thread_position_in_threadgroup.x",
        "group": "threadgroup_position_in_grid.x",
        "group_size": "threads_per_threadgroup.x",
        "num_groups": "threadgroups_per_grid.x",
        "gid": "((int64_t)thread_position_in_grid.x)",
        "shared": "threadgroup",
        "barrier": "threadgroup_barrier(mem_flags::mem_threadgroup)",
    },
}

# Each prelude is the first header of every kernel.
PRELUDES = {"cuda": "_dialect/cuda.h", "metal": "_dialect/metal.h"}


def render(text: str, backend: str) -> str:
    """``text`` with its ``$tokens`` spelled for ``backend``; KeyError on an unknown token."""
    if backend not in BACKENDS:
        raise ValueError(f"[dialect] backend must be one of {BACKENDS}, got {backend!r}")
    return Template(text).substitute(_TOKENS[backend])


def header(backend: str, headers: tuple[str, ...] = ()) -> str:
    """The prelude of ``backend`` followed by a kernel's own headers, rendered."""
    parts = [kernel_source(PRELUDES[backend]), *(kernel_source(h) for h in headers)]
    return render("\n".join(parts), backend)
