"""Prefetch decisions per 2 MiB virtual block, after UVM's ``uvm_perf_prefetch``.

UVM keeps, per block, a bitmap tree over its pages: a leaf per page, each inner node covering an aligned
power-of-two subregion. For each faulted page it walks up the tree and picks the largest subregion in which
more than ``threshold`` percent of the pages are resident on the faulting processor or faulted in this batch;
the whole subregion is migrated. A sequential sweep thus turns into whole-block migrations after the first
faults of each block, while a sparse random access stays page by page.
"""

from __future__ import annotations

import numpy as np

__all__ = ["density_prefetch"]


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
