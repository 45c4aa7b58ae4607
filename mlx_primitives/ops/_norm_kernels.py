"""The custom-kernel variants of the row normalizations (rms_norm, layer_norm).

Both ops have the same two kernel families, in ``kernel_variants/<op>/``:

- ``row``: rows held in registers and read once; ``threads_per_row`` threads per row,
  ``rows_per_group`` rows per threadgroup, ``vec`` elements per load;
- ``looped``: one threadgroup per row looping over it, for rows too long for registers.
"""

from __future__ import annotations

from collections.abc import Callable

from ..dialect.kernel import GpuKernel, Plans, float_bits, itemsize, with_reference_transforms
from ..registry import GPU_BACKENDS, Variant
from ._common import norm_dtype

# Float registers a thread may hold for its part of a row before the row family spills.
MAX_REGISTERS = 64
MAX_GROUP = 1024

ROW_SPACE = {
    "threads_per_row": (32, 8, 16, 64, 128, 256, 512, 1024),
    "rows_per_group": (1, 2, 4, 8),
    "vec": (8, 1, 2, 4),
}
LOOPED_SPACE = {"threads_per_row": (128, 256, 512, 1024), "vec": (8, 1, 2, 4)}


def _vec_fits(problem: dict, vec: int) -> bool:
    # Loads of at most 16 bytes, for x and for its weight and bias, that tile the row exactly.
    names = [problem["dtype"], problem.get("weight", "none"), problem.get("bias", "none")]
    sizes = [itemsize(n) for n in names if n != "none"]
    return None not in sizes and vec * max(sizes) <= 16 and problem["dims"] % vec == 0


def _row_supports(problem: dict, p: dict) -> bool:
    tpr, rpg, vec, d = p["threads_per_row"], p["rows_per_group"], p["vec"], problem["dims"]
    per = -(-d // (tpr * vec))
    return (
        _vec_fits(problem, vec)
        and 32 <= tpr * rpg <= MAX_GROUP
        and per * vec <= MAX_REGISTERS
        and (tpr // 2) * vec < d  # at least half the threads of a row have work
        and rpg <= max(problem["rows"], 1)
    )


def _looped_supports(problem: dict, p: dict) -> bool:
    return _vec_fits(problem, p["vec"]) and p["threads_per_row"] * p["vec"] <= problem["dims"] * 2


# Kernel input name -> (its dtype's template name, the template flag saying it is given).
_VECTORS = {"w": ("W", "HAS_W"), "b": ("B_", "HAS_B")}


def norm_variants(op: str, reference: Callable, names: tuple[str, ...]) -> list[Variant]:
    """The ``row`` and ``looped`` kernel variants of ``op``, whose arguments are
    ``(x, *vectors, eps)``; ``names`` are the kernel's names of the vectors (``"w"``,
    ``"b"``), each an optional vector of ``x.shape[-1]`` elements."""
    arrays = ("x", *names, "y")
    row = GpuKernel(f"{op}/row.k", ["x", *names], ["y"], aligned=arrays)
    looped = GpuKernel(f"{op}/looped.k", ["x", *names], ["y"], aligned=arrays)

    def launcher(kernel: GpuKernel, tpr: int, rpg: int, vec: int) -> Callable:
        plans = Plans()

        def plan(x, vectors, eps) -> tuple:
            d = x.shape[-1]
            rows = x.size // d
            out_dtype = norm_dtype(x, *vectors)
            template = {"T": x.dtype}
            for name, v in zip(names, vectors):
                template[_VECTORS[name][0]] = x.dtype if v is None else v.dtype
            template.update(O=out_dtype, D=d, TPR=tpr, VEC=vec)
            if kernel is row:
                template["RPG"] = rpg
            for name, v in zip(names, vectors):
                template[_VECTORS[name][1]] = v is not None
            template["EPS_BITS"] = float_bits(eps)
            launch = kernel.plan(
                template,
                grid=(-(-rows // rpg) * tpr * rpg, 1, 1),
                threadgroup=(tpr * rpg, 1, 1),
                output_shapes=[(rows, d)],
                output_dtypes=[out_dtype],
            )
            return (rows, d), launch

        def forward(x, *rest):
            *vectors, eps = rest
            key = (x.shape, x.dtype, eps, *(None if v is None else v.dtype for v in vectors))
            made = plans.get(key)
            if made is None:
                made = plans.keep(key, plan(x, vectors, eps))
            flat, launch = made
            x2 = x.reshape(flat)
            # An absent vector's slot takes x: a placeholder the kernel never reads.
            (y,) = kernel.launch([x2, *(x2 if v is None else v for v in vectors)], launch)
            return y.reshape(x.shape)

        return with_reference_transforms(forward, reference)

    return [
        Variant(
            "row",
            lambda threads_per_row, rows_per_group, vec: launcher(
                row, threads_per_row, rows_per_group, vec
            ),
            backends=GPU_BACKENDS,
            space=ROW_SPACE,
            supports=_row_supports,
            sources=row.files,
            traced=True,
            description="custom kernel: rows in registers, read once",
        ),
        Variant(
            "looped",
            lambda threads_per_row, vec: launcher(looped, threads_per_row, 1, vec),
            backends=GPU_BACKENDS,
            space=LOOPED_SPACE,
            supports=_looped_supports,
            sources=looped.files,
            traced=True,
            description="custom kernel: one group per row, loops over it",
        ),
    ]
