"""Mixture of experts, in one run:

- ``ops``: gather_qmm and gather_mm per problem of their preset, the tuned dispatch and every
  variant against MLX's built-in; on a GPU, for decoding, the share of a copy moving the
  selected experts' bytes (their packed weights, scales and biases, x and the output);
- ``block``: ``mp.SwitchGLU`` against mlx-lm's ``SwitchGLU`` (4-bit, group 64, the same
  weights), at the expert shapes of Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b on a GPU
  (small ones on the CPU), decoding (1 and 8 tokens) and a prefill.

Needs mlx-lm for ``block`` (``pip install -e ".[lm]"``).
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import mlx_primitives as mp
from mlx_primitives.hardware import current_backend
from mlx_primitives.registry import op

from ..common import against, header, measure, open_db, run_or_skip
from .norms import SIZES, copy_ceiling

SECTIONS = ("ops", "block")
BASELINE = "builtin"
# (name, experts, top_k, hidden, expert hidden) per device kind.
BLOCKS = {
    "gpu": (
        ("qwen3-30b-a3b", 128, 8, 2048, 768),
        ("mixtral-8x7b", 8, 2, 4096, 14336),
        ("gpt-oss-20b", 32, 4, 2880, 2880),
    ),
    "cpu": (("small", 16, 4, 256, 128),),
}
TOKENS = {"gpu": (1, 8, 2048), "cpu": (1, 8, 256)}


def _selected_bytes(args) -> int:
    """Bytes a decoding call must move: the packed weights, scales and biases of the experts
    it selects, x and the output."""
    x, w, scales, biases, _, rhs = args[:6]
    used = np.unique(np.array(rhs)).size
    per_expert = (w.nbytes + scales.nbytes + biases.nbytes) // w.shape[0]
    out = rhs.size * w.shape[1] * x.dtype.size
    return used * per_expert + x.nbytes + out


def _ops(args, gpu: bool, sizes: str) -> tuple[list, list]:
    db, tuner = open_db(args.tune)
    rows, failed = [], []
    for name in ("gather_qmm", "gather_mm"):
        o = op(name)
        for ex in o.presets[SIZES[sizes]]:
            op_rows = run_or_skip(failed, o, ex, tuner, db, args.budget, baseline=BASELINE)
            if not op_rows:
                continue
            d = op_rows[0]
            line = f"{ex.label():56s} {d['variant']:>10s} {d['vs_baseline']:5.2f}x"
            decoding = name == "gather_qmm" and ex.shapes[0][0] <= 8
            if gpu and decoding:
                call = o.example(ex.shapes, getattr(mx, ex.dtype), mx.random.key(0),
                                 **dict(ex.options))  # fmt: skip
                moved = _selected_bytes(call)
                same = copy_ceiling(moved, args.budget, d["idle_s"])["gb_per_s"]
                d["selected_bytes"] = moved
                d["of_selected_copy"] = moved / d["median_s"] / 1e9 / same
                line += f" {d['of_selected_copy']:5.0%} of a copy"
            print(f"{line} {d['median_s'] * 1e6:9.1f} us", flush=True)
            rows.extend(op_rows)
    if db is not None:
        db.close()
    return rows, failed


def _block(kind: str, budget_s: float) -> list[dict]:
    lm = importlib.import_module("mlx_lm.models.switch_layers")
    dtype = mx.bfloat16 if kind == "gpu" else mx.float32

    def quantizable(path, module):
        return hasattr(module, "to_quantized") and type(module).__name__.startswith("Switch")

    rows = []
    for name, experts, top_k, hidden, inner in BLOCKS[kind]:
        theirs = lm.SwitchGLU(hidden, inner, experts)
        ours = mp.SwitchGLU(hidden, inner, experts)
        ours.load_weights(list(tree_flatten(theirs.parameters())))
        for model in (theirs, ours):
            model.set_dtype(dtype)
            nn.quantize(model, 64, 4, class_predicate=quantizable)
        mx.eval(theirs.parameters(), ours.parameters())
        for tokens in TOKENS[kind]:
            key = mx.random.key(tokens)
            x = mx.random.normal((tokens, hidden), key=key).astype(dtype)
            scores = mx.random.uniform(shape=(tokens, experts), key=key)
            indices = mx.argsort(scores, axis=-1)[:, :top_k]
            t_ours, t_theirs = measure(
                [(ours, (x, indices), {}), (theirs, (x, indices), {})], budget_s, feed=None
            )
            row = against(t_ours, t_theirs, "mlx_lm", section="block", model=name,
                          experts=experts, top_k=top_k, hidden=hidden, expert_hidden=inner,
                          tokens=tokens, dtype=str(dtype).rsplit(".", 1)[-1])  # fmt: skip
            rows.append(row)
            print(f"[moe] {name} {tokens:5d} tokens: {row['vs_mlx_lm']:.2f}x mlx-lm", flush=True)
    return rows


def run(args) -> dict:
    chosen = args.section or list(SECTIONS)
    gpu = current_backend() != "cpu"
    kind = "gpu" if gpu else "cpu"
    sizes = args.sizes or ("large" if gpu else "small")
    result = header("moe")
    rows, failed = [], []
    if "ops" in chosen:
        rows, failed = _ops(args, gpu, sizes)
    blocks = []
    if "block" in chosen:
        try:  # the ops' rows are kept where mlx-lm cannot be imported
            result["mlx_lm_version"] = importlib.import_module("mlx_lm").__version__
        except ImportError as e:
            result["block_not_run"] = f"mlx-lm does not import: {e}"
            print(f"[moe] block section not run: {result['block_not_run']}", flush=True)
        else:
            blocks = _block(kind, args.budget)
    return {
        **result,
        "sizes": sizes,
        "tuned": bool(args.tune),
        "results": rows,
        "blocks": blocks,
        "failed": failed,
    }
