"""Ops and their variants.

An :class:`Op` is a public operation (``rms_norm``): its signature, its reference, its
problem, its default and its variants. The signature is stated once, by the op's public
function; everything inside takes the call's arguments in that order, all given (the
canonical form :meth:`Op.bind` makes). A :class:`Variant` is one implementation with a
declared parameter space; ``build(**params)`` returns a callable that takes the op's own
signature. Calling an op routes through :mod:`mlx_primitives.dispatch`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx

from . import _paths, dispatch
from .dialect.traced import Traced
from .hardware import current_backend
from .problem import Dim, Problem

ALL_BACKENDS = frozenset({"cpu", "cuda", "metal"})
GPU_BACKENDS = frozenset({"cuda", "metal"})

# A parameter value in the database is one of these scalar types, never anything richer.
_PARAM_TYPES = (bool, int, float, str)


@dataclass(eq=False)
class Variant:
    """One implementation of an op.

    Args:
        name: unique within the op.
        factory: ``factory(**params)`` returns a callable taking the op's arguments in their
            canonical order, all given.
        backends: the MLX back-ends it runs on (``cpu``, ``cuda``, ``metal``).
        space: each parameter and its allowed values, the first being the variant's default.
        supports: ``supports(problem_dict, params)`` says whether a configuration can serve a
            problem (tile divides the hidden size, shared memory fits, ...).
        sources: kernel source files under ``kernel_variants/``; their hash goes into every
            tuning record so that an edited kernel invalidates its records.
        traced: whether its callables are :class:`~mlx_primitives.dialect.traced.Traced`
            (for kernel forwards whose calls keep their shapes from one step to the next;
            not attention, whose keys grow each step, nor rope, whose offset does).
    """

    name: str
    factory: Callable[..., Callable]
    backends: frozenset[str] = ALL_BACKENDS
    space: dict[str, tuple] = field(default_factory=dict)
    supports: Callable[[dict, dict], bool] | None = None
    sources: tuple[str, ...] = ()
    description: str = ""
    traced: bool = False

    def __post_init__(self):
        self._built: dict[tuple, Callable] = {}
        self._accepting: Callable[[Callable], Callable] = lambda fn: fn  # set by its Op
        for key, values in self.space.items():
            if not values or not all(type(v) in _PARAM_TYPES for v in values):
                raise ValueError(f"[{self.name}] parameter {key!r} needs scalar allowed values")

    @property
    def is_kernel(self) -> bool:
        """True for custom GPU kernels (as opposed to MLX built-ins and compositions)."""
        return bool(self.sources)

    def available(self, backend: str | None = None) -> bool:
        """Whether this variant can run on ``backend`` (default: the current one)."""
        return (backend or current_backend()) in self.backends

    def configs(self) -> list[dict]:
        """Every point of the parameter space."""
        keys = list(self.space)
        return [dict(zip(keys, vals)) for vals in itertools.product(*self.space.values())]

    def validate(self, params: dict) -> dict:
        """Check ``params`` against the declared space; ValueError naming what is wrong."""
        if not isinstance(params, dict):
            raise ValueError(f"[{self.name}] params must be a mapping, got {type(params).__name__}")
        unknown = set(params) - set(self.space)
        missing = set(self.space) - set(params)
        if unknown or missing:
            raise ValueError(
                f"[{self.name}] params {sorted(params)} do not match the space {sorted(self.space)}"
            )
        for key, value in params.items():
            allowed = self.space[key]
            # bool is an int in Python: compare types too, so True never passes for 1.
            if not any(type(value) is type(a) and value == a for a in allowed):
                raise ValueError(f"[{self.name}] {key}={value!r} is not one of {list(allowed)}")
        return params

    def allows(self, problem: dict, params: dict) -> bool:
        return self.supports is None or bool(self.supports(problem, params))

    def positional(self, **params) -> Callable:
        """The callable for ``params``, taking the op's arguments in canonical order, all
        given (validated; memoised per process): what dispatch calls."""
        key = tuple(sorted(self.validate(params).items()))
        fn = self._built.get(key)
        if fn is None:
            fn = self.factory(**params)
            fn = self._built[key] = Traced(fn) if self.traced else fn
        return fn

    def build(self, **params) -> Callable:
        """The callable for ``params``, taking the op's own signature."""
        return self._accepting(self.positional(**params))

    @cached_property
    def source_hash(self) -> str:
        """SHA-256 (16 hex digits) of the kernel sources and the dialect layer; '' if none."""
        if not self.sources:
            return ""
        digest = hashlib.sha256(_paths.dialect_source())
        for rel in self.sources:
            digest.update(rel.encode())
            digest.update(_paths.kernel_source(rel).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    """A concrete problem for tuning: shapes of the op's array arguments, a dtype and flags."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    options: tuple[tuple[str, object], ...] = ()

    def label(self) -> str:
        flags = "".join(f" {k}={v}" for k, v in self.options)
        return " ".join("x".join(map(str, s)) for s in self.shapes) + f" {self.dtype}{flags}"


class Op:
    """A public operation served through the registry.

    Args:
        name: the op's name, e.g. ``"rms_norm"``.
        signature: the op's public function, whose signature (names, order, defaults) is the
            op's: calls are bound to it once, and everything below takes the arguments in its
            order, all given (but ``stream``, which sets the default stream of the call).
        dims: the problem dims in key order, each bucketed or exact.
        problem: validates a call's arguments and returns ``(dtype, values)``: the dtype's
            name and the values in ``dims`` order, already bucketed.
        reference: plain-MLX implementation accumulating in at least float32; called on
            float64 inputs on the CPU it is the float64 reference.
        example: ``example(shapes, dtype, key, **options)`` makes the arguments of a call on
            random inputs; ``shapes`` may give only the leading array arguments, ``options``
            set the op's flags (layout, ...).
        case: ``case(problem_dict)`` gives ``(shapes, options)`` of a problem (bucketed dims
            taken as sizes): the inverse of ``problem`` that probes and ``explain`` use.
        default: ``default(problem_dict, backend)`` names the safe variant and its params.
        variants: the implementations.
        presets: ``{"quick"|"default"|"full": [Example, ...]}`` shapes the tuner covers.
        differentiable: arguments (by position) that gradients are checked for.
        tolerances: ``{dtype name: (atol, rtol)}`` where the op needs other tolerances than
            :data:`mlx_primitives.check.TOLERANCES` (and says why).
        check_slices: ``check_slices(args)`` gives, for a call too large to check whole
            against the float64 reference, ``[(args, select), ...]``: smaller calls whose
            outputs are ``select(outputs)`` of the whole one; None to check whole.
        feed: the argument (by position) that timing feeds each call's output back into, so
            the calls run in order; another where outputs fed back as the first drift to
            values that take a slow path; None to time independent calls.
        volatile: ``{position: check}`` for an argument whose value changes from call to call
            (a position offset): dispatch reuses a decision across its values, checking each
            with ``check`` (which raises on a bad one) instead of the whole problem.
        outside: serves, given the canonical arguments, the calls for which ``problem``
            raises :class:`~mlx_primitives.problem.Unmodelled` (MLX's own op, with its errors).
        mlx_default: ``mlx_default(dtype, backend)``, whether the default of every problem of
            a dtype's name on a back-end calls MLX's own function (what the patches hand a
            call to where no record could change it, :func:`~mlx_primitives.dispatch.idle`);
            None where it always does.
    """

    def __init__(
        self,
        name: str,
        *,
        signature: Callable,
        dims: Sequence[Dim],
        problem: Callable[..., tuple[str, tuple]],
        reference: Callable,
        example: Callable,
        case: Callable[[dict], tuple[tuple, dict]],
        default: Callable[[dict, str], tuple[str, dict]],
        variants: Sequence[Variant],
        presets: dict[str, list[Example]],
        differentiable: tuple[int, ...] = (0,),
        tolerances: dict[str, tuple[float, float]] | None = None,
        check_slices: Callable[[tuple], list | None] | None = None,
        feed: int | None = 0,
        volatile: dict[int, Callable] | None = None,
        outside: Callable | None = None,
        mlx_default: Callable[[str, str], bool] | None = None,
    ):
        self.name = name
        self.signature = inspect.signature(signature)
        # A ``stream`` argument is not the op's: it sets the default stream of the call.
        self.params = tuple(p for p in self.signature.parameters if p != "stream")
        self._arity = len(self.params)
        self.dims = tuple(dims)
        self._problem = problem
        self.reference = self.accepting(reference)
        self._example = example
        self.case = case
        self._default = default
        self.variants = list(variants)
        self.presets = presets
        self.differentiable = differentiable
        self.tolerances = tolerances or {}
        self.check_slices = check_slices
        # bool is an int: Op(feed=False) would feed the first argument.
        if feed is not None and (type(feed) is not int or feed < 0):
            raise TypeError(f"[{name}] feed must be an argument position or None, got {feed!r}")
        self.feed = feed
        self.volatile = volatile or {}
        self.outside = outside
        self.mlx_default = mlx_default or (lambda dtype, backend: True)
        # The call with the canonical arguments, all given, and an optional stream: what the
        # public functions call.
        self.serve = dispatch.fast_path(self)
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"[{name}] duplicate variant names in {names}")
        for v in self.variants:
            v._accepting = self.accepting

    def __repr__(self) -> str:
        return f"Op({self.name!r}, variants={[v.name for v in self.variants]})"

    def bind(self, *args, **kwargs) -> tuple:
        """A call's arguments in the op's canonical order, defaults filled in (``stream`` is
        left out: see :meth:`__call__`)."""
        if not kwargs and len(args) == len(self.params):
            return args
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"[{self.name}] {e}") from None
        bound.apply_defaults()
        return tuple(bound.arguments[name] for name in self.params)

    def accepting(self, fn: Callable) -> Callable:
        """``fn``, which takes the canonical arguments, taking the op's own signature."""
        n, bind = len(self.params), self.bind

        @functools.wraps(fn)
        def call(*args, stream=None, **kwargs):
            if kwargs or len(args) != n:
                args = bind(*args, **kwargs)
            if stream is None:
                return fn(*args)
            with mx.stream(stream):
                return fn(*args)

        call.__signature__ = self.signature
        return call

    def example(self, shapes, dtype: mx.Dtype, key: mx.array, **options) -> tuple:
        """The arguments, in canonical order, of a call on random inputs of ``shapes``."""
        return self.bind(*self._example(shapes, dtype, key, **options))

    def problem(self, *args, **kwargs) -> Problem:
        """Validate a call's arguments and return its problem."""
        dtype, values = self._problem(*self.bind(*args, **kwargs))
        return Problem(self.name, dtype, values, self.dims)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"[{self.name}] no variant named {name!r}")

    def default(self, problem: Problem, backend: str | None = None) -> tuple[str, dict]:
        return self._default(problem.as_dict(), backend or current_backend())

    def __call__(self, *args, stream=None, **kwargs):
        if kwargs or len(args) != self._arity:
            args = self.bind(*args, **kwargs)
        return self.serve(*args, stream=stream)


_REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add ``op`` to the registry (once per name)."""
    if op.name in _REGISTRY:
        raise ValueError(f"[registry] an op named {op.name!r} is already registered")
    _REGISTRY[op.name] = op
    return op


def _load() -> None:
    importlib.import_module("mlx_primitives.ops")


def op(name: str) -> Op:
    """The registered op called ``name``."""
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"[registry] unknown op {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def ops() -> list[Op]:
    """Every registered op, in registration order."""
    _load()
    return list(_REGISTRY.values())
