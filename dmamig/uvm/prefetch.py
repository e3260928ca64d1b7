"""Prefetch decisions per 2 MiB virtual block, after UVM's ``uvm_perf_prefetch``.

UVM keeps, per block, a bitmap tree over its pages: a leaf per page, each inner node covering an aligned
power-of-two subregion. For each faulted page it walks up the tree and picks the largest subregion in which
more than ``threshold`` percent of the pages are resident on the faulting processor or faulted in this batch;
the whole subregion is migrated. A sequential sweep thus turns into whole-block migrations after the first
faults of each block, while a sparse random access stays page by page.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit
except Exception:  # pragma: no cover - numba is a dependency; the numpy path serves without it
    njit = None

__all__ = ["USE_COMPILED", "density_prefetch"]

#: Decide with the compiled loop (numba) where it imports; the numpy path is its reference.
USE_COMPILED = True


def density_prefetch(faulted: np.ndarray, resident: np.ndarray, valid: np.ndarray, threshold: int) -> np.ndarray:
    """Pages to bring in, per block, under the density policy.

    Parameters
    ----------
    faulted, resident, valid : numpy.ndarray
        ``(nblocks, block_pages)`` bool: pages faulted in this batch, pages already resident on the device,
        pages that exist (mapped and accessible); ``block_pages`` is a power of two.
    threshold : int
        Percentage a subregion's occupancy must exceed.

    Returns
    -------
    numpy.ndarray
        ``(nblocks, block_pages)`` bool: the faulted pages plus the prefetched ones, never a resident or
        invalid page.
    """
    if USE_COMPILED and _density_compiled is not None:
        out = np.empty(faulted.shape, dtype=bool)
        _density_compiled(faulted, resident, valid, int(threshold), out)
        return out
    return _density_numpy(faulted, resident, valid, threshold)


def _density_numpy(faulted: np.ndarray, resident: np.ndarray, valid: np.ndarray, threshold: int) -> np.ndarray:
    """:func:`density_prefetch` in numpy, level by level for every block at once (the reference of the compiled
    loop, and the path without numba)."""
    nb, bp = faulted.shape
    occupied = (faulted | resident) & valid
    out = faulted.copy()
    size = 2
    # Every level at once for all blocks: a subregion qualifies when it holds a faulted page and is dense
    # enough; the union over levels is the largest qualifying subregion of each faulted page.
    while size <= bp:
        occ = occupied.reshape(nb, bp // size, size).sum(axis=2)
        hit = faulted.reshape(nb, bp // size, size).any(axis=2)
        q = hit & (occ * 100 > threshold * size)
        if q.any():
            out |= np.repeat(q, size, axis=1)
        size *= 2
    return out & valid & ~resident


def _density(faulted, resident, valid, threshold, out):
    """:func:`density_prefetch` block by block into ``out``: each level's subregion counts come from the two
    halves of the level below, so a block costs one pass per level over a shrinking array."""
    nb, bp = faulted.shape
    occ = np.empty(bp, dtype=np.int64)
    hit = np.empty(bp, dtype=np.bool_)
    for b in range(nb):
        for i in range(bp):
            f = faulted[b, i]
            occ[i] = 1 if (f or resident[b, i]) and valid[b, i] else 0
            hit[i] = f
            out[b, i] = f
        n = bp
        size = 1
        while n > 1:
            n //= 2
            size *= 2
            for j in range(n):
                occ[j] = occ[2 * j] + occ[2 * j + 1]
                hit[j] = hit[2 * j] or hit[2 * j + 1]
                if hit[j] and occ[j] * 100 > threshold * size:
                    for i in range(j * size, (j + 1) * size):
                        out[b, i] = True
        for i in range(bp):
            out[b, i] = out[b, i] and valid[b, i] and not resident[b, i]


_density_compiled = None if njit is None else njit(nogil=True, cache=True)(_density)
