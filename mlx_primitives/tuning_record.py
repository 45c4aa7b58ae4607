"""Tuning records: the tuned choice for one problem on one chip, and when one may serve.

A :class:`TuningRecord` is the one place its fields are listed: the database's table, the JSON
exports and the tuner all take them from here. Records are data, never code: a record names a
registered variant and scalar parameters inside that variant's declared space, or it is
refused (on write) and ignored (on read).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import mlx.core as mx

from .problem import Problem

if TYPE_CHECKING:
    from .registry import Op

# Differences below this fraction of a latency are noise, whatever the measured spread says.
NOISE = 0.02
# Below this latency a call is mostly the host's cost per operation, which moves between
# processes by more than the spread within one: a win there must be larger to count.
SHORT_CALL_S = 20e-6
SHORT_NOISE = 0.10

_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_SCALARS = (bool, int, float, str)


def noise(median_s: float) -> float:
    """The fraction of a ``median_s`` latency below which a difference is noise."""
    return SHORT_NOISE if median_s < SHORT_CALL_S else NOISE


def mlx_series(version: str) -> str:
    """``"0.32"`` for ``"0.32.4"``: records hold for the MLX minor series they were tuned on."""
    return ".".join(version.split(".")[:2])


class RecordError(ValueError):
    """A record that is not well formed, or does not fit the op it names."""


def _text(limit: int):
    return field(metadata={"max": limit})


@dataclass(frozen=True)
class TuningRecord:
    """The tuned choice for one (chip, op, problem).

    Args:
        chip: the chip's slug (:func:`mlx_primitives.hardware.detect_chip`).
        op: the op's name.
        problem: the canonical problem key (:attr:`Problem.key`).
        variant, params: the winner and its parameters.
        median_s, spread_s: the winner's latency per call and its spread: the interquartile
            range of its samples, or of its per-round ratios to the default times the
            default's median where the two were timed in rounds (``timing.paired``).
        default_variant, default_params, default_median_s: the op's default for the problem,
            timed in the same run.
        error: the winner's relative error against the float64 reference.
        mlx_version, package_version, source_hash: what it was tuned with.
        created_at: when (ISO 8601, UTC).
    """

    chip: str = _text(128)
    op: str = _text(64)
    problem: str = _text(512)
    variant: str = _text(128)
    params: dict
    median_s: float
    spread_s: float
    default_variant: str = _text(128)
    default_params: dict
    default_median_s: float
    error: float
    mlx_version: str = _text(64)
    package_version: str = _text(64)
    source_hash: str = _text(64)
    created_at: str = _text(64)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "str":
                limit = f.metadata["max"]
                if not isinstance(value, str) or len(value) > limit:
                    raise RecordError(f"{f.name} is not a string of at most {limit} characters")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RecordError(f"{f.name} is not a number")
                if not 0 <= value < math.inf:
                    raise RecordError(f"{f.name} is not a finite non-negative number")
            elif not isinstance(value, dict) or not all(
                isinstance(k, str) and type(v) in _SCALARS for k, v in value.items()
            ):
                raise RecordError(f"{f.name} is not a mapping of names to scalar values")
        if not _SLUG.match(self.chip):
            raise RecordError(f"chip {self.chip[:32]!r} is not a slug")

    @classmethod
    def from_dict(cls, data) -> TuningRecord:
        """A record from its JSON form (exports, the CLI); RecordError when malformed."""
        if not isinstance(data, dict):
            raise RecordError("a record is a mapping")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise RecordError(f"missing fields {missing}")
        return cls(**{n: data[n] for n in names})

    def to_dict(self) -> dict:
        """The JSON form: every field, parameters as mappings."""
        return asdict(self)

    @classmethod
    def from_row(cls, row) -> TuningRecord:
        """A record from a database row, whose parameters are JSON text."""
        data = dict(row)
        for name in ("params", "default_params"):
            try:
                data[name] = json.loads(data[name])
            except (TypeError, ValueError) as e:
                raise RecordError(f"{name} is not JSON") from e
        return cls.from_dict(data)

    def to_row(self) -> dict:
        """The database form: parameters as sorted JSON text."""
        row = self.to_dict()
        for name in ("params", "default_params"):
            row[name] = json.dumps(row[name], sort_keys=True)
        return row

    @property
    def speedup(self) -> float:
        """The default's latency over the winner's."""
        return self.default_median_s / self.median_s if self.median_s else math.inf

    @property
    def speedup_low(self) -> float:
        """How sure the decision is: the speedup with the winner at its median plus its spread
        (the interquartile range of its per-round ratios to the default), so above 1 where the
        win holds even in the winner's slow rounds; 1 where the default was kept."""
        if self.kept_default:
            return 1.0
        slow = self.median_s + self.spread_s
        return self.default_median_s / slow if slow else math.inf

    @property
    def kept_default(self) -> bool:
        return (self.variant, self.params) == (self.default_variant, self.default_params)

    def problem_of(self, op: Op) -> Problem:
        """The record's problem, checked against ``op``: its name, the variants it names and
        their parameter spaces, and the key's dims. RecordError says what does not fit."""
        if self.op != op.name:
            raise RecordError(f"names op {self.op!r}, not {op.name!r}")
        try:
            op.variant(self.variant).validate(self.params)
            op.variant(self.default_variant).validate(self.default_params)
            problem = Problem.parse(self.problem, op.dims)
        except (KeyError, ValueError) as e:
            raise RecordError(str(e)[:200]) from None
        if problem.op != op.name:
            raise RecordError(f"problem {self.problem[:64]!r} is not of {op.name}")
        return problem

    def stale(self, op: Op) -> str | None:
        """Why the record no longer describes this installation (another MLX series or other
        kernel sources), or None when it is current."""
        if mlx_series(self.mlx_version) != mlx_series(mx.__version__):
            return f"stale: tuned with MLX {self.mlx_version[:32]}, running {mx.__version__}"
        try:
            variant = op.variant(self.variant)
        except KeyError:
            return f"unknown variant {self.variant[:64]!r}"
        if self.source_hash != variant.source_hash:
            return "stale: the kernel source changed since it was tuned"
        return None

    def unusable(self, op: Op, problem: Problem, backend: str) -> str | None:
        """Why this (well-formed, :meth:`problem_of`-checked) record cannot serve ``problem``
        on ``backend``, or None when it can."""
        why = self.stale(op)
        if why is not None:
            return why
        variant = op.variant(self.variant)
        if not variant.available(backend):
            return f"variant {self.variant} does not run on {backend}"
        if not variant.allows(problem.as_dict(), self.params):
            return f"variant {self.variant} with these params does not support this problem"
        # The tuner's noise rule, for records it made under an older one.
        base = self.default_median_s
        if not self.kept_default and self.median_s >= base * (1 - noise(base)):
            return (
                f"its {self.speedup:.2f}x over the default is within the noise at "
                f"{base * 1e6:.3g} us a call"
            )
        return None


FIELDS = tuple(f.name for f in fields(TuningRecord))
