"""A toy op, ``y = 2 x``, with deliberately faulty and slow variants (never registered)."""

from __future__ import annotations

import mlx.core as mx

from mlx_primitives.problem import EXACT, Dim, bucket, dtype_name
from mlx_primitives.registry import Example, Op, Variant
from mlx_primitives.tuning_record import TuningRecord


def double(x):
    return x * 2


def _slow(x):
    # Correct but far slower: many passes over the data.
    y = x
    for _ in range(3):
        y = mx.sin(y) * 0 + y
    return y * 2


def _fail_build():
    raise RuntimeError("compiler exploded")


def _raise(x):
    raise ValueError("boom at call time")


def make_op(extra: list[Variant] | None = None, feed: int | None = 0) -> Op:
    variants = [
        Variant("default", lambda: double),
        Variant("slow", lambda: _slow),
        Variant(
            "tiled",
            lambda block, unroll: double,
            space={"block": (32, 64, 128), "unroll": (1, 2)},
            supports=lambda p, cfg: cfg["block"] <= max(p["cols"], 32),
        ),
        Variant("nan", lambda: lambda x: x * mx.nan),
        Variant("wrong", lambda: lambda x: x * 3),
        Variant("broken_build", _fail_build),
        Variant("raises", lambda: _raise),
        Variant("gpu_only", lambda: double, backends=frozenset({"cuda", "metal"})),
        *(extra or []),
    ]

    def problem(x):
        return dtype_name(x.dtype), (bucket(x.size // x.shape[-1]), x.shape[-1])

    def toy(x):
        return OP(x)

    OP = Op(
        "toy",
        signature=toy,
        dims=(Dim("rows"), Dim("cols", EXACT)),
        problem=problem,
        reference=double,
        example=lambda shapes, dtype, key: (mx.random.normal(shapes[0], key=key).astype(dtype),),
        case=lambda p: (((p["rows"], p["cols"]),), {}),
        default=lambda p, backend: ("default", {}),
        variants=variants,
        presets={"quick": [Example(((64, 256),), "float32")]},
        feed=feed,
    )
    return OP


def record(toy: Op, x, variant: str, params: dict | None = None, **overrides) -> TuningRecord:
    """A valid tuning record for ``toy(x)`` (``toy(*x)`` for a tuple) on this machine, with
    ``overrides`` applied."""
    return TuningRecord.from_dict(record_data(toy, x, variant, params, **overrides))


def record_data(toy: Op, x, variant: str, params: dict | None = None, **overrides) -> dict:
    """:func:`record`'s JSON form, with ``overrides`` applied (which may make it malformed)."""
    from mlx_primitives import __version__
    from mlx_primitives.hardware import detect_chip

    rec = {
        "chip": detect_chip().slug,
        "op": toy.name,
        "problem": toy.problem(*(x if isinstance(x, tuple) else (x,))).key,
        "variant": variant,
        "params": params or {},
        "median_s": 1e-5,
        "spread_s": 1e-7,
        "default_variant": "default",
        "default_params": {},
        "default_median_s": 2e-5,
        "error": 0.0,
        "mlx_version": mx.__version__,
        "package_version": __version__,
        "source_hash": toy.variant(variant).source_hash
        if variant in {v.name for v in toy.variants}
        else "",
        "created_at": "2026-11-26T00:00:00+00:00",
    }
    rec.update(overrides)
    return rec
