"""Correctness checks: a candidate against the op's reference evaluated in float64.

Every check draws fresh random inputs, runs the candidate with poisoned outputs (custom kernels
start from NaN, so an element left unwritten fails), and compares with the reference computed
on the CPU in float64. Tolerances are per dtype; a non-finite value where the reference is
finite never passes. Ops with ``check_slices`` (attention) compare large calls on slices of the
output whose reference is cheap, and then require every element of the output to be finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .dialect import poisoned

# (atol, rtol) per output dtype: a few units of the dtype's rounding, which is what a
# correct float32-accumulating kernel gets wrong against float64.
TOLERANCES = {
    "float64": (1e-10, 1e-8),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 5e-3),
    "bfloat16": (8e-3, 3e-2),
}
# What mlxp-tune tunes (float64 runs on the CPU only, where MLX's own ops serve it).
TUNED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CheckResult:
    """Outcome of a check: ``error`` is ``|got - ref| / |ref|`` (norms) of the worst output."""

    ok: bool
    error: float
    reason: str = ""


def as_list(out) -> list:
    return [out] if isinstance(out, mx.array) else list(out)


def to_float64(value):
    """Floating arrays upcast to float64 on the CPU; anything else unchanged."""
    if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
        return value.astype(mx.float64, stream=mx.cpu)
    if isinstance(value, (list, tuple)):
        return type(value)(to_float64(v) for v in value)
    return value


def reference_float64(reference: Callable, args: tuple) -> list[mx.array]:
    """``reference(*args)`` computed in float64 on the CPU, then rounded once to float32 (7
    digits: far below every tolerance) so comparisons can run on the device."""
    with mx.stream(mx.cpu):
        out = reference(*to_float64(args))
        out = [o.astype(mx.float32) for o in as_list(out)]
        mx.eval(out)
    return out


def expected(op, args: tuple) -> list[tuple[Callable | None, list[mx.array]]]:
    """``(select, want)`` pairs a candidate's outputs are compared with: the whole call's
    float64 reference (``select`` None), or each of the op's check slices' with the function
    that selects that slice of the outputs. ``args`` are the op's arguments in order."""
    slices = op.check_slices(args) if op.check_slices else None
    if not slices:
        return [(None, reference_float64(op.reference, args))]
    return [(select, reference_float64(op.reference, a)) for a, select in slices]


def check_outputs(got: list, want: list, tolerance: tuple[float, float]) -> CheckResult:
    """Compare outputs with :func:`expected`'s pairs."""
    worst = 0.0
    if want[0][0] is not None:  # only slices are compared: the rest must at least be finite
        finite = [mx.all(mx.isfinite(g)) for g in got]
        mx.eval(finite)
        if not all(f.item() for f in finite):
            return CheckResult(False, float("inf"), "an output has NaN or Inf values")
    for select, parts in want:
        verdict = compare(got if select is None else select(got), parts, tolerance)
        if not verdict.ok:
            return verdict
        worst = max(worst, verdict.error)
    return CheckResult(True, worst)


def compare(got: list, want: list[mx.array], tolerance: tuple[float, float]) -> CheckResult:
    """Compare outputs elementwise: ``|g - w| <= atol + rtol * |w|`` everywhere.

    The arithmetic runs on the default device; only a few scalars come back.
    """
    if len(got) != len(want):
        return CheckResult(False, float("inf"), f"{len(got)} outputs, expected {len(want)}")
    atol, rtol = tolerance
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            return CheckResult(
                False, float("inf"), f"output {i} has shape {g.shape}, expected {w.shape}"
            )
        g = g.astype(mx.float32)
        finite_ref = mx.isfinite(w)
        diff = mx.abs(g - w)
        excess = diff - (atol + rtol * mx.abs(w))
        stats = [
            mx.any(finite_ref & ~mx.isfinite(g)),
            mx.sqrt(mx.sum(mx.square(mx.where(finite_ref, diff, 0)))),
            mx.sqrt(mx.sum(mx.square(mx.where(finite_ref, w, 0)))),
            mx.sum(excess > 0),
            mx.argmax(excess.reshape(-1)),
        ]
        mx.eval(stats)
        non_finite, diff_norm, ref_norm, bad, at = (s.item() for s in stats)
        if non_finite:
            return CheckResult(False, float("inf"), f"output {i} has NaN or Inf values")
        worst = max(worst, diff_norm / ref_norm if ref_norm > 0 else diff_norm)
        if bad:
            idx = tuple(int(j) for j in np.unravel_index(at, w.shape))
            return CheckResult(
                False,
                worst,
                f"output {i} mismatch at {idx}: got {g[idx].item():.6g}, "
                f"expected {w[idx].item():.6g} ({bad} of {w.size} elements off)",
            )
    return CheckResult(True, worst)


def tolerance(op, dtype: str) -> tuple[float, float]:
    """``op``'s (atol, rtol) for outputs of the dtype named ``dtype``."""
    return op.tolerances.get(dtype, TOLERANCES[dtype])


def run_checked(op, fn: Callable, args: tuple, dtype: str, want: list | None = None) -> CheckResult:
    """Run ``fn(*args)`` with poisoned outputs and compare with ``op``'s reference: the
    outputs' dtypes with the reference's on the same arguments, their values with the
    reference in float64 (``want``: :func:`expected` of ``args``, where already made);
    ``dtype`` names the inputs' dtype. A failure to run is a failed check."""
    try:
        with poisoned():
            out = as_list(fn(*args))
            mx.eval(out)
    except Exception as e:  # any failure of a candidate is a rejection, not a crash
        return CheckResult(False, float("inf"), f"{type(e).__name__}: {e}")
    # The reference's graph in the call's own dtypes, never evaluated: its outputs' dtypes.
    dtypes = [o.dtype for o in as_list(op.reference(*args))]
    for i, (o, d) in enumerate(zip(out, dtypes)):
        if o.dtype != d:
            return CheckResult(False, float("inf"), f"output {i} has dtype {o.dtype}, expected {d}")
    want = expected(op, args) if want is None else want
    return check_outputs(out, want, tolerance(op, dtype))
