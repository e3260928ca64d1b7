"""Small vectorized helpers for the hot paths (numpy calls kept few per batch)."""

from __future__ import annotations

import numpy as np


def distinct(values: np.ndarray) -> list[int]:
    """Distinct values of an int array, cheaply when there is only one (the common case)."""
    if values.size == 0:
        return []
    lo, hi = values.min(), values.max()
    if lo == hi:
        return [int(lo)]
    return np.unique(values).tolist()


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
