"""Argument checks of DMA submissions: pfn arrays, and the source/destination rules of one submission.

Plain functions the engine calls on every :meth:`~dmamig.dma.engine.DmaEngine.copy`, so they stay cheap: a
submission that is obviously fine (increasing destinations, disjoint source and destination ranges) costs a
min/max per array and one comparison pass. Every message names the argument and what is allowed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgument

__all__ = ["pfn_array", "pfn_array_bounds", "validate_bounds"]

try:  # numba is a dependency; without it the numpy passes below do the same work
    from numba import njit

    @njit(nogil=True, cache=True)
    def _pair_bounds(src, dst):  # pragma: no cover - compiled
        """One pass over both arrays: ``(src lo, src hi, dst lo, dst hi, dst strictly increasing)``."""
        s_lo = s_hi = src[0]
        d_lo = d_hi = dst[0]
        increasing = True
        for i in range(1, src.shape[0]):
            v = src[i]
            if v < s_lo:
                s_lo = v
            elif v > s_hi:
                s_hi = v
            w = dst[i]
            if w <= dst[i - 1]:
                increasing = False
            if w < d_lo:
                d_lo = w
            elif w > d_hi:
                d_hi = w
        return s_lo, s_hi, d_lo, d_hi, increasing
except Exception:  # pragma: no cover - installs without numba
    _pair_bounds = None


def pfn_array_bounds(name: str, value: Any, nr_pfns: int) -> tuple[np.ndarray, int, int]:
    """``value`` as an int64 pfn array, with its lowest and highest pfn (``0, -1`` when empty).

    Raises
    ------
    InvalidArgument
        ``value`` is not 1-D, has a non-integer dtype, or holds a pfn outside ``0..nr_pfns - 1``.
    """
    a = np.asarray(value)
    if a.ndim != 1:
        raise InvalidArgument(f"{name} must be a 1-D array of pfns, got shape {a.shape}")
    if a.size == 0 and a.dtype.kind in "iuf":  # ``[]`` is float64 to numpy; an empty list is fine
        return np.empty(0, dtype=np.int64), 0, -1
    if a.dtype.kind not in "iu":
        raise InvalidArgument(f"{name} must have an integer dtype (pfns), got {a.dtype}")
    lo, hi = 0, -1
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= nr_pfns:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(f"{name} holds pfn {bad}, outside the machine's pfns 0..{nr_pfns - 1}")
    return a.astype(np.int64, copy=False), lo, hi


def pfn_array(name: str, value: Any, nr_pfns: int) -> np.ndarray:
    """``value`` as an int64 pfn array (see :func:`pfn_array_bounds`)."""
    return pfn_array_bounds(name, value, nr_pfns)[0]


def validate_bounds(src_pfns: Any, dst_pfns: Any,
                    nr_pfns: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Validated ``(src, dst, (src lo, src hi, dst lo, dst hi))``; the bounds also serve the planner.

    Raises
    ------
    InvalidArgument
        Lengths differ, a non-integer dtype, a pfn out of range, a duplicate destination, or a page that is
        both source and destination.
    """
    increasing = None
    if _pair_bounds is not None and type(src_pfns) is np.ndarray and type(dst_pfns) is np.ndarray \
            and src_pfns.dtype == dst_pfns.dtype == np.int64 and src_pfns.ndim == dst_pfns.ndim == 1 \
            and src_pfns.size == dst_pfns.size > 0:
        # The migration core's case (int64 pfns): bounds and the order check in one compiled pass.
        src, dst = src_pfns, dst_pfns
        s_lo, s_hi, d_lo, d_hi, increasing = (int(x) for x in _pair_bounds(src, dst))
        for name, lo, hi in (("src_pfns", s_lo, s_hi), ("dst_pfns", d_lo, d_hi)):
            if lo < 0 or hi >= nr_pfns:
                raise InvalidArgument(f"{name} holds pfn {lo if lo < 0 else hi}, outside the machine's pfns "
                                      f"0..{nr_pfns - 1}")
    else:
        src, s_lo, s_hi = pfn_array_bounds("src_pfns", src_pfns, nr_pfns)
        dst, d_lo, d_hi = pfn_array_bounds("dst_pfns", dst_pfns, nr_pfns)
    if src.size != dst.size:
        raise InvalidArgument(f"src_pfns and dst_pfns must have the same length (one destination per "
                              f"source page), got {src.size} and {dst.size}")
    bounds = (s_lo, s_hi, d_lo, d_hi)
    if src.size == 0:
        return src, dst, bounds
    # A destination written twice, or a page both read and written by one submission, would make the result
    # depend on channel timing. Cheap cases first: increasing destinations are distinct, and disjoint pfn
    # ranges cannot overlap; otherwise one counting pass answers both questions.
    disjoint = s_hi < d_lo or d_hi < s_lo
    if disjoint and (increasing if increasing is not None else bool((dst[1:] > dst[:-1]).all())):
        return src, dst, bounds
    lo, hi = min(s_lo, d_lo), max(s_hi, d_hi)
    counts = np.bincount(dst - lo, minlength=hi - lo + 1)
    if int(counts.max()) > 1:
        dup = int(np.flatnonzero(counts > 1)[0]) + lo
        raise InvalidArgument(f"dst_pfns lists pfn {dup} more than once; each destination page may be "
                              f"written once per submission")
    if disjoint:
        return src, dst, bounds
    clash = counts[src - lo] != 0
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        what = "is copied onto itself" if src[i] == dst[i] else "is both a source and a destination"
        raise InvalidArgument(f"pfn {int(src[i])} {what} in one submission; sources and destinations must "
                              f"not overlap")
    return src, dst, bounds
