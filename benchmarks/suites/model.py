"""Real models through the library: mlx-lm models with random weights decoding through mlx-lm's
own generation loop and KV cache, in one run:

- ``stock``: mlx-lm as it is;
- ``patched``: after ``mlx_primitives.lm.patch(model)``, with the databases as they are;
- ``tuned``: patched, after the problems the patched model hits were recorded
  (``mp.record``) and tuned (``mlxp-tune tune --recorded``, into a scratch database).

Sections: ``decode``, tokens per second of ``generate_step`` after a short prompt (its prefill
left out, after the same decoding untimed in the same mode); ``prefill``, tokens per second of
a forward pass of a long prompt (after one untimed pass in the same mode); ``build``, the host
time to build one decode step's graph (what a GPU's decode waits on where the host is the
slower). Rounds of the three modes are interleaved. On the CPU small models (Qwen3-Next's
hybrid among them); on a GPU the per-layer shapes of Llama-3-8B, Qwen3-30B-A3B and Mamba-2
2.7B with the layers cut (``layers`` in the result).
Needs mlx-lm (``pip install -e ".[lm]"``).
"""

from __future__ import annotations

import importlib
import os
import statistics
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn

import mlx_primitives as mp
from mlx_primitives import dispatch, lm
from mlx_primitives.hardware import current_backend

from ..common import MEASURED, header

SECTIONS = ("decode", "prefill", "build")
MODES = ("stock", "patched", "tuned")
_SMALL = {"vocab_size": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
_MOE = {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "tie_word_embeddings": False}  # fmt: skip
SMALL_LLAMA = {"hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1408,
               "num_attention_heads": 8, "num_key_value_heads": 2, **_SMALL}  # fmt: skip
SMALL_QWEN3_MOE = {"hidden_size": 512, "num_hidden_layers": 2, "intermediate_size": 1024,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                   "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256,
                   "max_position_embeddings": 4096, **_MOE, **_SMALL}  # fmt: skip
# Qwen3-Next's hybrid: gated delta (linear attention) layers through mp.gated_delta_update once
# patched, every fourth layer full attention, a mixture of experts with a shared expert.
SMALL_QWEN3_NEXT = {**SMALL_QWEN3_MOE, "num_hidden_layers": 4, "linear_num_value_heads": 8,
                    "linear_num_key_heads": 4, "linear_key_head_dim": 64,
                    "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4,
                    "shared_expert_intermediate_size": 256, "partial_rotary_factor": 0.25,
                    "full_attention_interval": 4}  # fmt: skip
# Per-layer shapes of the real models, the layers cut to 4.
LLAMA_3_8B = {"hidden_size": 4096, "num_hidden_layers": 4, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0}  # fmt: skip
QWEN3_30B_A3B = {"hidden_size": 2048, "num_hidden_layers": 4, "intermediate_size": 6144,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                 "max_position_embeddings": 40960, "vocab_size": 151936,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, **_MOE}  # fmt: skip
# Mamba-2's SSM layers (through mp.ssm_update once patched): a small one, and Mamba-2 2.7B's
# per-layer shapes (80 heads of 64, 128 states) with the layers cut to 4.
_MAMBA2 = {"n_groups": 1, "conv_kernel": 4, "layer_norm_epsilon": 1e-5, "use_bias": False,
           "use_conv_bias": True, "tie_word_embeddings": True, "time_step_rank": "auto",
           "time_step_limit": (0.0, float("inf"))}  # fmt: skip
SMALL_MAMBA2 = {"hidden_size": 512, "num_heads": 16, "head_dim": 64, "intermediate_size": 1024,
                "state_size": 64, "num_hidden_layers": 4, "vocab_size": 4096,
                **_MAMBA2}  # fmt: skip
MAMBA2_2_7B = {"hidden_size": 2560, "num_heads": 80, "head_dim": 64, "intermediate_size": 5120,
               "state_size": 128, "num_hidden_layers": 4, "vocab_size": 50288,
               **_MAMBA2}  # fmt: skip
# (name, model_type, config, dtype, quantized) per device kind.
MODELS = {
    "cpu": (
        ("llama", "llama", SMALL_LLAMA, "float32", False),
        ("llama 4-bit", "llama", SMALL_LLAMA, "float32", True),
        ("qwen3-moe 4-bit", "qwen3_moe", SMALL_QWEN3_MOE, "float32", True),
        ("mamba2", "mamba2", SMALL_MAMBA2, "float32", False),
        ("qwen3-next", "qwen3_next", SMALL_QWEN3_NEXT, "float32", False),
    ),
    "gpu": (
        ("llama-3-8b 4-bit", "llama", LLAMA_3_8B, "bfloat16", True),
        ("llama-3-8b", "llama", LLAMA_3_8B, "bfloat16", False),
        ("qwen3-30b-a3b 4-bit", "qwen3_moe", QWEN3_30B_A3B, "bfloat16", True),
        ("mamba2-2.7b", "mamba2", MAMBA2_2_7B, "bfloat16", False),
    ),
}
TOKENS = {"cpu": (48, 512), "gpu": (128, 2048)}


def _model(model_type: str, config: dict, dtype: str, quantized: bool) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict({"model_type": model_type, **config}))
    model.set_dtype(getattr(mx, dtype))
    if quantized:
        nn.quantize(model, 64, 4)
    model.eval()  # as mlx-lm's load leaves it (Qwen3-Next steps its recurrence when training)
    mx.eval(model.parameters())
    return model


def _decode_s(model, prompt: mx.array, tokens: int) -> float:
    """Seconds per decoded token through mlx-lm's generate_step (first token: the prefill),
    after the same decoding untimed: a mode's first steps at each length of the KV cache make
    their decisions (and probes)."""
    generate = importlib.import_module("mlx_lm.generate")
    for _ in generate.generate_step(prompt, model, max_tokens=tokens + 1):
        pass
    steps = generate.generate_step(prompt, model, max_tokens=tokens + 1)
    next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / tokens


def _build_s(model, prompt: mx.array, steps: int) -> float:
    """Host seconds to build one decode step's graph after ``prompt``: the model's forward
    with its KV cache, each step evaluated after its build is timed (median of ``steps``)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    token, built = prompt[None, -1:], []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, cache=cache)
        built.append(time.perf_counter() - start)
        mx.eval(out)
    return statistics.median(built)


def _prefill_s(model, prompt: mx.array) -> float:
    """Seconds per prompt token of a forward pass with a fresh KV cache, after one untimed
    pass: a mode's first call after it was entered makes its decisions (and probes)."""
    from mlx_lm.models.cache import make_prompt_cache

    mx.eval(model(prompt[None], cache=make_prompt_cache(model)))
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    mx.eval(model(prompt[None], cache=cache))
    return (time.perf_counter() - start) / prompt.size


class _Modes:
    """Switches one model between the modes: patched or not, reading the tuned scratch
    database or the user's."""

    def __init__(self, model, tuned_db: str | None):
        self.model, self.tuned_db = model, tuned_db
        self.user_db = os.environ.get("MLXP_TUNING_DB")

    def enter(self, mode: str) -> None:
        db = self.tuned_db if mode == "tuned" else self.user_db
        if db is None:
            os.environ.pop("MLXP_TUNING_DB", None)
        else:
            os.environ["MLXP_TUNING_DB"] = db
        dispatch.reset()
        if mode != "stock":
            lm.patch(self.model)

    def leave(self) -> None:
        lm.unpatch(self.model)


def _compare(modes: _Modes, names: tuple, measure, rounds: int) -> dict:
    """``measure()`` in each mode, rounds interleaved (order rotating), after a warm-up."""
    times = {m: [] for m in names}
    for r in range(rounds + 1):
        shift = r % len(names)
        for mode in names[shift:] + names[:shift]:
            modes.enter(mode)
            try:
                t = measure()
            finally:
                modes.leave()
            if r:  # the first round compiles and fills caches
                times[mode].append(t)
    row = {"rounds": rounds}
    for mode in names:
        row[f"{mode}_tok_s"] = 1 / statistics.median(times[mode])
        row[f"{mode}_samples_s"] = times[mode]
    # Each round's own ratio: the machine's drift from round to round falls on both alike.
    for mode in names[1:]:
        ratios = [s / t for s, t in zip(times[names[0]], times[mode])]
        row[f"{mode}_vs_stock"] = statistics.median(ratios)
    return row


def _tune_recorded(model, work, db: str, budget_s: float | None) -> int:
    """Record what the patched model hits while ``work()`` runs, tune it into ``db`` (within
    ``budget_s`` seconds where given, the costliest problems first); returns the problems
    recorded."""
    from mlx_primitives.tuning.cli import main as cli

    preset = "quick" if current_backend() == "cpu" else "default"
    modes = _Modes(model, db)
    modes.enter("tuned")
    try:
        with mp.record(db):
            work()
    finally:
        modes.leave()
    budget = [] if budget_s is None else ["--time-budget", str(budget_s)]
    cli(["tune", "--recorded", "--preset", preset, "--db", db, *budget])
    from mlx_primitives.store.database import TuningDB

    found = TuningDB(db)
    try:
        return len(found.hits())
    finally:
        found.close()


def _run_model(name, model_type, config, dtype, quantized, chosen, tokens, budget_s,
               models: list) -> None:  # fmt: skip
    """One model's rows in every mode, after its recorded problems were tuned, appended to
    ``models`` (its rows to the suite's measured rows, section by section, so that a run
    stopped before its end keeps them)."""
    decode_tokens, prefill_tokens = tokens
    model = _model(model_type, config, dtype, quantized)
    vocab = config["vocab_size"]
    prompt = mx.random.randint(0, vocab, (32,), key=mx.random.key(0))
    long = mx.random.randint(0, vocab, (prefill_tokens,), key=mx.random.key(1))
    measures = {
        "decode": lambda: _decode_s(model, prompt, decode_tokens),
        "prefill": lambda: _prefill_s(model, long),
        "build": lambda: _build_s(model, prompt, decode_tokens),
    }
    db = os.path.join(tempfile.mkdtemp(prefix="mlxp-model-"), "tuning.sqlite")
    report = str(lm.patch(model))
    lm.unpatch(model)
    recorded = _tune_recorded(model, lambda: [measures[s]() for s in chosen], db, budget_s)
    rows = []
    models.append({
        "name": name,
        "model_type": model_type,
        "config": config,
        "dtype": dtype,
        "quantized": quantized,
        "patch_report": report,
        "recorded_problems": recorded,
        "results": rows,
    })  # fmt: skip
    for section in chosen:
        row = _compare(_Modes(model, db), MODES, measures[section], rounds=9)
        count = prefill_tokens if section == "prefill" else decode_tokens
        rows.append({"section": section, "tokens": count, **row})
        MEASURED["rows"].append({"model": name, **rows[-1]})
        print(
            f"[model] {name} {section}: patched {row['patched_vs_stock']:.3f}x, "
            f"tuned {row['tuned_vs_stock']:.3f}x stock",
            flush=True,
        )


def run(args) -> dict:
    chosen = args.section or list(SECTIONS)
    kind = "cpu" if current_backend() == "cpu" else "gpu"
    result = header("model")
    result["mlx_lm_version"] = importlib.import_module("mlx_lm").__version__
    result["method"] = (
        "mlx-lm models with random weights; decode: seconds per token of "
        "mlx_lm.generate.generate_step after a 32-token prompt (greedy), after the same "
        "decoding untimed in the mode, prefill: a forward "
        "pass of a long prompt with a fresh KV cache, after one untimed pass in the mode; "
        "build: host seconds to build one decode step's graph (the model's forward with its "
        "KV cache, median of the steps, each evaluated after it is timed); stock, patched "
        "(mlx_primitives.lm.patch) and tuned (patched, after mp.record of one decode and one "
        "prefill and mlxp-tune tune "
        f"--recorded, preset {'quick' if kind == 'cpu' else 'default'}, into a scratch "
        "database), rounds interleaved after a warm-up round; tokens/s from the medians, "
        "the ratios the median of each round's own ratio to stock"
    )
    if args.tune_budget is not None:
        result["method"] += f"; each model's tuning cut at {args.tune_budget:g} s"
    result["models"] = models = []  # in the header too: a stopped run writes what it has
    for spec in MODELS[kind]:
        _run_model(*spec, chosen, TOKENS[kind], args.tune_budget, models)
    result["results"] = MEASURED["rows"]
    return result
