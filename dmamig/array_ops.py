"""Small vectorized helpers for the hot paths (numpy calls kept few per batch)."""

from __future__ import annotations

import numpy as np

try:
    from numba import njit
except Exception:  # pragma: no cover - numba is a dependency; numpy serves without it
    njit = None


def _sorted_distinct(values):
    """The distinct values of ``values``, sorted: one sort and one pass."""
    a = np.sort(values)
    out = np.empty(a.size, dtype=a.dtype)
    k = 0
    for i in range(a.size):
        if k == 0 or a[i] != out[k - 1]:
            out[k] = a[i]
            k += 1
    return out[:k]


_sorted_distinct_compiled = None if njit is None else njit(nogil=True, cache=True)(_sorted_distinct)


def unique_ints(values: np.ndarray | list[int]) -> np.ndarray:
    """``np.unique(values)`` of a 1-D int64 array: its distinct values, sorted. One compiled sort and pass where
    numba imports: numpy's hash-based unique costs several times a sort on the few hundred values of a batch."""
    values = np.asarray(values)
    if _sorted_distinct_compiled is not None and values.dtype == np.int64 and values.ndim == 1:
        return _sorted_distinct_compiled(values)
    return np.unique(values)


def union_ints(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.union1d(a, b)`` of two 1-D int64 arrays, through :func:`unique_ints`."""
    return unique_ints(np.concatenate((a, b)))


def distinct(values: np.ndarray) -> list[int]:
    """Distinct values of an int array, cheaply when there is only one (the common case)."""
    if values.size == 0:
        return []
    lo, hi = values.min(), values.max()
    if lo == hi:
        return [int(lo)]
    return unique_ints(values).tolist()


def all_distinct(values: np.ndarray, bound: int) -> bool:
    """Whether the ints in ``values`` (each in ``0..bound-1``) are pairwise distinct; O(n + bound), no sort."""
    seen = np.zeros(bound, dtype=bool)
    seen[values] = True
    return int(np.count_nonzero(seen)) == values.size


def first_occurrences(values: np.ndarray, bound: int) -> np.ndarray:
    """Mask of the first occurrence of each value in ``values`` (each in ``0..bound-1``), order kept."""
    first = np.empty(bound, dtype=np.int64)
    pos = np.arange(values.size)
    first[values[::-1]] = pos[::-1]  # the last write wins: the earliest position of each value
    return first[values] == pos


def add_at(target: np.ndarray, idx: np.ndarray, delta: int | np.ndarray, unique: bool) -> None:
    """``target[idx] += delta`` that is also right when ``idx`` repeats (``unique=False``)."""
    if unique:
        target[idx] += delta
    else:
        np.add.at(target, idx, delta)
