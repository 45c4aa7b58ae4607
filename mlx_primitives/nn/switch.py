"""Mixture-of-experts layers: drop-ins for mlx-lm's ``SwitchLinear``,
``QuantizedSwitchLinear``, ``SwitchGLU`` and ``SwitchMLP`` (the same constructors and parameter
trees, so a model's weights load as they are), routed through the tuned gather ops, and
``SparseMoE``, a whole block: router, top-k, experts and the weighted combine."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import recording
from ..dispatch import Routes
from ..moe import compute_load_balancing_loss
from ..ops._gather import inverse
from ..ops.gated import swiglu
from ..ops.gather_mm import gather_mm
from ..ops.gather_qmm import OP as GATHER_QMM
from ..ops.gather_qmm import gather_qmm
from ..ops.quantized_matmul import MODES
from . import _fused

# The quantized experts' calls routed, shared: a route depends on the problem alone.
_ROUTES = Routes()
# From this many (token, expert) pairs a block sorts them by expert once for its three
# projections, as mlx-lm's SwitchGLU does; below it each tuned op decides (its ``sort``
# variant sorts where that wins).
SORT_PAIRS = 64


class SwitchLinear(nn.Module):
    """One linear layer per expert, ``x @ weight[e].T + bias[e]`` for each chosen ``e``.

    Args:
        input_dims: the input's features.
        output_dims: the output's features.
        num_experts: the number of experts.
        bias: learn an additive bias per expert.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = True):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        shape = (num_experts, output_dims, input_dims)
        self.weight = mx.random.uniform(low=-scale, high=scale, shape=shape)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def input_dims(self) -> int:
        return self.weight.shape[2]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self["weight"].swapaxes(-1, -2)
        y = gather_mm(x, weight, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y

    def to_quantized(
        self, group_size: int = 64, bits: int = 4, mode: str = "affine", global_scale=False
    ) -> QuantizedSwitchLinear:
        """This layer quantized (``nn.quantize`` calls it)."""
        experts, output_dims, input_dims = self.weight.shape
        layer = QuantizedSwitchLinear(
            input_dims, output_dims, experts, False, group_size, bits, mode, global_scale
        )
        layer._quantize(self.weight, global_scale)
        if "bias" in self:
            layer.bias = self.bias
        return layer


class QuantizedSwitchLinear(nn.Module):
    """:class:`SwitchLinear` with quantized expert weights (``weight``, ``scales``, ``biases``
    as ``mx.quantize`` packs them, per expert); frozen like mlx-lm's.

    Args:
        input_dims: the input's features.
        output_dims: the output's features.
        num_experts: the number of experts.
        bias: learn an additive bias per expert.
        group_size: values per scale and bias.
        bits: bits per code.
        mode: the quantization mode (see ``mx.quantize``).
        global_scale: one float32 scale per expert (``nvfp4`` only, as in mlx-lm).
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = True,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
        global_scale: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(
                f"[QuantizedSwitchLinear] mode must be one of {list(MODES)}, got {mode!r}"
            )
        self.group_size, self.bits, self.mode = group_size, bits, mode
        scale = math.sqrt(1 / input_dims)
        shape = (num_experts, output_dims, input_dims)
        self._quantize(mx.random.uniform(low=-scale, high=scale, shape=shape), global_scale)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    def _quantize(self, weight: mx.array, global_scale: bool = False) -> None:
        if global_scale:
            if self.mode != "nvfp4":
                raise ValueError(
                    f"[QuantizedSwitchLinear] a global scale needs mode='nvfp4', got {self.mode!r}"
                )
            scales = mx.max(mx.abs(weight), axis=(-2, -1)).astype(mx.float32)
            packed = [
                mx.quantize(w, self.group_size, self.bits, mode=self.mode, global_scale=s)
                for w, s in zip(weight, scales)
            ]
            self.weight = mx.stack([p[0] for p in packed])
            self.scales = mx.stack([p[1] for p in packed])
            self.biases, self.global_scale = None, scales
            return
        self.weight, self.scales, *biases = mx.quantize(
            weight, self.group_size, self.bits, mode=self.mode
        )
        self.biases = biases[0] if biases else None
        self.global_scale = None

    @property
    def input_dims(self) -> int:
        return self.scales.shape[2] * self.group_size

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight, scales, scale = self["weight"], self["scales"], self.get("global_scale")
        biases = self.get("biases")
        args = (x, weight, scales, biases, None, indices, True, self.group_size,
                self.bits, self.mode, scale, sorted_indices)  # fmt: skip
        if x.__class__ is mx.array and indices.__class__ is mx.array:
            # What changes between a layer's calls (the tokens, their experts, the order) and
            # between layers: the routes are shared, each checked for one layer's arrays.
            key = (
                x.shape,
                x.dtype,
                indices.shape,
                indices.dtype,
                weight.shape,
                scales.shape,
                scales.dtype,
                None if biases is None else biases.dtype,
                self.group_size,
                self.bits,
                self.mode,
                scale is None,
                sorted_indices,
            )
            y = _ROUTES.serving(key, GATHER_QMM, args)(*args)
        else:
            y = gather_qmm(*args[:11], sorted_indices=sorted_indices)  # the op's own error
        return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y


class _SwiGLU(nn.Module):
    """mlx-lm's ``SwiGLU`` activation module, ``silu(gate) * x``, through the tuned op."""

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return swiglu(gate, x)


def _sort(x: mx.array, indices: mx.array):
    """x's rows (``(..., 1, 1, K)``) once per pair in expert order, the sorted experts, and
    each pair's position in that order."""
    top_k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // top_k], flat[order], inverse(order)


def _through_experts(layers, x: mx.array, indices: mx.array) -> mx.array:
    """``layers(x, indices, sorted)`` on each (token, expert) pair; pairs sorted by expert
    once when there are many."""
    x = mx.expand_dims(x, (-2, -3))
    indices = mx.stop_gradient(indices)
    if indices.size < SORT_PAIRS:
        return layers(x, indices, False).squeeze(-2)
    xs, idx, back = _sort(x, indices)
    y = layers(xs, idx, True)[back]
    return mx.unflatten(y, 0, indices.shape).squeeze(-2)


class SwitchGLU(nn.Module):
    """The experts of a gated MLP: ``down(activation(up(x), gate(x)))`` for each expert routed
    to each token; a drop-in for mlx-lm's ``SwitchGLU``.

    Args:
        input_dims: the model's features.
        hidden_dims: each expert's hidden features.
        num_experts: the number of experts.
        activation: ``activation(up, gate)``; default SwiGLU, ``silu(gate) * up``.
        bias: learn biases.
    """

    def __init__(
        self,
        input_dims: int,
        hidden_dims: int,
        num_experts: int,
        activation: nn.Module | None = None,
        bias: bool = False,
    ):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)
        self.activation = _SwiGLU() if activation is None else activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if (
            x.__class__ is mx.array
            and indices.__class__ is mx.array
            and indices.size < SORT_PAIRS
            and self.activation.__class__ is _SwiGLU
            and not recording.active()  # each projection's call counted
        ):
            # Decoding: the three projections and gate as one compiled call.
            fused = _fused.serving(self, _kind, _block)
            if fused is not None:
                return fused[0](x, indices, *fused[1])

        def layers(x, idx, is_sorted):
            up = self.up_proj(x, idx, sorted_indices=is_sorted)
            gate = self.gate_proj(x, idx, sorted_indices=is_sorted)
            return self.down_proj(self.activation(up, gate), idx, sorted_indices=is_sorted)

        return _through_experts(layers, x, indices)


def _kind(layer: nn.Module) -> tuple | None:
    return _fused.layer_kind(layer, SwitchLinear, (QuantizedSwitchLinear,))


def _block(kind: tuple) -> Callable:
    """A SwitchGLU's forward, unsorted, as a function of its input, experts and arrays, for
    layers of ``kind``; each projection as its layer computes it."""
    if kind[0] == "linear":

        def gather(x, indices, weight):
            return gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices)

    else:
        _, group_size, bits, _ = kind

        def gather(x, indices, weight, scales, biases):
            return gather_qmm(x, weight, scales, biases, None, indices, True, group_size, bits,
                              "affine", None)  # fmt: skip

    def project(x, indices, *arrays):
        if not kind[-1]:
            return gather(x, indices, *arrays)
        return gather(x, indices, *arrays[:-1]) + mx.expand_dims(arrays[-1][indices], -2)

    def forward(x, indices, *arrays):
        gate, up, down = _fused.per_layer(kind, arrays)
        x = mx.expand_dims(x, (-2, -3))
        h = swiglu(project(x, indices, *gate), project(x, indices, *up))
        return project(h, indices, *down).squeeze(-2)

    return forward


class SwitchMLP(nn.Module):
    """The experts of a two-layer MLP, ``fc2(activation(fc1(x)))`` for each expert routed to
    each token; a drop-in for mlx-lm's ``SwitchMLP``.

    Args:
        input_dims: the model's features.
        hidden_dims: each expert's hidden features.
        num_experts: the number of experts.
        activation: the activation module; default exact GELU.
        bias: learn biases.
    """

    def __init__(
        self,
        input_dims: int,
        hidden_dims: int,
        num_experts: int,
        activation: nn.Module | None = None,
        bias: bool = False,
    ):
        super().__init__()
        self.fc1 = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.fc2 = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)
        self.activation = nn.GELU(approx="precise") if activation is None else activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        def layers(x, idx, is_sorted):
            h = self.activation(self.fc1(x, idx, sorted_indices=is_sorted))
            return self.fc2(h, idx, sorted_indices=is_sorted)

        return _through_experts(layers, x, indices)


class SparseMoE(nn.Module):
    """A mixture-of-experts block: a linear router scores the experts of each token, the
    ``top_k`` best run (a :class:`SwitchGLU`), and their outputs are summed weighted by the
    router's probabilities. No step reads an array back to the host, so the block traces under
    ``mx.compile`` and differentiates through router, experts and activation.

    Args:
        dims: the model's features.
        hidden_dims: each expert's hidden features.
        num_experts: the number of experts.
        top_k: experts per token.
        norm_topk_prob: rescale the chosen experts' probabilities to sum to 1 (Qwen3, Mixtral).
        bias: learn biases in the experts.
    """

    def __init__(
        self,
        dims: int,
        hidden_dims: int,
        num_experts: int,
        top_k: int = 2,
        norm_topk_prob: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"[SparseMoE] top_k must be in [1, {num_experts}], got {top_k}")
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(dims, num_experts, bias=False)
        self.switch_mlp = SwitchGLU(dims, hidden_dims, num_experts, bias=bias)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The router's logits, each token's ``top_k`` experts and their weights."""
        logits = self.gate(x)
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return logits, indices, scores.astype(x.dtype)

    def __call__(self, x: mx.array, return_aux_loss: bool = False):
        """The block's output; with ``return_aux_loss``, also the router's load-balancing
        loss (:func:`mlx_primitives.compute_load_balancing_loss`)."""
        logits, indices, scores = self.route(x)
        y = (self.switch_mlp(x, indices) * scores[..., None]).sum(axis=-2)
        if return_aux_loss:
            return y, compute_load_balancing_loss(logits, indices)
        return y
