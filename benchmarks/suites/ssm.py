"""State-space layers against what a model runs without this library, in one run:

- ``selective``: ``mp.selective_scan`` against the sequential composition (one MLX step per
  position, as a direct port of Mamba's recurrence runs), at a Mamba layer's channels and
  states (small on the CPU);
- ``gated_delta``: ``mp.gated_delta_update`` against mlx-lm's ``gated_delta_update`` (its
  path on this back-end) at Qwen3-Next's linear-attention heads, decoding and a prefill;
- ``ssm``: ``mp.ssm_update`` against mlx-lm's ``ssm_update`` (Mamba-2's SSM, its path on this
  back-end) at Mamba-2 2.7B's heads, decoding and prefills.

The mlx-lm sections need mlx-lm (``pip install -e ".[lm]"``).
"""

from __future__ import annotations

import mlx.core as mx

import mlx_primitives as mp
from mlx_primitives.hardware import current_backend

from ..common import against, header, measure

SECTIONS = ("selective", "gated_delta", "ssm")

# (batch, length, channels, states) per device kind: Mamba-1 2.8B's 5120 inner channels with
# its gate, step-size bias and softplus (the selective_scan preset's Mamba-1 problem).
SELECTIVE = {
    "cpu": ((1, 1024, 64, 16), (1, 4096, 64, 16)),
    "gpu": ((1, 1024, 5120, 16), (1, 4096, 5120, 16)),
}


def _sequential(u, delta, A, B, C, D, z, delta_bias):
    """Mamba's recurrence one position at a time, in float32 (the step sizes through softplus,
    the output gated by silu(z))."""
    f32 = mx.float32
    u, delta, A, B, C, D, z = (v.astype(f32) for v in (u, delta, A, B, C, D, z))
    delta = mx.logaddexp(delta + delta_bias, 0.0)
    h = mx.zeros((u.shape[0], u.shape[2], A.shape[1]), f32)
    ys = []
    for t in range(u.shape[1]):
        dt = delta[:, t, :, None]
        h = mx.exp(dt * A) * h + dt * u[:, t, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = (mx.stack(ys, axis=1) + u * D) * z * mx.sigmoid(z)
    return y.astype(mx.bfloat16)


def _selective(kind: str, budget_s: float) -> list[dict]:
    rows = []
    for batch, length, channels, states in SELECTIVE[kind]:
        k = mx.random.split(mx.random.key(length), 8)
        dtype = mx.bfloat16
        u = mx.random.normal((batch, length, channels), key=k[0]).astype(dtype)
        delta = (0.5 * mx.random.normal(u.shape, key=k[1]) - 3.0).astype(dtype)
        A = -mx.exp(mx.random.normal((channels, states), key=k[2]))
        B = mx.random.normal((batch, length, states), key=k[3]).astype(dtype)
        C = mx.random.normal((batch, length, states), key=k[4]).astype(dtype)
        D = mx.random.normal((channels,), key=k[5])
        z = mx.random.normal((batch, length, channels), key=k[6]).astype(dtype)
        delta_bias = 0.1 * mx.random.normal((channels,), key=k[7])
        args = (u, delta, A, B, C, D, z, delta_bias)
        mx.eval(args)
        calls = [(mp.selective_scan, args, {"delta_softplus": True}), (_sequential, args, {})]
        ours, seq = measure(calls, budget_s, feed=None)
        row = against(ours, seq, "sequential", section="selective",
                      shape=[batch, length, channels, states], dtype="bfloat16")  # fmt: skip
        rows.append(row)
        print(f"[ssm] selective {length} tokens: {row['vs_sequential']:.1f}x", flush=True)
    return rows


# (batch, tokens) per device kind, at Qwen3-Next's 16 key and 32 value heads of 128 dims.
GATED_DELTA = {"cpu": ((1, 1), (1, 64)), "gpu": ((1, 1), (8, 1), (1, 4096))}


def _gated_delta(kind: str, budget_s: float) -> list[dict]:
    from mlx_lm.models import gated_delta as lm

    rows = []
    for batch, tokens in GATED_DELTA[kind]:
        k = mx.random.split(mx.random.key(tokens), 8)
        q, kk = (mx.random.normal((batch, tokens, 16, 128), key=x) for x in k[:2])
        q, kk = lm.normalize_qk(q, kk, inv_scale=128**-0.5, eps=1e-6)
        dtype = mx.bfloat16
        v = mx.random.normal((batch, tokens, 32, 128), key=k[2])
        a, b = (mx.random.normal((batch, tokens, 32), key=x) for x in k[3:5])
        A_log, dt_bias = (mx.random.normal((32,), key=x) for x in k[5:7])
        state = 0.1 * mx.random.normal((batch, 32, 128, 128), key=k[7])
        args = (*(x.astype(dtype) for x in (q, kk, v, a, b)), A_log, dt_bias, state)
        mx.eval(args)
        ours, theirs = measure(
            [(mp.gated_delta_update, args, {}), (lm.gated_delta_update, args, {})],
            budget_s,
            feed=None,
        )
        row = against(ours, theirs, "mlx_lm", section="gated_delta",
                      shape=[batch, tokens, 16, 32, 128], dtype="bfloat16")  # fmt: skip
        rows.append(row)
        print(f"[ssm] gated_delta {batch}x{tokens}: {row['vs_mlx_lm']:.2f}x mlx-lm", flush=True)
    return rows


# (batch, tokens, heads, head dim, groups, states) per device kind: Mamba-2 2.7B's 80 heads of
# 64 with 128 states (small on the CPU).
SSM = {
    "cpu": ((1, 1, 8, 16, 1, 16), (1, 256, 8, 16, 1, 16)),
    "gpu": ((1, 1, 80, 64, 1, 128), (8, 1, 80, 64, 1, 128), (1, 512, 80, 64, 1, 128),
            (1, 4096, 80, 64, 1, 128)),
}  # fmt: skip


def _ssm(kind: str, budget_s: float) -> list[dict]:
    from mlx_lm.models import ssm as lm

    rows = []
    for shape in SSM[kind]:
        batch, tokens, heads, head_dim, groups, states = shape
        k = mx.random.split(mx.random.key(tokens), 7)
        dtype = mx.bfloat16
        x = mx.random.normal((batch, tokens, heads, head_dim), key=k[0]).astype(dtype)
        B, C = (mx.random.normal((batch, tokens, groups, states), key=kk).astype(dtype)
                for kk in k[1:3])  # fmt: skip
        dt = mx.random.normal((batch, tokens, heads), key=k[3]).astype(dtype)
        A_log = mx.log(mx.arange(1, heads + 1, dtype=mx.float32))
        D, dt_bias = mx.ones((heads,), dtype), mx.ones((heads,))
        # Decoding carries a state; a prefill starts without one, as mlx-lm's cache does.
        state = (0.1 * mx.random.normal((batch, heads, head_dim, states), key=k[4])
                 if tokens == 1 else None)  # fmt: skip
        args = (x, A_log, B, C, D, dt, dt_bias, state, (0.001, 100.0))
        mx.eval([a for a in args if isinstance(a, mx.array)])
        ours, theirs = measure([(mp.ssm_update, args, {}), (lm.ssm_update, args, {})], budget_s,
                               feed=None)  # fmt: skip
        row = against(ours, theirs, "mlx_lm", section="ssm", shape=list(shape), dtype="bfloat16")
        rows.append(row)
        print(f"[ssm] ssm {batch}x{tokens}: {row['vs_mlx_lm']:.2f}x mlx-lm", flush=True)
    return rows


def run(args) -> dict:
    chosen = args.section or list(SECTIONS)
    kind = "cpu" if current_backend() == "cpu" else "gpu"
    sections = {"selective": _selective, "gated_delta": _gated_delta, "ssm": _ssm}
    rows = [row for name in SECTIONS if name in chosen for row in sections[name](kind, args.budget)]
    return {**header("ssm"), "results": rows}
