"""Attention: per problem the tuned dispatch, every variant and the MLX built-in, in one run.

- ``problems``: the tuning presets of flash, sliding-window and chunked cross-attention;
- ``seed``: flash against naive attention at sequence 128-2048, batch 1, 2 and 4, both
  layouts, the naive baseline being the dense composition with the same causal mask;
- ``window``: a sliding window of 512 at sequence 16384, against MLX's fused attention with a
  dense mask;
- ``decode``: one query per sequence over an 8192-long cache, 32 query and 8 key/value heads,
  a batch of 8 sequences and a single one, in both layouts;
- ``memory``: peak memory of the tuned flash attention and of the naive one at 16384.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_primitives import dispatch
from mlx_primitives.hardware import current_backend
from mlx_primitives.ops._attention import qkv_shapes
from mlx_primitives.problem import parse_dtype
from mlx_primitives.registry import Example, op

from ..common import header, open_db, run_or_skip

OPS = ("flash_attention", "sliding_window_attention", "chunked_cross_attention")
# Per size: heads, head_dim and dtype of the seed table and the window and memory problems
# (the CPU runs fewer heads: the dense baseline costs seq^2 per head).
SCALE = {"small": (4, 64, "float32"), "large": (16, 128, "float16")}


def builtin(name: str) -> str:
    """The MLX built-in of an attention op, every row's baseline (its first variant: on the CPU
    a long call's default is the blocked composition)."""
    return op(name).variants[0].name


def seed_examples(size: str) -> list[Example]:
    h, d, dtype = SCALE[size]
    return [
        Example(qkv_shapes(b, h, h, s, s, d, lay), dtype, (("causal", True), ("layout", lay)))
        for lay in ("BHSD", "BSHD")
        for b in (1, 2, 4)
        for s in (128, 256, 512, 1024, 2048)
    ]


def window_example(size: str) -> Example:
    h, d, dtype = SCALE[size]
    # The sliding-window preset's problem on a GPU (32 query and 8 key/value heads).
    heads, kv_heads = (1, 1) if size == "small" else (32, 8)
    return Example(
        qkv_shapes(1, heads, kv_heads, 16384, 16384, d, "BHSD"),
        dtype,
        (("layout", "BHSD"), ("window", 512)),
    )


def decode_examples(size: str) -> list[Example]:
    dtype = "float32" if size == "small" else "float16"
    return [
        Example(qkv_shapes(batch, 32, 8, 1, 8192, 128, layout), dtype, options)
        for batch in (8, 1)
        for layout, options in (
            ("BHSD", (("causal", True),)),
            ("BSHD", (("causal", True), ("layout", "BSHD"))),
        )
    ]


def peak_memory(fn, args, kwargs) -> int:
    """Bytes of the peak of one evaluated call, inputs included."""
    mx.eval(args)
    mx.reset_peak_memory()
    mx.eval(fn(*args, **kwargs))
    return mx.get_peak_memory()


def memory(size: str) -> dict:
    h, d, dtype = SCALE[size]
    heads = 1 if size == "small" else 8
    o = op("flash_attention")
    args = o.example(
        qkv_shapes(1, heads, heads, 16384, 16384, d, "BHSD"),
        parse_dtype(dtype),
        mx.random.key(0),
        causal=True,
    )
    io = 4 * args[0].nbytes
    rows = {"io_bytes": io, "shape": list(args[0].shape), "dtype": dtype}
    fns = [("dispatch", o), ("blocked", o.variant("blocked").build(block_q=128, block_k=128))]
    if current_backend() != "cpu":
        fns.append(("flash", o.variant("flash").build(warps=4, rows=4, keys=1)))
    for name, fn in fns:
        rows[name] = peak_memory(fn, args, {})
    rows["dispatch_variant"] = dispatch.choose(o, o.problem(*args)).variant
    rows["naive_scores_bytes"] = heads * 16384 * 16384 * 4  # float32 scores of the dense path
    return rows


def run(args) -> dict:
    gpu = current_backend() != "cpu"
    size = args.sizes or ("large" if gpu else "small")
    db, tuner = open_db(args.tune)
    preset = "default" if size == "large" else "quick"
    sections = {
        "problems": [
            (name, ex, builtin(name)) for name in args.op or OPS for ex in op(name).presets[preset]
        ],
        "seed": [("flash_attention", ex, "dense") for ex in seed_examples(size)],
        "window": [
            ("sliding_window_attention", window_example(size), builtin("sliding_window_attention"))
        ],
        "decode": [
            ("flash_attention", ex, builtin("flash_attention")) for ex in decode_examples(size)
        ],
    }
    chosen = args.section or [*sections, "memory"]
    unknown = set(chosen) - {*sections, "memory"}
    if unknown:
        raise SystemExit(f"[attention] unknown sections {sorted(unknown)}: {[*sections, 'memory']}")
    result = {**header("attention"), "sizes": size, "tuned": bool(args.tune), "results": []}
    result["sections"] = chosen
    result["failed"] = []
    for section, problems in sections.items():
        if section not in chosen:
            continue
        for name, ex, baseline in problems:
            rows = run_or_skip(
                result["failed"], op(name), ex, tuner, db, args.budget, baseline=baseline
            )
            if not rows:
                continue
            for r in rows:
                r["section"] = section
            result["results"].extend(rows)
            d = rows[0]
            print(
                f"{section:8s} {name:24s} {ex.label():52s} {d['variant']:>14s} "
                f"{d['vs_baseline']:6.2f}x vs {d['baseline']}",
                flush=True,
            )
    if db is not None:
        db.close()
    if "memory" not in chosen:
        return result
    result["memory"] = memory(size)
    mem = result["memory"]
    print(
        f"memory at 16384: dispatch ({mem['dispatch_variant']}) "
        f"{mem['dispatch'] / mem['io_bytes']:.2f}x of q, k, v and out; blocked "
        f"{mem['blocked'] / mem['io_bytes']:.2f}x; flash kernel "
        f"{mem.get('flash', float('nan')) / mem['io_bytes']:.2f}x; naive scores alone "
        f"{mem['naive_scores_bytes'] / mem['io_bytes']:.0f}x",
        flush=True,
    )
    return result
