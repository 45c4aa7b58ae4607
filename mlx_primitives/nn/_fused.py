"""Blocks of layers run, while decoding, as one ``mx.compile``'d call of the layers' arrays:
one graph node for the host to build instead of one per layer and activation."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import dispatch

# The compiled blocks by their forward's maker and the kind of their layers, for one
# generation of the dispatch's decisions (a compiled block keeps the variants it traced).
_compiled: dict[tuple, Callable] = {}
_generation = [-1]


def serving(module: nn.Module, names: tuple[str, ...], kind: Callable, block: Callable):
    """The compiled call serving ``module``'s layers ``names`` and the arrays it takes after
    the block's inputs, or None where the layers are not all of one kind.

    Args:
        module: the block; its compiled call is kept in it until a layer or a decision of the
            dispatch changes.
        names: the block's layers, in the order ``block``'s forward takes their arrays.
        kind: ``kind(layer)``, what a compiled call must know of a layer (a tuple whose first
            entry is ``"quantized"`` or ``"linear"`` and whose last says whether it has a
            bias), or None for a layer it cannot serve.
        block: ``block(kind)``, the block's forward as a function of its inputs and arrays.
    """
    layers = [module[name] for name in names]
    generation, kept = dispatch._generation, module.__dict__.get("_fused")
    if kept is None or kept[0] != generation or any(map(_changed, kept[1], layers)):
        kept = module.__dict__["_fused"] = (generation, layers, *_make(layers, kind, block))
    fn, arrays = kept[2], kept[3]
    if fn is None:
        return None
    return fn, [layer[name] for layer in layers for name in arrays]


def _changed(kept: nn.Module, layer: nn.Module) -> bool:
    return kept is not layer


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
