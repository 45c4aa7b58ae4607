"""Cases and float64 references that the op tests share: one place, imported by the tests
of every back-end (test modules do not import each other)."""

from __future__ import annotations

import mlx.core as mx

from . import references as ref

DTYPES = [mx.float32, mx.float16, mx.bfloat16]

# (shapes, options) per op: lengths 1, 3 and 1000, non-power-of-two dims, no weights.
CPU_CASES = {
    "rms_norm": [
        (((1, 1),), {}),
        (((3, 7),), {}),
        (((1000, 33),), {}),
        (((2, 3, 1000),), {}),
        (((5, 4097),), {}),
        (((3, 8),), {"weight": "none"}),
        (((4, 64),), {"weight": "float32"}),
    ],
    "layer_norm": [
        (((1, 1),), {}),
        (((3, 7),), {}),
        (((1000, 33),), {"weight": "none", "bias": "none"}),
        (((2, 3, 1000),), {"bias": "none"}),
        (((5, 4097),), {"weight": "none"}),
    ],
    "rope": [
        (((1, 1, 1, 2),), {}),
        (((2, 3, 5, 6),), {"traditional": True}),
        (((1, 4, 1000, 32),), {"dims": 16}),
        (((2, 5, 3, 64),), {"layout": "BSHD"}),
        (((2, 7, 3, 10),), {"layout": "BSHD", "traditional": True, "dims": 6}),
        (((1, 3, 17, 8),), {"freqs": True}),
        (((3, 9, 16),), {}),
        (((2, 2, 3, 5, 12),), {"offset": 7}),
        (((3, 4, 5, 16),), {"per_batch": True}),
        (((3, 5, 4, 16),), {"per_batch": True, "layout": "BSHD"}),
    ],
    "swiglu": [(((1,),), {}), (((3, 7),), {}), (((1000, 33),), {}), (((2, 3, 1000),), {})],
    "geglu": [
        (((1,),), {}),
        (((3, 7),), {"approximate": "none"}),
        (((1000, 33),), {"approximate": "tanh"}),
        (((2, 3, 1000),), {"approximate": "fast"}),
    ],
    # x's shape, w's packed shape: in-features that are not powers of two (192, 320), 1, 3 and
    # 17 rows, leading batch dims, every width MLX packs, each group size, W untransposed.
    "quantized_matmul": [
        (((1, 192), (40, 24)), {"bits": 4, "group_size": 64}),
        (((3, 320), (24, 80)), {"bits": 8, "group_size": 32}),
        (((17, 256), (8, 32)), {"bits": 4, "group_size": 128}),
        (((2, 3, 192), (16, 12)), {"bits": 2, "group_size": 32}),
        (((192,), (24, 18)), {"bits": 3, "group_size": 64}),
        (((5, 128), (8, 24)), {"bits": 6, "group_size": 128}),
        (((4, 320), (16, 50)), {"bits": 5, "group_size": 64}),
        (((3, 64), (64, 16)), {"bits": 4, "group_size": 64, "transpose": False}),
    ],
    # Lengths 1, 3 and 1000, other axes than the last, reversed, an initial state.
    "linear_scan": [
        (((4, 1),), {}),
        (((3, 7, 5),), {"axis": 1, "h0": "given"}),
        (((2, 1000),), {"reverse": True}),
        (((3, 2, 300),), {"h0": "given", "reverse": True}),
        (((6,),), {"axis": 0}),
    ],
    "associative_scan": [
        (((3, 1),), {}),
        (((2, 7, 5),), {"op": "max", "axis": 1, "reverse": True}),
        (((3, 1000),), {"op": "logaddexp"}),
        (((4, 33),), {"op": "mul", "inclusive": False}),
        (((5, 17),), {"op": "min", "reverse": True}),
        (((2, 300),), {"op": "add", "inclusive": False}),
    ],
    # q's (batch, tokens, k_heads, k_dims): one token and several, GQA (2 value heads per key
    # head), gates per key dim, a mask, no initial state, value dims other than key dims, a
    # prefill over several chunks.
    "gated_delta": [
        (((1, 1, 2, 32),), {"heads_v": 4}),
        (((2, 3, 1, 16),), {"heads_v": 3, "gate": "vector", "mask": True}),
        (((1, 17, 2, 8),), {"v_dims": 12, "state": "none"}),
        (((2, 70, 2, 16),), {"heads_v": 4}),  # chunks of tokens: several, the last short
    ],
    # u's (batch, length, channels): lengths 1, 3 and 1000; Mamba-1 (a decay per channel and
    # state, softplus, bias, gate) and Mamba-2 (one decay per head, groups of B and C, a state).
    "selective_scan": [
        (((2, 1, 6),), {"states": 4, "state": "float32"}),
        (((1, 3, 12),), {"states": 8, "groups": 3, "gate": True, "bias": True, "softplus": True}),
        (((1, 1000, 4),), {"states": 3, "softplus": True}),
        (
            ((2, 37, 24),),
            {"heads": 6, "states": 16, "groups": 2, "decay": "scalar", "state": "float32"},
        ),  # fmt: skip
        (((1, 300, 16),), {"heads": 4, "states": 8, "decay": "scalar", "skip": False}),
    ],
    # a's (tokens, in), b's (experts, in, out): as for gather_qmm.
    "gather_mm": [
        (((1, 192), (4, 192, 40)), {"top_k": 2}),
        (((3, 320), (8, 320, 24)), {"top_k": 3}),
        (((17, 33), (5, 33, 8)), {"sorted_indices": True}),
        (((500, 64), (8, 64, 16)), {"top_k": 2, "sorted_indices": True}),
    ],
    # x's (tokens, in), w's packed (experts, out, in * bits / 32): one token and several, each
    # top-k, sorted pairs (as mlx-lm's SwitchGLU sorts prefills), 1000 pairs, each width.
    "gather_qmm": [
        (((1, 192), (4, 40, 24)), {"top_k": 2}),
        (((3, 320), (8, 24, 80)), {"top_k": 3, "bits": 8, "group_size": 32}),
        (((17, 256), (5, 8, 32)), {"bits": 4, "group_size": 128, "sorted_indices": True}),
        (((6, 128), (16, 24, 8)), {"top_k": 4, "bits": 2, "group_size": 32}),
        (((500, 64), (8, 16, 8)), {"top_k": 2, "sorted_indices": True}),
        (((2, 192), (4, 16, 18)), {"top_k": 2, "bits": 3}),
    ],
}

# (atol, rtol) by (op, variant, back-end, dtype) where MLX's own op is less exact than its
# op's tolerances: its CPU quantized_matmul accumulates 16-bit inputs in their own dtype.
MLX_TOLERANCES = {
    ("quantized_matmul", "builtin", "cpu", mx.float16): (1.5e-2, 1e-2),
    ("quantized_matmul", "builtin", "cpu", mx.bfloat16): (0.2, 4e-2),
    ("gather_qmm", "builtin", "cpu", mx.float16): (1.5e-2, 1e-2),
    ("gather_qmm", "builtin", "cpu", mx.bfloat16): (0.2, 4e-2),
    ("gather_qmm", "sort", "cpu", mx.float16): (1.5e-2, 1e-2),
    ("gather_qmm", "sort", "cpu", mx.bfloat16): (0.2, 4e-2),
}

# (op, variant, back-end, dtype) where MLX's own op raises, and the test checks it does: its
# CPU gather_mm takes float32 only (the op's default serves the others).
MLX_RAISES = {
    (name, variant, "cpu", dtype)
    for name in ("gather_mm",)
    for variant in ("builtin", "sort")
    for dtype in (mx.float16, mx.bfloat16)
}

# Each op's float64 NumPy reference, called with the op's arguments in canonical order.
REFERENCES = {
    "rms_norm": lambda a: ref.rms_norm(*a),
    "layer_norm": lambda a: ref.layer_norm(*a),
    "rope": lambda a: ref.rope(*a),
    "swiglu": lambda a: ref.swiglu(*a),
    "geglu": lambda a: ref.geglu(*a),
    "quantized_matmul": lambda a: ref.quantized_matmul(*a),
    "linear_scan": lambda a: ref.linear_scan(*a),
    "gated_delta": lambda a: ref.gated_delta(*a),
    "selective_scan": lambda a: ref.selective_scan(*a),
    "associative_scan": lambda a: ref.associative_scan(*a),
    "gather_mm": lambda a: ref.gather_mm(*a),
    "gather_qmm": lambda a: ref.gather_qmm(*a),
    "flash_attention": lambda a: ref.attention(
        *a[:3], causal=a[3], scale=a[4], layout=a[5], mask=a[6]
    ),
    "sliding_window_attention": lambda a: ref.attention(
        *a[:3], window=a[3], scale=a[4], layout=a[5]
    ),
    "chunked_cross_attention": lambda a: ref.attention(*a[:3], scale=a[4], layout=a[5]),
}


# (shapes, options) per op: rows of length 1, 3, 1000 and 4097, a single row, many rows.
KERNEL_CASES = {
    "rms_norm": [
        (((1, 4096),), {}),
        (((3, 1000),), {}),
        (((1000, 1024),), {}),
        (((5, 4097),), {}),
        (((7, 3),), {}),
        (((2, 3, 8),), {}),
        (((9, 1024),), {"weight": "none"}),
        (((9, 1024),), {"weight": "float32"}),
    ],
    "layer_norm": [
        (((1, 4096),), {}),
        (((3, 1000),), {"bias": "none"}),
        (((1000, 1024),), {"weight": "none", "bias": "none"}),
        (((5, 4097),), {"weight": "none"}),
        (((7, 3),), {}),
    ],
    "rope": [
        (((1, 1, 1, 8),), {}),
        (((2, 3, 37, 64),), {"traditional": True}),
        (((2, 37, 3, 64),), {"layout": "BSHD"}),
        (((1, 5, 8, 128),), {"layout": "BSHD", "traditional": True, "dims": 96}),
        (((2, 4, 9, 80),), {"freqs": True, "dims": 64}),
        (((3, 2, 5, 32),), {"offset": 100}),
        (((3, 4, 9, 64),), {"per_batch": True}),
        (((3, 9, 4, 64),), {"per_batch": True, "layout": "BSHD"}),
    ],
    "swiglu": [(((1,),), {}), (((3, 7),), {}), (((1000, 1024),), {}), (((2, 4097),), {})],
    "geglu": [
        (((1, 8),), {}),
        (((3, 1000),), {"approximate": "tanh"}),
        (((1000, 1024),), {"approximate": "fast"}),
        (((2, 4097),), {"approximate": "none"}),
    ],
    # Rows 1, 3, 10 (in leading dims), 17, 20 and 32; in-features 192, 320 and 4160; out-features
    # that leave a group's columns partly empty; each width the kernels unpack and group size.
    "quantized_matmul": [
        (((1, 4096), (4096, 512)), {"bits": 4, "group_size": 64}),
        (((3, 320), (40, 40)), {"bits": 4, "group_size": 64}),
        (((17, 192), (24, 48)), {"bits": 8, "group_size": 32}),
        (((2, 5, 256), (72, 32)), {"bits": 4, "group_size": 128}),
        (((32, 1024), (64, 256)), {"bits": 8, "group_size": 64}),
        (((1, 512), (100, 32)), {"bits": 2, "group_size": 32}),
        (((7, 4096), (256, 256)), {"bits": 2, "group_size": 128}),
        # 20 rows (two mma tiles of 16) and in-features that end inside an mma step.
        (((20, 4160), (40, 520)), {"bits": 4, "group_size": 64}),
    ],
    # Lengths 1, 3 and 1000; the scan axis first, in the middle (an SSM's (batch, length,
    # channels)) and last; reversed; an initial state; states not a multiple of a group.
    "linear_scan": [
        (((4, 1),), {}),
        (((3, 1000, 130),), {"axis": 1, "h0": "given"}),
        (((2, 7, 5),), {"axis": 1, "reverse": True}),
        (((3, 300),), {"h0": "given", "reverse": True}),
        (((1000, 6),), {"axis": 0}),
    ],
    # Decoding and a prefill at Qwen3-Next's head dims; a gate per key dim, a mask; value dims
    # that leave a group's rows partly empty.
    "gated_delta": [
        (((2, 1, 4, 128),), {"heads_v": 8}),
        (((1, 33, 2, 128),), {"heads_v": 4, "gate": "vector", "mask": True}),
        (((1, 5, 2, 64),), {"v_dims": 40, "state": "none"}),
    ],
    # Mamba-2's decoding step (128 states, a state) and a prefill with groups; Mamba-1's 16
    # states with every option; rows that leave a group partly empty.
    "selective_scan": [
        (((2, 1, 192),), {"heads": 3, "states": 128, "decay": "scalar", "state": "float32"}),
        (((1, 65, 256),), {"heads": 4, "states": 64, "groups": 2, "decay": "scalar"}),
        (
            ((1, 33, 40),),
            {"states": 16, "gate": True, "bias": True, "softplus": True, "state": "float32"},
        ),  # fmt: skip
    ],
    # One token and eight; runs of one expert longer than a pass (24 sorted pairs over 4
    # experts); out-features that leave a group's columns partly empty; each width.
    "gather_qmm": [
        (((1, 1024), (32, 256, 128)), {"top_k": 4}),
        (((8, 320), (16, 40, 40)), {"top_k": 4}),
        (((3, 192), (4, 24, 48)), {"top_k": 2, "bits": 8, "group_size": 32}),
        (((24, 256), (4, 72, 32)), {"group_size": 128, "sorted_indices": True}),
        (((17, 512), (8, 100, 32)), {"top_k": 2, "bits": 2, "group_size": 32}),
        # Runs of about 40 rows an expert: several passes of the mma kernel's 16 or 32.
        (((60, 384), (3, 24, 48)), {"top_k": 2}),
    ],
}


def covering(variant, problem: dict) -> list[dict]:
    """Configs that the variant allows for ``problem``, covering each parameter value that any
    allowed config has at least once (not the whole product: each config is a compile)."""
    allowed = [c for c in variant.configs() if variant.allows(problem, c)]
    chosen: list[dict] = []
    for key in variant.space:
        for value in variant.space[key]:
            if any(c[key] == value for c in chosen):
                continue
            match = next((c for c in allowed if c[key] == value), None)
            if match is not None:
                chosen.append(match)
    return chosen


# Attention-kernel cases by variant: (op, q shape, kv shape, options).
# GQA 1, 4 and 8, head dims 32 to 256 (80 and 192 fill part of a lane group), one key, odd
# lengths, windows 1, 16 and past the start.
DECODE_CASES = [
    ("flash_attention", (2, 8, 1, 128), (2, 2, 1000, 128), {"causal": True}),
    ("flash_attention", (1, 3, 3, 80), (1, 37, 3, 80), {"causal": True, "layout": "BSHD"}),
    ("flash_attention", (2, 8, 5, 64), (2, 2, 1000, 64), {}),
    ("flash_attention", (1, 4, 1, 32), (1, 4, 1, 32), {"causal": True}),
    ("flash_attention", (1, 1, 4, 256), (1, 4097, 1, 256), {"layout": "BSHD"}),
    ("flash_attention", (3, 4, 2, 192), (3, 4, 300, 192), {"causal": True, "scale": 0.3}),
    (
        "sliding_window_attention",
        (1, 1, 8, 128),
        (1, 1000, 2, 128),
        {"layout": "BSHD", "w": 16},
    ),
    ("sliding_window_attention", (2, 4, 4, 64), (2, 4, 37, 64), {"w": 1}),
    ("sliding_window_attention", (1, 8, 2, 96), (1, 1, 100, 96), {"w": 500}),
]
ATTENTION_CASES = {
    "decode": DECODE_CASES,
    # The tensor-core decode: 16-bit only, head dims 32 to 128 in steps of 32, up to 16 query
    # rows per KV head (GQA 8 with 2 queries fills the tile's upper rows).
    "decode_mma": [
        *(DECODE_CASES[i] for i in (0, 3, 6, 7, 8)),
        ("flash_attention", (1, 3, 3, 64), (1, 37, 3, 64), {"causal": True, "layout": "BSHD"}),
        ("flash_attention", (2, 8, 2, 64), (2, 1, 1000, 64), {}),
        ("flash_attention", (1, 1, 4, 96), (1, 4097, 1, 96), {"layout": "BSHD"}),
        ("flash_attention", (3, 4, 2, 128), (3, 4, 300, 128), {"causal": True, "scale": 0.3}),
        # 12 rows (the upper half partly filled), head dim 32 over many keys, and a window
        # that starts past key 0 and spans several splits.
        ("flash_attention", (1, 8, 3, 64), (1, 2, 500, 64), {"causal": True}),
        ("flash_attention", (2, 1, 4, 32), (2, 700, 2, 32), {"layout": "BSHD"}),
        ("sliding_window_attention", (1, 4, 1, 64), (1, 2, 5000, 64), {"w": 3000}),
    ],
    # Query lengths 1, 5, 37, 1000 and partial tiles; fewer queries than keys and more (not
    # causal); GQA 1, 4 and 8; head dims 32 to 256; windows 1, 16, 100 and past the start.
    "flash": [
        ("flash_attention", (1, 8, 1000, 64), (1, 2, 1000, 64), {"causal": True}),
        ("flash_attention", (2, 37, 4, 80), (2, 37, 4, 80), {"layout": "BSHD"}),
        ("flash_attention", (1, 8, 5, 128), (1, 1, 300, 128), {"causal": True}),
        ("flash_attention", (1, 2, 1, 32), (1, 2, 1, 32), {"causal": True}),
        (
            "flash_attention",
            (1, 100, 2, 256),
            (1, 100, 2, 256),
            {"causal": True, "layout": "BSHD", "scale": 0.2},
        ),
        ("flash_attention", (2, 3, 70, 192), (2, 3, 33, 192), {}),
        ("flash_attention", (1, 4, 129, 96), (1, 4, 129, 96), {"causal": True}),
        (
            "sliding_window_attention",
            (1, 1000, 4, 64),
            (1, 1000, 1, 64),
            {"layout": "BSHD", "w": 16},
        ),
        ("sliding_window_attention", (2, 4, 37, 128), (2, 4, 37, 128), {"w": 1}),
        ("sliding_window_attention", (1, 8, 50, 96), (1, 2, 100, 96), {"w": 500}),
        ("sliding_window_attention", (1, 2, 300, 64), (1, 2, 300, 64), {"w": 100}),
    ],
}
# (kernel, case, dtype) no config can serve: 32 float32 keys and values of head dim 192 or 256
# overflow the flash tile's threadgroup memory (test_flash_kernel_declines_what_it_cannot_hold).
UNSERVED = {("flash", 4, mx.float32), ("flash", 5, mx.float32)}
# The dtypes each kernel is written for (tensor cores take 16-bit operands).
ATTENTION_DTYPES = {"decode_mma": (mx.float16, mx.bfloat16)}
ATTENTION_PARAMS = [
    (v, i, dtype)
    for v, cases in ATTENTION_CASES.items()
    for i in range(len(cases))
    for dtype in ATTENTION_DTYPES.get(v, DTYPES)
    if (v, i, dtype) not in UNSERVED
]
ATTENTION_TOLERANCES = {
    mx.float32: (2e-5, 1e-4),
    mx.float16: (4e-3, 1e-2),
    mx.bfloat16: (3e-2, 4e-2),
}


def attention_call(name, q_shape, kv_shape, options, dtype, seed=0):
    """The canonical arguments of an attention case, and its float64 reference."""
    keys = mx.random.split(mx.random.key(seed), 3)
    q, k, v = (
        mx.random.normal(s, key=kk).astype(dtype)
        for s, kk in zip((q_shape, kv_shape, kv_shape), keys)
    )
    options = dict(options)
    scale, layout = options.get("scale"), options.get("layout", "BHSD")
    if name == "sliding_window_attention":
        args = (q, k, v, options["w"], scale, layout, None, None)
    else:
        args = (q, k, v, options.get("causal", False), scale, layout, None, None)
    return args, REFERENCES[name](args)
