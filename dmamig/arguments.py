"""Argument checks shared by the public entry points; every message names the argument and what is allowed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import page_loops
from .errors import InvalidArgument

if TYPE_CHECKING:
    from .machine import Machine


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as int, or raise InvalidArgument unless it is an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_node(m: Machine, name: str, node: Any) -> int:
    """Return ``node`` as int, or raise InvalidArgument unless it names one of the machine's nodes."""
    if type(node) is int and 0 <= node < len(m.nodes):  # the common case, in one test (bool is not int's type)
        return node
    if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or not 0 <= node < len(m.nodes):
        raise InvalidArgument(f"{name} must be a node id in 0..{len(m.nodes) - 1}, got {node!r}")
    return int(node)


def as_pfn_array(m: Machine, name: str, pfns: Any) -> np.ndarray:
    """Return ``pfns`` as a 1-D int64 array of valid pfns, or raise InvalidArgument."""
    arr = np.asarray(pfns)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidArgument(f"{name} must be a 1-D array of pfns, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidArgument(f"{name} must not be empty")
    if arr.dtype.kind not in "iu":
        raise InvalidArgument(f"{name} must have an integer dtype, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    n = m.pages.nr_pfns
    if page_loops.HAVE_NUMBA and page_loops.first_outside(arr, n) < 0:
        return arr
    bad = (arr < 0) | (arr >= n)
    if bad.any():
        raise InvalidArgument(f"{name} has pfns out of range 0..{m.pages.nr_pfns - 1}: {arr[bad][:8].tolist()}")
    return arr


def as_bytes(data: Any) -> np.ndarray:
    """``data`` (bytes-like or a uint8 array, not empty) as a flat uint8 array, without a copy where it can."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise InvalidArgument(f"data must be bytes-like or a uint8 array, got an array of {data.dtype}")
        buf = np.ascontiguousarray(data).reshape(-1)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        raise InvalidArgument(f"data must be bytes-like or a uint8 array, got {type(data).__name__}")
    if buf.size == 0:
        raise InvalidArgument("data must not be empty")
    return buf
