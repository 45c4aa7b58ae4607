"""Problems: which tuning record serves a call.

A problem is an op, a dtype and the dims that matter for speed. Dims are either *bucketed*
(rounded up to a power of two: batch, rows, sequence length) or *exact* (head_dim, hidden
size, flags such as the layout). The dispatcher's cache is keyed by the raw values, so that a
hit costs one dict lookup; a :class:`Problem` is made only on a miss, and its canonical string
only when a record is read or written.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import mlx.core as mx

BUCKET = "bucket"
EXACT = "exact"

# The dtypes a problem names, by name.
DTYPES = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float64": mx.float64,
}


def dtype_name(dtype: mx.Dtype) -> str:
    """'float16' for mx.float16."""
    return str(dtype).rsplit(".", 1)[-1]


def parse_dtype(name: str) -> mx.Dtype:
    """mx.float16 for 'float16' (or 'mx.float16'); ValueError for anything else."""
    key = name.strip().rsplit(".", 1)[-1].lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (``n >= 1``)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1  # int(): NumPy integers too


class Unmodelled(ValueError):
    """Raised by an op's problem function for a call that its variants do not model (another
    mode, stacked weights): dispatch serves such calls with the op's ``outside`` function
    (MLX's own op), kept per argument marks like a decision."""


class Dim(NamedTuple):
    """A dim of an op's problem: its name, whether it is bucketed or exact, and for a dim
    added to an op later, the value every earlier problem had. A key leaves out a dim at that
    value, so keys (and the records that name them) made before the dim existed still match.
    """

    name: str
    kind: str = BUCKET
    default: object = None


class Distance(NamedTuple):
    """How far apart two problems are, in powers of two; compares size first."""

    size: float  # log2 gap between the problems' sizes (Problem.size)
    shape: float  # sum of the log2 gaps of each bucketed dim


_FAR = Distance(math.inf, math.inf)


class Problem(NamedTuple):
    """One problem of one op: its dtype's name and its values in ``dims`` order.

    Args:
        op: the op's name.
        dtype: the name of the dtype, e.g. ``"float16"``.
        values: one value per dim, bucketed dims already rounded up.
        dims: the op's dims.
    """

    op: str
    dtype: str
    values: tuple
    dims: tuple[Dim, ...]

    @property
    def key(self) -> str:
        """The canonical string, e.g. ``rms_norm|float16|rows=1024,dims=4096,weight=float16``."""
        fields = ",".join(
            f"{d.name}={_fmt(v)}"
            for d, v in zip(self.dims, self.values)
            if d.default is None or v != d.default
        )
        return f"{self.op}|{self.dtype}|{fields}"

    def as_dict(self) -> dict:
        """``{"dtype": "float16", dim: value, ...}``: what variants' constraints look at."""
        return {"dtype": self.dtype, **{d.name: v for d, v in zip(self.dims, self.values)}}

    def small(self, most: int) -> dict:
        """:meth:`as_dict` with each bucketed dim at most ``most``: a small case of the problem
        (the exact dims, which kernels are specialized on, kept)."""
        return {
            "dtype": self.dtype,
            **{
                d.name: min(v, most) if d.kind == BUCKET else v
                for d, v in zip(self.dims, self.values)
            },
        }

    @property
    def size(self) -> int:
        """The product of the bucketed dims: the work, roughly, for the ops here."""
        return math.prod(v for d, v in zip(self.dims, self.values) if d.kind == BUCKET)

    @classmethod
    def parse(cls, key: str, dims: tuple[Dim, ...]) -> Problem:
        """Inverse of :attr:`key`; ValueError when the string does not fit ``dims``."""
        if not isinstance(key, str) or len(key) > 512:
            raise ValueError("a problem key is a string of at most 512 characters")
        parts = key.split("|")
        if len(parts) != 3:
            raise ValueError(f"malformed problem key {key!r}")
        op, dtype, fields = parts
        pairs = [f.split("=", 1) for f in fields.split(",")] if fields else []
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"malformed problem key {key!r}")
        given = dict(pairs)
        names = [d.name for d in dims if d.name in given or d.default is None]
        if [p[0] for p in pairs] != names:
            raise ValueError(f"problem key {key!r} does not name the dims {[d.name for d in dims]}")
        if not all(_VALUE.match(v) for _, v in pairs):
            raise ValueError(f"problem key {key[:80]!r} has a value outside [A-Za-z0-9_.+-]")
        values = tuple(_unfmt(given[d.name]) if d.name in given else d.default for d in dims)
        for d, v in zip(dims, values):
            if d.kind == BUCKET and (not isinstance(v, int) or v < 1 or v != bucket(v)):
                raise ValueError(f"problem key {key!r}: {d.name}={v} is not a power of two")
        return cls(op, dtype_name(parse_dtype(dtype)), values, tuple(dims))

    def distance(self, other: Problem) -> Distance:
        """How far apart two problems are over their bucketed dims: in size, then in shape.

        Infinite unless op, dtype and every exact dim agree: a record tuned for another hidden
        size or layout says nothing about this one.
        """
        if self.op != other.op or self.dtype != other.dtype:
            return _FAR
        shape = 0.0
        for d, x, y in zip(self.dims, self.values, other.values):
            if d.kind == EXACT:
                if x != y:
                    return _FAR
            else:
                shape += abs(math.log2(x) - math.log2(y))
        return Distance(abs(math.log2(self.size) - math.log2(other.size)), shape)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _unfmt(text: str):
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


_VALUE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
