"""Blocks of layers run, while decoding, as one ``mx.compile``'d call of the layers' arrays:
one Python call for the host instead of one per layer and activation, and the custom kernels
a block's variants launch built once, when it is traced, not at every call."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import dispatch

# The layers of a gated block (SwiGLU, SwitchGLU), in the order its compiled call takes their
# arrays.
LAYERS = ("gate_proj", "up_proj", "down_proj")
# The compiled blocks by their forward's maker and the kind of their layers, for one
# generation of the dispatch's decisions (a compiled block keeps the variants it traced).
_compiled: dict[tuple, Callable] = {}
_generation = [-1]


def serving(module: nn.Module, kind: Callable, block: Callable):
    """The compiled call serving ``module``'s gated ``LAYERS`` and the arrays it takes after
    the block's inputs, or None where the layers are not all of one kind.

    Args:
        module: the block; its compiled call is kept in it until a layer is replaced, gains
            or loses an array (a bias), or a decision of the dispatch changes.
        kind: ``kind(layer)``, what a compiled call must know of a layer (see
            :func:`layer_kind`), or None for a layer it cannot serve.
        block: ``block(kind)``, the block's forward as a function of its inputs and arrays
            (:func:`per_layer` splits them).
    """
    layers = [module[name] for name in LAYERS]
    generation, kept = dispatch._generation, module.__dict__.get("_fused")
    if kept is None or kept[0] != generation or any(map(_changed, kept[1], layers)):
        marks = [(weakref.ref(layer), len(layer)) for layer in layers]
        kept = module.__dict__["_fused"] = (generation, marks, *_make(layers, kind, block))
    fn, arrays = kept[2], kept[3]
    if fn is None:
        return None
    return fn, [layer[name] for layer in layers for name in arrays]


def layer_kind(layer: nn.Module, linear: type, quantized: tuple[type, ...]) -> tuple | None:
    """``("linear", bias)`` for a ``linear`` layer, ``("quantized", group_size, bits, bias)``
    for an affine ``quantized`` one without a global scale, else None."""
    bias = "bias" in layer
    if type(layer) is linear:
        return ("linear", bias)
    if type(layer) in quantized and layer.mode == "affine" and layer.get("global_scale") is None:
        return ("quantized", layer.group_size, layer.bits, bias)
    return None


def per_layer(kind: tuple, arrays: tuple) -> list[tuple]:
    """A compiled call's arrays for layers of ``kind``, one tuple per layer: its weight (with
    scales and biases where quantized), then its bias where it has one."""
    width = (3 if kind[0] == "quantized" else 1) + kind[-1]
    return [arrays[i : i + width] for i in range(0, len(arrays), width)]


def _changed(mark: tuple, layer: nn.Module) -> bool:
    # Weakly held, so that a replaced layer's weights go with it; its entry count changes
    # where an array (a bias) is added or deleted.
    return mark[0]() is not layer or mark[1] != len(layer)


def _make(layers: list, kind: Callable, block: Callable) -> tuple:
    kinds = {kind(layer) for layer in layers}
    if len(kinds) != 1 or None in kinds:
        return None, ()
    (found,) = kinds
    if _generation[0] != dispatch._generation:
        _compiled.clear()
        _generation[0] = dispatch._generation
    fn = _compiled.get((block, found))
    if fn is None:
        fn = _compiled[(block, found)] = mx.compile(block(found))
    names = ("weight", "scales", "biases") if found[0] == "quantized" else ("weight",)
    return fn, names + ("bias",) * found[-1]
