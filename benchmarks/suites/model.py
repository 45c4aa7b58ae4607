"""A real model through the library: an mlx-lm model with random weights decoding through
mlx-lm's own generation loop and KV cache, stock against ``mp.patch_mlx()``, in one run.

- ``decode``: tokens per second of ``generate_step`` after a short prompt (the prompt's
  prefill left out), stock and patched, their rounds interleaved;
- ``prefill``: tokens per second of the prompt's forward pass, likewise.

Needs mlx-lm (``pip install mlx-lm``). On the CPU a small Llama of the shapes below; on a GPU
the per-layer shapes of Llama-3-8B with the layers cut to ``--layers``.
"""

from __future__ import annotations

import importlib
import statistics
import time

import mlx.core as mx

import mlx_primitives as mp
from mlx_primitives.hardware import current_backend

from ..common import header

SECTIONS = ("decode", "prefill")
# (hidden, layers, heads, kv heads, MLP, vocab): a small Llama for the CPU, Llama-3-8B's layer.
SHAPES = {
    "cpu": (512, 8, 8, 2, 1408, 4096),
    "gpu": (4096, 4, 32, 8, 14336, 128256),
}
DTYPES = {"cpu": mx.float32, "gpu": mx.bfloat16}


def _model(shape, dtype):
    from mlx_lm.models import llama

    hidden, layers, heads, kv_heads, mlp, vocab = shape
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
    )
    model = llama.Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, args


def _decode_s(model, prompt: mx.array, tokens: int) -> float:
    """Seconds per decoded token through mlx-lm's generate_step (first token: the prefill)."""
    generate = importlib.import_module("mlx_lm.generate")
    steps = generate.generate_step(prompt, model, max_tokens=tokens + 1)
    next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / tokens


def _prefill_s(model, prompt: mx.array) -> float:
    """Seconds per prompt token of one forward pass with a fresh KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    start = time.perf_counter()
    mx.eval(model(prompt[None], cache=cache))
    return (time.perf_counter() - start) / prompt.size


def _compare(measure, rounds: int) -> dict:
    """``measure()`` stock and patched, rounds interleaved, warmed up first."""
    times = {"stock": [], "patched": []}
    for r in range(rounds + 1):
        for mode in ("stock", "patched") if r % 2 else ("patched", "stock"):
            if mode == "patched":
                mp.patch_mlx()
            try:
                t = measure()
            finally:
                mp.unpatch_mlx()
            if r:  # the first round compiles and fills caches
                times[mode].append(t)
    stock, patched = (statistics.median(times[m]) for m in ("stock", "patched"))
    return {
        "stock_tok_s": 1 / stock,
        "patched_tok_s": 1 / patched,
        "patched_vs_stock": stock / patched,
        "rounds": rounds,
        "stock_samples_s": times["stock"],
        "patched_samples_s": times["patched"],
    }


def run(args) -> dict:
    chosen = args.section or list(SECTIONS)
    kind = "cpu" if current_backend() == "cpu" else "gpu"
    shape, dtype = SHAPES[kind], DTYPES[kind]
    model, margs = _model(shape, dtype)
    result = header("model")
    result["mlx_lm_version"] = importlib.import_module("mlx_lm").__version__
    result["method"] = (
        "mlx-lm llama.Model with random weights; decode: seconds per token of "
        "mlx_lm.generate.generate_step after the prompt (greedy), prefill: one forward pass "
        "of the prompt with a fresh KV cache; stock and with mlx_primitives.patch_mlx(), "
        "rounds interleaved after a warm-up round, medians"
    )
    result["model"] = {
        "hidden": shape[0],
        "layers": shape[1],
        "heads": shape[2],
        "kv_heads": shape[3],
        "mlp": shape[4],
        "vocab": shape[5],
        "dtype": str(dtype).rsplit(".", 1)[-1],
    }
    prompt = mx.random.randint(0, margs.vocab_size, (32,))
    rows = []
    if "decode" in chosen:
        tokens = 48 if kind == "cpu" else 128
        row = _compare(lambda: _decode_s(model, prompt, tokens), rounds=9)
        rows.append({"section": "decode", "prompt": prompt.size, "tokens": tokens, **row})
        print(f"[model] decode {row['patched_vs_stock']:.3f}x stock", flush=True)
    if "prefill" in chosen:
        long = mx.random.randint(0, margs.vocab_size, (512 if kind == "cpu" else 2048,))
        row = _compare(lambda: _prefill_s(model, long), rounds=5)
        rows.append({"section": "prefill", "prompt": long.size, **row})
        print(f"[model] prefill {row['patched_vs_stock']:.3f}x stock", flush=True)
    result["results"] = rows
    return result
