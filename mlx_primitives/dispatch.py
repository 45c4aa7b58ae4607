"""Dispatch: route each call to the tuned variant for this chip and problem.

The lookup chain for a problem not yet in the process cache: the user database, then the
shipped (pretuned) database for this chip, each by exact problem; then the nearest tuned
problem (same exact dims, closest in size, then in shape; at most ``NEAREST_MAX_DISTANCE``
powers of two apart in size); then the op's default. A record is used only if it names a
registered variant with parameters inside its declared space, was written by this MLX version
from the same kernel sources, runs on this back-end, supports the problem and, where it chose
something other than the default, shows a gain beyond the tuner's noise rule
(``timing.noise``).
A tuned variant other than the default is probed once per problem and process before it
serves calls; one that fails to build, raises or disagrees with the reference is disabled for
the process, with one warning, and the call falls back to the default.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx

from .hardware import current_backend, detect_chip
from .problem import BUCKET, Problem, distance, dtype_name, parse_dtype, parse_key
from .tuning import timing

if TYPE_CHECKING:
    from .registry import Op

# Before a tuned variant other than the default serves a problem, a probe runs it once per
# process on a small case of that problem (at most this size in each bucketed dim) and checks
# it against the reference.
PROBE_MAX_DIM = 16
# A record serves an untuned problem whose size (Problem.size) is within this many powers of
# two of its own, whatever the mix of batch, heads and sequence. On an H100, kernels tuned for
# 16384 rows ran 1 to 1024 rows slower than the defaults; records served rope and layer_norm
# at a half and a quarter of their size 1.5-1.6x faster than the built-ins (the H100 norms
# results), and rope's kernel was level with the built-in or behind it from an eighth of its
# tuned size down (uncommitted H200 runs). Shape is not bounded: only ranked.
NEAREST_MAX_DISTANCE = 2

_cache: dict[tuple, Callable] = {}
_entries: dict[tuple[str, str], list[tuple[Problem, dict, str]]] = {}
_disabled: set[tuple[str, str]] = set()
_warned: set[str] = set()


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
    _entries.clear()
    _disabled.clear()
    _warned.clear()


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


def route(op: Op, dtype: str, values: tuple) -> Callable:
    """The callable serving a problem, by its dtype's name and values (the hot path: one dict
    lookup on a hit; the Problem is built only on a miss)."""
    key = (op.name, dtype, values, mx.default_device().type)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = _resolve(op, Problem(op.name, parse_dtype(dtype), values))
    return fn


def _disable(op: Op, name: str, error: Exception) -> None:
    _disabled.add((op.name, name))
    _cache.clear()
    warn_once(
        f"[{op.name}] variant {name!r} failed on this machine ({type(error).__name__}: "
        f"{str(error)[:300]}); disabled for this process, using the default"
    )


def _resolve(op: Op, problem: Problem) -> Callable:
    decision = choose(op, problem)
    variant = op.variant(decision.variant)
    # The default needs no probe (a reference check at the first call) and has nothing to fall
    # back to, whether a record chose it or not; most records of host-bound sizes keep it.
    if (decision.variant, decision.params) == op.default(problem):
        return variant.build(**decision.params)
    try:
        fn = variant.build(**decision.params)
        _probe(op, problem, fn)
    except Exception as e:
        _disable(op, variant.name, e)
        return _resolve(op, problem)

    def guarded(*args, **kwargs):
        # A call can still fail where the probe did not (a transformation the variant lacks,
        # a constant out of its range): then the default serves, now and from then on.
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            _disable(op, variant.name, e)
            return route(op, dtype_name(problem.dtype), problem.values)(*args, **kwargs)

    return guarded


def _probe(op: Op, problem: Problem, fn: Callable) -> None:
    """Run a freshly chosen variant once on a small case of ``problem`` against the reference."""
    from .tuning.check import run_checked

    small = {
        d.name: min(v, PROBE_MAX_DIM) if d.kind == BUCKET else v
        for d, v in zip(op.dims, problem.values)
    }
    shapes, options = op.case(small)
    args, kwargs = op.example(shapes, problem.dtype, mx.random.key(0), **options)
    result = run_checked(op, fn, args, kwargs, problem.dtype)
    if not result.ok:
        raise RuntimeError(f"probe failed: {result.reason}")


def choose(op: Op, problem: Problem) -> Decision:
    """Decide which variant serves ``problem`` on the current back-end."""
    backend = current_backend()
    chip = detect_chip(backend).slug
    key = problem.key(op.dims)
    pdict = problem.as_dict(op.dims)

    def default(reason: str) -> Decision:
        name, params = op.default(problem, backend)
        return Decision(op.name, key, name, params, "default", reason, chip)

    if mode() == "default":
        return default("MLXP_DISPATCH=default bypasses tuned records")
    entries = _load_entries(op, chip)
    skipped = []
    for source in ("user", "pretuned"):
        for p, rec, src in entries:
            if src == source and p == problem:
                why = _unusable(op, rec, pdict, backend)
                if why is None:
                    return Decision(
                        op.name,
                        key,
                        rec["variant"],
                        rec["params"],
                        source,
                        f"tuned for this problem on {chip}",
                        chip,
                    )
                skipped.append(f"{source} record skipped: {why}")
    nearest, far = None, math.inf
    for p, rec, src in entries:
        d = distance(problem, p, op.dims)
        if not 0 < d.shape < math.inf or _unusable(op, rec, pdict, backend) is not None:
            continue
        if d.size > NEAREST_MAX_DISTANCE:
            far = min(far, d.size)
            continue
        # Closest in size, then in shape; then the larger problem (on an H100, layer_norm at
        # 4096 rows, between records for 1024 and 16384 rows, ran 1.6x the built-in with the
        # larger's kernel); then a user record, then one that kept the default.
        smaller = p.size(op.dims) < problem.size(op.dims)
        kept = rec["variant"] == rec["default_variant"]
        rank = (d, smaller, src != "user", not kept, rec["problem"])
        if nearest is None or rank < nearest[0]:
            nearest = (rank, rec, src)
    if nearest is not None:
        _, rec, src = nearest
        return Decision(
            op.name,
            key,
            rec["variant"],
            rec["params"],
            "nearest",
            f"nearest tuned problem {rec['problem']} ({src} record)",
            chip,
        )
    reason = f"no usable tuning record for {key} on {chip}"
    if far < math.inf:
        skipped.append(
            f"the nearest tuned problem is {far:g} powers of two away in size (at most "
            f"{NEAREST_MAX_DISTANCE})"
        )
    return default("; ".join([reason, *skipped]))


_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_TEXT_FIELDS = {
    "chip": 128,
    "op": 64,
    "problem": 512,
    "variant": 128,
    "mlx_version": 64,
    "package_version": 64,
    "source_hash": 64,
    "created_at": 64,
}
_TIME_FIELDS = ("median_s", "spread_s", "default_median_s")


def invalid(op: Op, rec: dict) -> str | None:
    """What makes ``rec`` malformed for ``op`` (types, sizes, an unknown variant, parameters
    outside the variant's space, a problem key that does not parse), or None. Nothing in a
    record is ever evaluated: it names a registered variant and scalar parameters, or it is
    ignored."""
    if not isinstance(rec, dict):
        return "not a mapping"
    for field, limit in _TEXT_FIELDS.items():
        value = rec.get(field)
        if not isinstance(value, str) or len(value) > limit:
            return f"{field} is not a string of at most {limit} characters"
    if not _SLUG.match(rec["chip"]) or rec["op"] != op.name:
        return "chip or op does not match"
    for field in _TIME_FIELDS:
        value = rec.get(field)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (0 <= value < math.inf)
        ):
            return f"{field} is not a finite non-negative number"
    try:
        variant = op.variant(rec["variant"])
    except KeyError:
        return f"unknown variant {rec['variant'][:64]!r}"
    try:
        variant.validate(rec.get("params"))
        op.variant(rec.get("default_variant", "")).validate(rec.get("default_params"))
        parse_key(rec["problem"], op.dims)
    except (ValueError, KeyError, TypeError) as e:
        return str(e)[:200]
    return None


def _unusable(op: Op, rec: dict, pdict: dict, backend: str) -> str | None:
    """Why a record cannot serve ``pdict`` here, or None when it can."""
    why = invalid(op, rec)
    if why is not None:
        warn_once(f"[{op.name}] ignoring a tuning record: {why}")
        return why
    name = rec["variant"]
    variant = op.variant(name)
    if rec["mlx_version"] != mx.__version__:
        return f"stale: tuned with MLX {rec['mlx_version'][:32]}, running {mx.__version__}"
    if rec["source_hash"] != variant.source_hash:
        return "stale: the kernel source changed since it was tuned"
    if not variant.available(backend):
        return f"variant {name} does not run on {backend}"
    if (op.name, name) in _disabled:
        return f"variant {name} is disabled in this process"
    if not variant.allows(pdict, rec["params"]):
        return f"variant {name} with these params does not support this problem"
    # The tuner's noise rule, for records it made under an older one.
    base, mine = rec["default_median_s"], rec["median_s"]
    if name != rec["default_variant"] and mine >= base * (1 - timing.noise(base)):
        gain = base / mine if mine else math.inf
        return f"its {gain:.2f}x over the default is within the noise at {base * 1e6:.3g} us a call"
    return None


def is_stale(op: Op, rec: dict) -> bool:
    """True when a record was tuned with another MLX version or other kernel sources."""
    try:
        variant = op.variant(rec["variant"])
    except KeyError:
        return True
    return rec.get("mlx_version") != mx.__version__ or rec.get("source_hash") != variant.source_hash


def _load_entries(op: Op, chip: str) -> list[tuple[Problem, dict, str]]:
    cached = _entries.get((op.name, chip))
    if cached is not None:
        return cached
    from .tuning import db as tdb

    entries = []
    for source, records in (
        ("user", _user_records(tdb, chip, op.name)),
        ("pretuned", _shipped_records(tdb, chip, op.name)),
    ):
        for rec in records:
            try:
                entries.append((parse_key(rec["problem"], op.dims), rec, source))
            except (ValueError, TypeError, KeyError) as e:
                warn_once(f"[{op.name}] ignoring a {source} tuning record: {str(e)[:200]}")
    _entries[(op.name, chip)] = entries
    return entries


def _user_records(tdb, chip: str, op_name: str) -> list[dict]:
    url = tdb.default_user_url()
    if not tdb.exists(url):
        return []
    try:
        db = tdb.TuningDB(url, create=False)
        try:
            return db.records(chip=chip, op=op_name)
        finally:
            db.close()
    except tdb.EmptyDatabaseError:  # created this moment by a tuning process: nothing yet
        return []
    except Exception as e:  # a broken user database must never break a call
        warn_once(
            f"[mlx_primitives] ignoring the tuning database {url}: {str(e)[:300]}. "
            "Run `mlxp-tune doctor` for how to recover."
        )
        return []


def _shipped_records(tdb, chip: str, op_name: str) -> list[dict]:
    path = tdb.shipped_path(chip)
    if path is None:
        return []
    try:
        records = tdb.read_json(path)
    except tdb.DatabaseError as e:
        warn_once(f"[mlx_primitives] ignoring the shipped tuning database {path}: {e}")
        return []
    if not all(isinstance(r, dict) for r in records):
        warn_once(f"[mlx_primitives] ignoring entries of {path} that are not records")
    return [
        r
        for r in records
        if isinstance(r, dict) and r.get("chip") == chip and r.get("op") == op_name
    ]


def explain(op_name: str, *args, **kwargs) -> Decision:
    """Which variant a call ``op(*args, **kwargs)`` would get, and why."""
    from .registry import op as get_op

    op = get_op(op_name)
    return choose(op, op.problem(*args, **kwargs))
