"""Dispatch: route each call to the tuned variant for this chip and problem.

The lookup chain for a problem not yet in the process cache: the user database, then the
shipped (pretuned) database for this chip, each by exact problem; then the nearest tuned
problem (same exact dims, closest in size, then in shape; at most ``NEAREST_MAX_DISTANCE``
powers of two apart in size); then the op's default. Which records may serve is the record's
own rule (:meth:`TuningRecord.unusable`). A tuned variant other than the default is probed
once per problem and process before it serves calls; one that fails to build, raises or
disagrees with the reference is disabled for the process, with one warning, and the call
falls back to the default.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx

from . import recording, store
from .hardware import current_backend, detect_chip
from .hardware.chip import slug_backend
from .problem import DTYPES, Problem, Unmodelled, parse_dtype
from .store import shipped
from .tuning_record import RecordError, TuningRecord

_GPU = mx.DeviceType.gpu
# Without a GPU back-end every call runs on the CPU: no device to read per call.
_HAS_GPU = mx.cuda.is_available() or mx.metal.is_available()

if TYPE_CHECKING:
    from .registry import Op

# Before a tuned variant other than the default serves a problem, a probe runs it once per
# process on a small case of that problem (at most this size in each bucketed dim) and checks
# it against the reference.
PROBE_MAX_DIM = 16
# A record serves an untuned problem within this many powers of two of its size (any mix of
# batch, heads and sequence; shape is only ranked): docs/notes/2026-11-27-nearest-record-reach.md.
NEAREST_MAX_DISTANCE = 2

_cache: dict[tuple, Callable] = {}
# Calls served before, by the marks of their arguments (each array's shape and dtype, each
# other argument's type and value; a volatile argument's type alone): the checked decision.
_calls: dict[tuple, Callable] = {}
MAX_CALLS = 4096
_entries: dict[tuple[str, str], list[tuple[Problem, TuningRecord, str]]] = {}
_disabled: set[tuple[str, str]] = set()
_warned: set[str] = set()
# Whether an op's calls of a dtype all go to its default, by (op, dtype, on a GPU): idle().
_idle: dict[tuple[str, mx.Dtype, bool], bool] = {}
# Counts the times kept decisions were forgotten: Routes compare it with their own.
_generation = 0
# Called each time kept decisions are forgotten: what holds state derived from them.
_on_forget: list[Callable[[], None]] = []


class Decision(NamedTuple):
    """Which variant serves a problem, and why."""

    op: str
    problem: str
    variant: str
    params: dict
    source: str
    reason: str
    chip: str

    def to_dict(self) -> dict:
        return self._asdict()


def reset() -> None:
    """Forget cached decisions, loaded records, disabled variants and given warnings (after
    tuning, say)."""
    _cache.clear()
    _calls.clear()
    _entries.clear()
    _disabled.clear()
    _warned.clear()
    forget_calls()


def forget_calls() -> None:
    """Forget the decisions kept per argument marks (each is checked again at its next call)."""
    global _generation
    _calls.clear()
    _idle.clear()
    _generation += 1
    for fn in _on_forget:
        fn()


class Routes:
    """The callables serving one caller's calls of an op, by a key the caller makes from what
    may change between its calls (a layer's input shape, where its weights stay): a shorter
    key than the dispatch's own marks of every argument. Forgotten with the dispatch's kept
    decisions (:func:`forget_calls`, :func:`reset`, a variant disabled).

    Args:
        theirs: MLX's function that the op's default calls, taking the op's arguments in
            canonical order: the route of a call whose op and dtype are :func:`idle`.
    """

    __slots__ = ("_fns", "_generation", "_theirs")

    def __init__(self, theirs: Callable | None = None):
        self._fns: dict = {}
        self._generation = -1
        self._theirs = theirs

    def serving(self, key: tuple, op: Op, args: tuple) -> Callable:
        """The callable serving ``args`` (``op``'s canonical arguments), kept under ``key``
        and the default device."""
        if self._generation != _generation or len(self._fns) >= MAX_CALLS:
            self._fns.clear()
            self._generation = _generation
        key = (key, _HAS_GPU and mx.default_device().type is _GPU)
        fn = self._fns.get(key)
        if fn is None:
            if self._theirs is not None and idle(op.name, args[0].dtype):
                fn = self._theirs
            else:
                fn = _first(op, args, None)
            self._fns[key] = fn
        return fn


def idle(op_name: str, dtype: mx.Dtype) -> bool:
    """Whether every call of op ``op_name`` in ``dtype`` on the default device goes to MLX's
    own function: the op's default calls it there (:attr:`Op.mlx_default`), no record on this
    chip could route a call elsewhere (each usable record of the dtype kept the default, or
    dispatch is ``MLXP_DISPATCH=default``) and nothing records calls. Where it holds, what the
    patches put in a program's way (:func:`mlx_primitives.patch_mlx`,
    :func:`mlx_primitives.lm.patch`) hands calls to what they replaced, at the cost of this
    lookup.

    Args:
        op_name: the op's name (``rms_norm``).
        dtype: the dtype of the call's first array.
    """
    key = (op_name, dtype, _HAS_GPU and mx.default_device().type is _GPU)
    found = _idle.get(key)
    if found is None:
        found = _idle[key] = _compute_idle(op_name, dtype)
    return found


def passing(ours: Callable, theirs: Callable, op_name: str) -> Callable:
    """``ours`` in place of ``theirs`` (MLX's function that op ``op_name``'s default calls),
    handing a call to ``theirs`` where no tuning record could route it elsewhere
    (:func:`idle`, by the dtype of the first argument): a patched program pays the dispatch
    only where it may gain.

    Args:
        ours: this library's function, with ``theirs``'s signature.
        theirs: the function it replaces.
        op_name: the op ``ours`` is served by.
    """

    def call(*args, **kwargs):
        if args and args[0].__class__ is mx.array and idle(op_name, args[0].dtype):
            return theirs(*args, **kwargs)
        return ours(*args, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = ours.__name__, ours.__name__, ours.__doc__
    call.__wrapped__ = ours
    return call


def unused(op_name: str) -> bool:
    """Whether every call of op ``op_name``, of any dtype on any device of this machine, goes
    to MLX's own function: :func:`idle` everywhere. Where it holds, a patch may put
    MLX's own function back in the program's way (until decisions are forgotten)."""
    gpus = [name for name, on in (("cuda", mx.cuda), ("metal", mx.metal)) if on.is_available()]
    return _defaults_serve(op_name, ["cpu", *gpus], None)


def _compute_idle(op_name: str, dtype: mx.Dtype) -> bool:
    return _defaults_serve(op_name, [current_backend()], str(dtype).removeprefix("mlx.core."))


def _defaults_serve(op_name: str, backends: list[str], dtype: str | None) -> bool:
    """Whether nothing records calls, the op's default calls MLX's own function for every
    problem (of ``dtype``, or any) on ``backends``, and no usable record of op ``op_name``
    there chose another variant than the default."""
    if recording.active():
        return False
    from .registry import op as lookup  # the registry imports this module

    op = lookup(op_name)
    dtypes = [dtype] if dtype is not None else list(DTYPES)
    if not all(op.mlx_default(d, backend) for d in dtypes for backend in backends):
        return False
    if mode() == "default":
        return True
    return not any(
        (dtype is None or p.dtype == dtype)
        and not rec.kept_default
        and (op.name, rec.variant) not in _disabled
        and rec.unusable(op, p, backend) is None
        for backend in backends
        for p, rec, _ in entries(op, detect_chip(backend).slug)
    )


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def mode() -> str:
    """``MLXP_DISPATCH``: ``tuned`` (the default) or ``default`` (ignore tuning records)."""
    value = os.environ.get("MLXP_DISPATCH", "tuned").strip().lower() or "tuned"
    if value not in ("tuned", "default"):
        warn_once(
            f"[mlx_primitives] MLXP_DISPATCH={value!r} is not 'tuned' or 'default'; using 'tuned'"
        )
        return "tuned"
    return value


def fast_path(op: Op) -> Callable:
    """The hot path of ``op``'s calls, made once per op: ``serve(*args, stream=None)``, given
    the op's arguments in canonical order, marks each argument (:func:`_marks`), finds the
    decision kept for those marks and calls it. A call with new marks is checked by the op's
    problem function and routed (:func:`_first`). The function is written out for the op's
    arity so that the marks are made inline: a loop over the arguments cost as much again per
    call as the rest of the dispatch."""
    names = [f"a{i}" for i in range(len(op.params))]
    marks = [_marks(op, i, a) for i, a in enumerate(names)]
    gpu = "DEVICE().type is GPU" if _HAS_GPU else "False"
    args = ", ".join(names)
    source = (
        f"def serve({args}, stream=None):\n"
        f"    if stream is not None:  # chosen for the stream's device, so routed inside it\n"
        f"        with STREAM(stream):\n"
        f"            return serve({args})\n"
        f"    try:\n"
        f"        key = (NAME, {gpu}, {', '.join(marks)})\n"
        f"        fn = CALLS.get(key)\n"
        f"    except (AttributeError, TypeError):  # not an array where one must be; no key\n"
        f"        fn = key = None\n"
        f"    return (fn or FIRST(OP, ({args},), key))({args})\n"
    )
    scope = {
        "ARRAY": mx.array,
        "NAME": op.name,
        "DEVICE": mx.default_device,
        "GPU": mx.DeviceType.gpu,
        "STREAM": mx.stream,
        "CALLS": _calls,
        "FIRST": _first,
        "OP": op,
        **{f"V{i}": check for i, check in op.volatile.items()},
    }
    exec(compile(source, f"<dispatch of {op.name}>", "exec"), scope)
    return scope["serve"]


def _marks(op: Op, i: int, a: str) -> str:
    """Two flat key entries for argument ``i`` (no tuple to build and hash), by its annotation:
    an array's shape and dtype (anything else there its class, so that a look-alike never
    reuses an array's decision); a value's type and value (a volatile one's type and check);
    for an argument that may be either, whichever it is. An array given for a value is its
    own mark: the problem functions refuse one there, or leave the call to MLX's op, which
    reads it afresh each call."""
    kind = _kind(op.signature.parameters[op.params[i]].annotation)
    value = f"(V{i}({a}) or None)" if i in op.volatile else a
    if kind == "array":  # not an array: its class, then no dtype (the slow path's error)
        return f"{a}.shape if {a}.__class__ is ARRAY else {a}.__class__, {a}.dtype"
    if kind == "value":
        return f"{a}.__class__, {value}"
    return (
        f"{a}.shape if {a}.__class__ is ARRAY else {a}.__class__, "
        f"{a}.dtype if {a}.__class__ is ARRAY else {value}"
    )


def _kind(annotation) -> str:
    """``array`` for an argument annotated as an array alone, ``value`` for one that cannot
    be an array, ``either`` for the rest (``mx.array | None``, an unannotated one)."""
    if annotation is inspect.Parameter.empty:
        return "either"
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    if text in ("mx.array", "mlx.core.array"):
        return "array"
    return "either" if "array" in text else "value"


def _first(op: Op, args: tuple, key: tuple | None) -> Callable:
    """A call with new marks: its problem checked and routed, the decision kept for them (a
    call the variants do not model goes to the op's ``outside``, kept the same way)."""
    try:
        problem = op.problem(*args)
    except Unmodelled:
        if op.outside is None:
            raise
        fn = op.outside
    else:
        fn = route(op, problem.dtype, problem.values)
        if recording.active():
            fn = recording.counted(op.name, problem.key, fn, len(args))
    if key is not None:
        if len(_calls) >= MAX_CALLS:
            _calls.clear()
        _calls[key] = fn
    return fn


def route(op: Op, dtype: str, values: tuple) -> Callable:
    """The callable serving a problem, by its dtype's name and values, taking the op's
    arguments in canonical order (the Problem is made only on a miss)."""
    key = (op.name, dtype, values, mx.default_device().type)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = _resolve(op, Problem(op.name, dtype, values, op.dims))
    return fn


def _disable(op: Op, name: str, error: Exception) -> None:
    _disabled.add((op.name, name))
    _cache.clear()
    forget_calls()
    warn_once(
        f"[{op.name}] variant {name!r} failed on this machine ({type(error).__name__}: "
        f"{str(error)[:300]}); disabled for this process, using the default"
    )


def _resolve(op: Op, problem: Problem) -> Callable:
    decision = choose(op, problem)
    variant = op.variant(decision.variant)
    # The default needs no probe (a reference check at the first call) and has nothing to fall
    # back to, whether a record chose it or not.
    if (decision.variant, decision.params) == op.default(problem):
        return variant.positional(**decision.params)
    try:
        fn = variant.positional(**decision.params)
        _probe(op, problem, fn)
    except Exception as e:
        _disable(op, variant.name, e)
        return _resolve(op, problem)
    return guard(op, problem, variant.name, fn)


def guard(op: Op, problem: Problem, name: str, fn: Callable) -> Callable:
    """``fn`` (variant ``name``, probed) serving ``problem``, falling back to the default."""

    def guarded(*args):
        # A call can still fail where the probe did not (a transformation the variant lacks,
        # a constant out of its range): then the default serves, now and from then on.
        try:
            return fn(*args)
        except Exception as e:
            _disable(op, name, e)
            return route(op, problem.dtype, problem.values)(*args)

    return guarded


def _probe(op: Op, problem: Problem, fn: Callable) -> None:
    """Run a freshly chosen variant once on a small case of ``problem`` against the reference."""
    shapes, options = op.case(problem.small(PROBE_MAX_DIM))
    args = op.example(shapes, parse_dtype(problem.dtype), mx.random.key(0), **options)
    from .check import run_checked  # once per tuned problem: numpy off the import path

    result = run_checked(op, fn, args, problem.dtype)
    if not result.ok:
        raise RuntimeError(f"probe failed: {result.reason}")


def choose(op: Op, problem: Problem, chip: str | None = None) -> Decision:
    """Decide which variant serves ``problem`` on the current back-end, or on ``chip`` (a
    slug: what its records decide there, as ``mlxp-tune hits --chip`` shows)."""
    if chip is None:
        backend = current_backend()
        chip = detect_chip(backend).slug
    else:
        backend = slug_backend(chip)

    def decision(variant: str, params: dict, source: str, reason: str) -> Decision:
        return Decision(op.name, problem.key, variant, params, source, reason, chip)

    def default(reason: str) -> Decision:
        return decision(*op.default(problem, backend), "default", reason)

    if mode() == "default":
        return default("MLXP_DISPATCH=default bypasses tuned records")

    def unusable(rec: TuningRecord, p: Problem) -> str | None:
        if (op.name, rec.variant) in _disabled:
            return f"variant {rec.variant} is disabled in this process"
        return rec.unusable(op, p, backend)

    found = entries(op, chip)
    skipped = []
    for source in ("user", "pretuned"):
        for p, rec, src in found:
            if src == source and p == problem:
                why = unusable(rec, problem)
                if why is None:
                    reason = f"tuned for this problem on {chip}"
                    if rec.kept_default:  # the default serves: the op's own, as it is now
                        return decision(*op.default(problem, backend), source, reason)
                    return decision(rec.variant, rec.params, source, reason)
                skipped.append(f"{source} record skipped: {why}")
    near = nearest(problem, found, lambda rec: unusable(rec, problem))
    if near.record is not None:
        rec = near.record
        reason = f"nearest tuned problem {rec.problem} ({near.source} record)"
        if rec.kept_default:  # it says the default serves: this problem's own default
            return decision(*op.default(problem, backend), "nearest", reason)
        return decision(rec.variant, rec.params, "nearest", reason)
    reason = f"no usable tuning record for {problem.key} on {chip}"
    if near.far < math.inf:
        skipped.append(
            f"the nearest tuned problem is {near.far:g} powers of two away in size (at most "
            f"{NEAREST_MAX_DISTANCE})"
        )
    return default("; ".join([reason, *skipped]))


class Nearest(NamedTuple):
    """What the nearest rule found for a problem: the record that serves it and where that
    record lives (both None where no tuned problem is in reach), and how many powers of two
    in size the closest tuned problem beyond reach is away (inf where there is none)."""

    record: TuningRecord | None
    source: str | None
    far: float


def nearest(
    problem: Problem,
    found: list[tuple[Problem, TuningRecord, str]],
    unusable: Callable[[TuningRecord], str | None],
) -> Nearest:
    """The nearest rule: among the records ``found`` (:func:`entries`) of other problems with
    the same exact dims that may serve ``problem`` (``unusable(record)`` is None), the closest
    in size, then in shape, at most ``NEAREST_MAX_DISTANCE`` powers of two apart in size."""
    best, far = None, math.inf
    for p, rec, src in found:
        d = problem.distance(p)
        if not 0 < d.shape < math.inf or unusable(rec) is not None:
            continue
        if d.size > NEAREST_MAX_DISTANCE:
            far = min(far, d.size)
            continue
        # Closest in size, then in shape; then the larger problem (its kernel serves the
        # smaller one better than the smaller's serves the larger); then a user record, then
        # one that kept the default.
        rank = (d, p.size < problem.size, src != "user", not rec.kept_default, rec.problem)
        if best is None or rank < best[0]:
            best = (rank, rec, src)
    return Nearest(None, None, far) if best is None else Nearest(best[1], best[2], far)


def entries(op: Op, chip: str) -> list[tuple[Problem, TuningRecord, str]]:
    """The records of ``op`` on ``chip`` that fit the op, each with its problem and source
    (``user``: the user database, ``pretuned``: the shipped file), loaded once per process
    (:func:`reset` forgets them); stale ones too, which :meth:`TuningRecord.unusable` refuses."""
    cached = _entries.get((op.name, chip))
    if cached is not None:
        return cached
    loaded = []
    for source, records in (
        ("user", _user_records(chip, op.name)),
        ("pretuned", _shipped_records(chip, op.name)),
    ):
        for rec in records:
            try:
                loaded.append((rec.problem_of(op), rec, source))
            except RecordError as e:
                warn_once(f"[{op.name}] ignoring a {source} tuning record: {e}")
    _entries[(op.name, chip)] = loaded
    return loaded


def _user_records(chip: str, op_name: str) -> list[TuningRecord]:
    url = store.default_user_url()
    if not store.exists(url):
        return []
    from .store.database import TuningDB  # SQLAlchemy only where a user database exists

    try:
        db = TuningDB(url, create=False)
        try:
            return db.records(chip=chip, op=op_name)
        finally:
            db.close()
    except store.EmptyDatabaseError:  # created this moment by a tuning process: nothing yet
        return []
    except Exception as e:  # a broken user database must never break a call
        warn_once(
            f"[mlx_primitives] ignoring the tuning database {store.shown_url(url)}: "
            f"{str(e)[:300]}. Run `mlxp-tune doctor` for how to recover."
        )
        return []


def _shipped_records(chip: str, op_name: str) -> list[TuningRecord]:
    path = shipped.path(chip)
    if path is None:
        return []
    try:
        entries = shipped.read(path)
    except store.DatabaseError as e:
        warn_once(f"[mlx_primitives] ignoring the shipped tuning database {path}: {e}")
        return []
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            warn_once(f"[mlx_primitives] ignoring an entry of {path} that is not a record")
            continue
        if entry.get("chip") != chip or entry.get("op") != op_name:
            continue
        try:
            out.append(TuningRecord.from_dict(entry))
        except RecordError as e:
            warn_once(f"[{op_name}] ignoring a record of {path}: {e}")
    return out


def explain(op_name: str, *args, **kwargs) -> Decision:
    """Which variant a call ``op(*args, **kwargs)`` would get, and why."""
    from .registry import op as get_op

    op = get_op(op_name)
    return choose(op, op.problem(*args, **kwargs))
