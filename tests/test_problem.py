"""Problem keys: bucketing, the canonical string and nearest-problem distance."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_primitives.problem import (
    BUCKET,
    EXACT,
    Dim,
    Problem,
    bucket,
    parse_dtype,
)

DIMS = (Dim("rows"), Dim("dims", EXACT), Dim("layout", EXACT), Dim("causal", EXACT))


@given(st.integers(min_value=1, max_value=2**40))
def test_bucket_is_the_next_power_of_two(n):
    b = bucket(n)
    assert b >= n and b & (b - 1) == 0
    assert b == 1 or b // 2 < n
    assert bucket(b) == b


@given(st.integers(1, 2**20), st.integers(1, 2**20))
def test_bucket_is_monotonic(a, b):
    if a <= b:
        assert bucket(a) <= bucket(b)


@pytest.mark.parametrize("n,expected", [(1, 1), (2, 2), (3, 4), (5, 8), (1000, 1024), (4097, 8192)])
def test_bucket_examples(n, expected):
    assert bucket(n) == expected


problems = st.builds(
    lambda r, d, lay, c, t: Problem("op", t, (bucket(r), d, lay, c), DIMS),
    st.integers(1, 2**20),
    st.integers(1, 65536),
    st.sampled_from(["BSHD", "BHSD"]),
    st.booleans(),
    st.sampled_from(["float32", "float16", "bfloat16"]),
)


@given(problems)
def test_key_round_trips(p):
    key = p.key
    assert Problem.parse(key, DIMS) == p
    assert key.startswith(f"op|{p.dtype}|rows=")


@given(problems, problems)
def test_distance_is_a_metric_on_buckets(a, b):
    d = a.distance(b)
    assert d == b.distance(a)
    assert a.distance(a) == (0, 0)
    same_exact = a.dtype == b.dtype and a.values[1:] == b.values[1:]
    assert (d.size < math.inf and d.shape < math.inf) == same_exact
    if same_exact:  # one bucketed dim: size and shape agree
        assert d.size == d.shape == abs(math.log2(a.values[0]) - math.log2(b.values[0]))


def test_distance_in_size_nets_the_bucketed_dims_out():
    dims = (Dim("batch"), Dim("seq"), Dim("d", EXACT))
    a = Problem("op", "float16", (4, 2048, 64), dims)
    b = Problem("op", "float16", (1, 4096, 64), dims)
    assert a.distance(b) == (1, 3)  # half the size; 2 + 1 buckets in shape
    c = Problem("op", "float16", (16, 512, 64), dims)
    assert a.distance(c) == (0, 4) and a.distance(c) < a.distance(b)


@pytest.mark.parametrize(
    "key",
    [
        "op|float16|rows=3,dims=4,layout=BSHD,causal=true",  # 3 is not a bucket
        "op|float16|rows=4,dims=4",  # missing dims
        "op|float16|dims=4,rows=4,layout=BSHD,causal=true",  # wrong order
        "op|float8|rows=4,dims=4,layout=BSHD,causal=true",  # unknown dtype
        "op|float16",
        "rows=4",
    ],
)
def test_parse_key_rejects_malformed(key):
    with pytest.raises(ValueError):
        Problem.parse(key, DIMS)


def test_parse_dtype():
    assert parse_dtype("bfloat16") == mx.bfloat16
    assert parse_dtype("mx.float16") == mx.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")


def test_as_dict_has_dtype_and_dims():
    p = Problem("op", "float16", (8, 64, "BSHD", False), DIMS)
    assert p.as_dict() == {
        "dtype": "float16",
        "rows": 8,
        "dims": 64,
        "layout": "BSHD",
        "causal": False,
    }
    assert DIMS[0].kind == BUCKET


def test_a_dim_added_later_keeps_earlier_keys():
    """A dim with a default is left out of keys at that value: records made before the dim
    existed still name the same problems."""
    old = (Dim("rows"), Dim("dims", EXACT))
    new = (*old, Dim("sinks", EXACT, default=False))
    before = Problem("op", "float16", (8, 64), old)
    now = Problem("op", "float16", (8, 64, False), new)
    assert now.key == before.key == "op|float16|rows=8,dims=64"
    assert Problem.parse(before.key, new) == now
    other = Problem("op", "float16", (8, 64, True), new)
    assert other.key == "op|float16|rows=8,dims=64,sinks=true"
    assert Problem.parse(other.key, new) == other
    assert now.distance(other).size == math.inf  # an exact dim apart
    with pytest.raises(ValueError, match="does not name the dims"):
        Problem.parse("op|float16|rows=8,sinks=true,dims=64", new)
