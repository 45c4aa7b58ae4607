"""The custom attention kernels shared by the attention ops (``kernel_variants/attention/``).

For a few queries over many keys (decoding with a KV cache) the work is reading K and V once:
``decode.k`` spreads each KV head's keys over ``splits`` groups, every group serving all the
query rows that read that head (GQA shares the reads), and ``combine.k`` merges the splits.
``decode_mma.k`` (CUDA only) splits the same way but forms scores and weighted values on tensor
cores, 16 keys per warp step.
For long queries ``flash.k`` tiles queries and keys through threadgroup memory and visits only
the key tiles a causal mask or a window lets its rows see.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import mlx.core as mx

from ..dialect.kernel import (
    MAX_GRID,
    SHARED,
    GpuKernel,
    Plans,
    float_bits,
    itemsize,
    with_reference_transforms,
)
from ..hardware import current_backend, detect_chip
from ..registry import GPU_BACKENDS, Variant
from . import _attention as att

DECODE = GpuKernel("attention/decode.k", ["q", "k", "v"], ["part", "stats"])
DECODE_MMA = GpuKernel(
    "attention/decode_mma.k",
    ["q", "k", "v"],
    ["part", "stats"],
    headers=("_dialect/warp.{backend}.h", "_dialect/mma.cuda.h"),
)
COMBINE = GpuKernel("attention/combine.k", ["part", "stats", "q"], ["out"])
FLASH = GpuKernel(
    "attention/flash.k", ["q", "k", "v"], ["out"], headers=("_dialect/warp.{backend}.h",)
)

SPACE = {
    "split": (512, 128, 256, 1024, 2048),
    "warps": (4, 2, 8),
    "vec": (8, 4, 2),
    "lanes": (16, 8, 32),
    "unroll": (2, 1, 4),
}
# Query positions the kernel serves: beyond this a query tile (or the built-in) is the tool.
MAX_Q_LEN = 16
# Floats of query slices a thread keeps (and as many accumulators) before it spills.
MAX_REGISTERS = 64
FLASH_SPACE = {"warps": (4, 2, 8), "rows": (4, 2, 8), "keys": (1, 2)}
MMA_SPACE = {"split": (2048, 1024, 4096, 512, 256), "warps": (4, 8, 2)}
# Query rows of a KV head one mma tile holds (its M side), and the largest head dim whose
# operands and accumulators a lane keeps in registers without spilling.
MMA_ROWS = 16
MMA_MAX_DIM = 128
MMA_MIN_SM = 80
_COMBINE_THREADS = 256


def _chunks(d: int, vec: int, lanes: int) -> int:
    """Vectors of ``vec`` elements each of ``lanes`` lanes holds of a key of ``d``."""
    return -(-(d // vec) // lanes)


def _unmasked(problem: dict) -> bool:
    """The kernels take causal masks and windows, no mask array and no sinks."""
    return problem.get("mask", "none") == "none" and not problem.get("sinks", False)


def supports(problem: dict, p: dict) -> bool:
    """Whether the config can serve ``problem`` (bucketed values are upper bounds)."""
    size = itemsize(problem["dtype"])
    d, vec = problem["head_dim"], p["vec"]
    if size is None or not _unmasked(problem) or problem["q_len"] > MAX_Q_LEN:
        return False
    if d % vec or vec * size > 16:
        return False
    rows = problem["group"] * problem["q_len"]
    lanes, chunks = p["lanes"], _chunks(d, vec, p["lanes"])
    streams = p["warps"] * 32 // lanes
    return (
        lanes // 2 < d // vec  # no lane without data twice over
        and rows * vec * chunks <= MAX_REGISTERS
        # The portable kernel's merge of key streams fits both back-ends.
        and streams * rows * (d + 2) * 4 <= min(SHARED.values())
        and p["split"] >= streams * p["unroll"]  # every stream has keys
        and p["split"] <= max(_visible_keys(problem), 128)  # larger: the one-split plan again
    )


def _visible_keys(problem: dict) -> int:
    """The keys some query row may see (at most): the cache, or the window's reach."""
    keys = problem["kv_len"]
    if problem.get("window"):
        keys = min(keys, problem["window"] + problem["q_len"] - 1)
    return keys


def mma_supports(problem: dict, p: dict) -> bool:
    """Whether the tensor-core decode config can serve ``problem``: 16-bit inputs, head dims
    that are multiples of 32 up to :data:`MMA_MAX_DIM`, at most :data:`MMA_ROWS` query rows per
    KV head, a GPU with bfloat16 mma and movmatrix (sm_80 or later; unknown passes: the tuner's
    check decides)."""
    d, rows = problem["head_dim"], problem["group"] * problem["q_len"]
    if problem["dtype"] not in ("float16", "bfloat16") or not _unmasked(problem):
        return False
    arch = re.fullmatch(r"sm_(\d+)", detect_chip().arch)
    if arch and int(arch.group(1)) < MMA_MIN_SM:
        return False
    return (
        d % 32 == 0
        and d <= MMA_MAX_DIM
        and rows <= MMA_ROWS
        and p["warps"] * rows * (d + 2) * 4 <= SHARED["cuda"]
        and p["split"] >= p["warps"] * 16  # every warp has keys
        and p["split"] <= max(_visible_keys(problem), 256)  # larger: the one-split plan again
    )


def _split_kv(kernel: GpuKernel, split: int, warps: int, extra: dict) -> Callable:
    """A decode kernel's forward: ``kernel`` over the splits, then :data:`COMBINE`. What does
    not change as the KV cache grows (the templates, the combine's launch) is kept per query
    shape and dtype, KV heads and flags: a decoding step's host time is mostly this."""
    threads = warps * 32
    plans = Plans()

    def plan(q, hkv: int, causal, scale, bshd: bool, window) -> tuple:
        b, lq, hq, d = q.shape if bshd else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        g = hq // hkv
        template = {**_template(q, causal, scale, bshd, window), "G": g, "LQ": lq}
        main = list({**template, **extra, "WARPS": warps}.items())
        combine = COMBINE.plan(
            {key: template[key] for key in ("T", "D", "G", "LQ", "BSHD")},
            grid=(-(-q.size // _COMBINE_THREADS) * _COMBINE_THREADS, 1, 1),
            threadgroup=(_COMBINE_THREADS, 1, 1),
            output_shapes=[q.shape],
            output_dtypes=[q.dtype],
        )
        return main, combine, b * hkv, g * lq, d, lq

    def forward(q, k, v, causal, scale, layout, window):
        bshd = layout == "BSHD"
        hkv, lk = (k.shape[2], k.shape[1]) if bshd else (k.shape[1], k.shape[2])
        key = (q.shape, q.dtype, hkv, causal, scale, bshd, window)
        made = plans.get(key)
        if made is None:
            made = plans.keep(key, plan(q, hkv, causal, scale, bshd, window))
        main, combine, heads, rows, d, lq = made
        lo, hi = att.key_range(0, lq, lq, lk, causal, window or None)
        splits = max(1, -(-(hi - lo) // split))
        if heads * splits * threads > MAX_GRID:
            raise ValueError(f"[{kernel.name}] {heads * splits} threadgroups are over MLX's limit")
        part, stats = kernel.launch(
            [q, k, v],
            {
                "template": main,
                "grid": (heads * splits * threads, 1, 1),
                "threadgroup": (threads, 1, 1),
                "output_shapes": [(heads, splits, rows, d), (heads, splits, rows, 2)],
                "output_dtypes": [mx.float32, mx.float32],
            },
        )
        return COMBINE.launch([part, stats, q], combine)[0]

    return with_reference_transforms(forward, _reference)


def _reference(q, k, v, causal, scale, layout, window):
    return att.reference(q, k, v, scale=scale, causal=causal, window=window or None, layout=layout)


def _template(q, causal: bool, scale, bshd: bool, window: int) -> dict:
    """The template constants every attention kernel takes."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return {
        "T": q.dtype,
        "D": d,
        "BSHD": bshd,
        "CAUSAL": bool(causal or window),
        "WINDOW": window or 0,
        "SCALE_BITS": float_bits(scale * math.log2(math.e)),
    }


def flash_shared_bytes(d: int, size: int, warps: int, rows: int, keys: int) -> int:
    """Threadgroup memory of a flash tile: q (float), K (padded) and V (the input dtype), and
    the tile's probabilities (float)."""
    d4, bq, bk = d // 4, warps * rows, 32 * keys
    padded = d4 + 1 if d4 % 2 == 0 else d4
    return bq * d4 * 16 + bk * (padded + d4) * 4 * size + bq * bk * 4


def flash_supports(problem: dict, p: dict) -> bool:
    """Whether the flash config can serve ``problem`` (bucketed values are upper bounds)."""
    size = itemsize(problem["dtype"])
    d = problem["head_dim"]
    if size is None or not _unmasked(problem) or d % 4 or d > 256:
        return False
    rows, bq = p["rows"], p["warps"] * p["rows"]
    limit = SHARED.get(current_backend(), min(SHARED.values()))
    return (
        rows * -(-d // 128) * 4 <= MAX_REGISTERS  # accumulators per lane
        and flash_shared_bytes(d, size, p["warps"], rows, p["keys"]) <= limit
        and bq <= max(2 * problem["q_len"], 4)  # larger tiles only add idle rows
        and 32 * p["keys"] <= max(problem["kv_len"], 32)
    )


def _flash(warps: int, rows: int, keys: int) -> Callable:
    threads = warps * 32
    plans = Plans()

    def plan(q, causal, scale, bshd: bool, window) -> dict:
        b, lq, hq = (q.shape[0], *q.shape[1:3]) if bshd else (q.shape[0], q.shape[2], q.shape[1])
        template = {
            **_template(q, causal, scale, bshd, window),
            "WARPS": warps,
            "RPW": rows,
            "KPL": keys,
        }
        return FLASH.plan(
            template,
            grid=(b * hq * -(-lq // (warps * rows)) * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[q.shape],
            output_dtypes=[q.dtype],
        )

    def forward(q, k, v, causal, scale, layout, window):
        bshd = layout == "BSHD"
        key = (q.shape, q.dtype, causal, scale, bshd, window)  # it reads the keys' length from k
        launch = plans.get(key)
        if launch is None:
            launch = plans.keep(key, plan(q, causal, scale, bshd, window))
        return FLASH.launch([q, k, v], launch)[0]

    return with_reference_transforms(forward, _blocked_reference)


def _blocked_reference(q, k, v, causal, scale, layout, window):
    # Long queries: gradients through the blocked composition keep memory O(seq x window)
    # where the dense reference would hold every score.
    return att.blocked(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        window=window or None,
        layout=layout,
        block_q=256,
        block_k=512,
    )


def flash_variant(wrap: Callable[[Callable], Callable]) -> Variant:
    """The flash kernel as a variant; ``wrap`` as for :func:`decode_variant`."""
    return Variant(
        "flash",
        lambda warps, rows, keys: wrap(_flash(warps, rows, keys)),
        backends=GPU_BACKENDS,
        space=FLASH_SPACE,
        supports=flash_supports,
        sources=FLASH.files,
        description="custom kernel: q and k tiles in threadgroup memory, hidden tiles skipped",
    )


def decode_variant(wrap: Callable[[Callable], Callable]) -> Variant:
    """The decode kernel as a variant; ``wrap(fn)`` makes ``fn(q, k, v, causal, scale,
    layout, window)`` take the op's arguments."""
    return Variant(
        "decode",
        lambda split, warps, vec, lanes, unroll: wrap(
            _split_kv(DECODE, split, warps, {"VEC": vec, "LPK": lanes, "UNROLL": unroll})
        ),
        backends=GPU_BACKENDS,
        space=SPACE,
        supports=supports,
        sources=DECODE.files + COMBINE.files,
        description="custom kernel: split-KV decode for short queries over long KV",
    )


def decode_mma_variant(wrap: Callable[[Callable], Callable]) -> Variant:
    """The tensor-core decode kernel as a variant (CUDA only); ``wrap`` as for
    :func:`decode_variant`."""
    return Variant(
        "decode_mma",
        lambda split, warps: wrap(_split_kv(DECODE_MMA, split, warps, {})),
        backends=frozenset({"cuda"}),
        space=MMA_SPACE,
        supports=mma_supports,
        sources=DECODE_MMA.files + COMBINE.files,
        description="custom kernel: split-KV decode on tensor cores (CUDA, 16-bit inputs)",
    )
