"""One call to serve an mlx-lm model through the tuned ops, and one to undo it.

:func:`patch` swaps, in the model's module tree, each layer this library has a drop-in for
(``nn.QuantizedLinear`` in the affine mode, mlx-lm's ``SwitchGLU``, ``SwitchMLP``,
``SwitchLinear``, ``QuantizedSwitchLinear`` and ``SwiGLU`` activation, and the gated MLP of
most of its models, which becomes :class:`mlx_primitives.SwiGLU`) for the drop-in, holding
the same arrays (no weight is copied or changed). What a model reaches through functions is
served where the functions live: ``mx.fast``'s norms, RoPE and attention
(:func:`mlx_primitives.patch_mlx`, which mlx-lm's ``scaled_dot_product_attention`` calls) and
the ``swiglu``, ``gated_delta_update`` and ``ssm_update`` (Mamba-2's SSM) of mlx-lm's model
modules; those stay in place while any patched model lives patched. :func:`unpatch` puts
everything back.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from dataclasses import dataclass, field

import mlx.nn as nn

from .. import patch as fast
from ..dispatch import passing
from ..nn import switch
from ..nn.feed_forward import SwiGLU
from ..nn.quantized import QuantizedLinear
from ..ops.gated import swiglu
from ..ssm import gated_delta_update, ssm_update

try:
    from mlx_lm.models import activations as lm_activations
    from mlx_lm.models import gated_delta as lm_gated_delta
    from mlx_lm.models import ssm as lm_ssm
    from mlx_lm.models import switch_layers as lm_switch
except ImportError as e:  # the optional extra
    raise ImportError(
        "[lm] mlx_primitives.lm needs mlx-lm: pip install 'mlx-primitives[lm]'"
    ) from e

# mlx-lm's layer classes and the drop-in each becomes.
DROP_INS = {
    lm_switch.SwitchLinear: switch.SwitchLinear,
    lm_switch.QuantizedSwitchLinear: switch.QuantizedSwitchLinear,
    lm_switch.SwitchGLU: switch.SwitchGLU,
    lm_switch.SwitchMLP: switch.SwitchMLP,
    lm_switch.SwiGLU: switch._SwiGLU,  # then a decoding SwitchGLU runs as one compiled call
}
# The mlx-lm or MLX class each of this library's layers is a drop-in for: what unpatch makes of a
# layer of ours that replaced a swapped one while patched (nn.quantize makes ours from ours).
THEIRS = {ours: theirs for theirs, ours in DROP_INS.items()} | {QuantizedLinear: nn.QuantizedLinear}
# The functions mlx-lm's model modules import by name: mlx-lm's own (as imported here) and
# ours. The modules that define them are never patched (models imported later would take the
# replacement from them).
GLOBALS = {
    # Its default is mlx-lm's own compiled composition: where no record could change a call,
    # the call goes to mlx-lm's (dispatch.passing).
    "swiglu": (lm_activations.swiglu, passing(swiglu, lm_activations.swiglu, "swiglu")),
    "gated_delta_update": (lm_gated_delta.gated_delta_update, gated_delta_update),
    "ssm_update": (lm_ssm.ssm_update, ssm_update),
}
HOMES = {lm_activations.__name__, lm_gated_delta.__name__, lm_ssm.__name__}
# mx.fast's functions, served while a model is patched: what mlx-lm's layers call.
FUNCTIONS = tuple(f"mx.fast.{name}" for name in fast.NAMES)

# The modules patched now, and the functions replaced, (module, name) -> (original, count of
# models that need them.
_PATCHED: dict[int, tuple[nn.Module, list]] = {}
_GLOBALS: dict[tuple[str, str], tuple[object, int]] = {}
# Whether the first patched model patched mx.fast (not the user's own mp.patch_mlx()).
_FAST = {"ours": False}


@dataclass
class PatchReport:
    """What :func:`patch` served and what it left to mlx-lm, and why.

    Attributes:
        swapped: layers swapped for a drop-in, by class name.
        functions: functions this library now serves (for every model, while one is patched).
        left: layers left as they are, by class name, with the reason.
    """

    swapped: dict[str, int] = field(default_factory=dict)
    functions: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"swapped {n} x {name}" for name, n in sorted(self.swapped.items())]
        lines += [f"served  {name}" for name in self.functions]
        lines += [f"left    {name}: {why}" for name, why in sorted(self.left.items())]
        return "\n".join(lines)


def _adopt(cls: type, old: nn.Module) -> nn.Module:
    """A ``cls`` holding ``old``'s arrays, children and attributes (nothing copied)."""
    new = cls.__new__(cls)  # a dict subclass: dict.__new__, no __init__
    new.__dict__.update(old.__dict__)
    dict.update(new, old)
    return new


# The gated MLP of most mlx-lm models (llama.MLP, qwen3.MLP, ...), recognised by its forward.
GATED_MLP = "self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"
_gated_mlps: dict[type, bool] = {}


def _is_gated_mlp(kind: type) -> bool:
    """Whether ``kind``, an mlx-lm class, computes exactly ``GATED_MLP`` with mlx-lm's swiglu:
    then :class:`mlx_primitives.SwiGLU` computes what it does."""
    found = _gated_mlps.get(kind)
    if found is None:
        found = False
        module = sys.modules.get(kind.__module__)
        call = vars(kind).get("__call__")
        if module and call and getattr(module, "swiglu", None) in GLOBALS["swiglu"]:
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(call))).body[0]
            except (OSError, TypeError, SyntaxError):
                tree = None
            found = (
                isinstance(tree, ast.FunctionDef)
                and [a.arg for a in tree.args.args] == ["self", "x"]
                and len(tree.body) == 1
                and isinstance(tree.body[0], ast.Return)
                and ast.unparse(tree.body[0].value) == GATED_MLP
            )
        _gated_mlps[kind] = found
    return found


def _served(module: nn.Module) -> tuple[type | None, str]:
    """The drop-in class for ``module``, or None and why not."""
    kind = type(module)
    if kind in DROP_INS:  # other modes than affine go on to MLX's gather_qmm inside
        return DROP_INS[kind], ""
    if kind.__module__.startswith("mlx_lm.") and _is_gated_mlp(kind):
        return SwiGLU, ""
    if kind is nn.QuantizedLinear:
        if module.mode != "affine":
            return None, f"mode {module.mode!r}: mx.quantized_matmul serves it as before"
        return QuantizedLinear, ""
    return None, ""


def _swap_in(holder, slot, value, swaps: list, report: PatchReport) -> None:
    """Swap ``value`` (``holder[slot]``: a module, or a list or dict of them at any depth) and
    the modules inside it, deepest first, noting each swap in ``swaps``."""
    if isinstance(value, nn.Module):  # before dict: a Module is a dict too
        _swap(value, swaps, report)
        cls, why = _served(value)
        name = type(value).__name__
        if cls is None:
            if why:
                report.left[name] = why
            return
        holder[slot] = _adopt(cls, value)
        swaps.append((holder, slot, value, holder[slot]))
        report.swapped[name] = report.swapped.get(name, 0) + 1
    elif isinstance(value, dict):
        for key, item in list(value.items()):
            _swap_in(value, key, item, swaps, report)
    elif isinstance(value, list):
        for i, item in enumerate(list(value)):
            _swap_in(value, i, item, swaps, report)


def _swap(module: nn.Module, swaps: list, report: PatchReport) -> None:
    """Swap the modules inside ``module`` (its own entries: ``children()`` copies nested
    containers)."""
    for name, child in list(module.items()):
        _swap_in(module, name, child, swaps, report)


def _model_modules(model: nn.Module) -> set[str]:
    """The mlx-lm modules that define the model's layer classes."""
    names = {type(m).__module__ for _, m in model.named_modules()}
    names -= HOMES
    return {n for n in names if n.startswith("mlx_lm.") and n in sys.modules}


def patch(model: nn.Module) -> PatchReport:
    """Serve ``model`` (an mlx-lm model) through the tuned ops.

    Args:
        model: the model; patched in place (a second call does nothing more).

    Returns:
        what was swapped, the functions now served, and what was left and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"[lm.patch] model must be an mlx.nn.Module, got {type(model).__name__}")
    report = PatchReport(functions=list(FUNCTIONS))
    if id(model) in _PATCHED:
        return report
    swaps: list = []
    _swap(model, swaps, report)
    modules = _model_modules(model) | {lm_switch.__name__}
    for name in sorted(modules):
        mod = sys.modules[name]
        for attr, (theirs, ours) in GLOBALS.items():
            key = (name, attr)
            if getattr(mod, attr, None) is not theirs and key not in _GLOBALS:
                continue
            original, count = _GLOBALS.get(key, (theirs, 0))
            _GLOBALS[key] = (original, count + 1)
            setattr(mod, attr, ours)
            report.functions.append(f"{name}.{attr}")
            swaps.append((None, key, None, None))
    if any(type(m) is nn.Linear for _, m in model.named_modules()):
        report.left["Linear"] = "float weights: MLX's matmul serves them"
    report.left["quantized KV cache"] = (
        "mlx-lm's quantized_scaled_dot_product_attention (kv_bits): MLX serves it as before"
    )
    for _, m in model.named_modules():
        kind = type(m)
        if kind.__module__ == lm_activations.__name__ and kind is not lm_switch.SwiGLU:
            report.left[kind.__name__] = "an mlx-lm activation with no variant yet"
    if not _PATCHED:
        _FAST["ours"] = not fast.patched()
    fast.patch_mlx()
    _PATCHED[id(model)] = (model, swaps)
    return report


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`: the original layers back in ``model``, holding the arrays the
    swapped-in ones hold now (a layer of this library's that replaced one while patched, as
    ``nn.quantize`` makes them, becomes mlx-lm's or MLX's class; anything else put there
    stays); the functions back to mlx-lm's and MLX's once no patched model is left
    (``mx.fast`` stays patched if it was before the first :func:`patch`). A model never
    patched is left as is. A patched model is referenced until it is unpatched."""
    entry = _PATCHED.pop(id(model), None)
    if entry is None:
        return
    for holder, slot, original, installed in reversed(entry[1]):
        if holder is None:  # a module's function
            fn, count = _GLOBALS[slot]
            if count == 1:
                del _GLOBALS[slot]
                setattr(sys.modules[slot[0]], slot[1], fn)
            else:
                _GLOBALS[slot] = (fn, count - 1)
            continue
        now = holder[slot]
        if now is installed:  # what changed while patched (loaded or trained weights) stays
            dict.update(original, now)
            holder[slot] = original
        elif type(now) in THEIRS:  # replaced while patched by another of ours (nn.quantize)
            holder[slot] = _adopt(THEIRS[type(now)], now)
        # Anything else put there while patched (a LoRA wrapper) is the program's: it stays.
    if not _PATCHED and _FAST["ours"]:
        fast.unpatch_mlx()
