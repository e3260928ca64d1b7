"""The small array helpers of the hot paths (array_ops): each gives what numpy's own function gives."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dmamig.array_ops import distinct, union_ints, unique_ints

ints = st.lists(st.integers(-(1 << 40), 1 << 40), max_size=300)


@settings(max_examples=200, deadline=None)
@given(values=ints, small=st.booleans())
def test_unique_ints_is_np_unique(values, small):
    arr = np.array(values, dtype=np.int64) % 7 if small else np.array(values, dtype=np.int64)
    got = unique_ints(arr)
    assert got.dtype == np.int64 and np.array_equal(got, np.unique(arr))
    assert distinct(arr) == np.unique(arr).tolist()


@settings(max_examples=100, deadline=None)
@given(a=ints, b=ints)
def test_union_ints_is_np_union1d(a, b):
    x, y = np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)
    assert np.array_equal(union_ints(x, y), np.union1d(x, y))


def test_unique_ints_takes_other_dtypes_and_lists_the_numpy_way():
    for arr in (np.array([3, 1, 3, 2], dtype=np.int32), np.array([5, 5, 0], dtype=np.uint8)):
        got = unique_ints(arr)
        assert got.dtype == arr.dtype and got.tolist() == np.unique(arr).tolist()
    assert unique_ints([4, 1, 4]).tolist() == [1, 4]
