"""The numpy steps of the copy planner: sort pages, coalesce them into runs, split long runs, balance runs over
channels, choose a copy method per run.

Pure numpy, vectorized over the submission (see :mod:`dmamig.dma.plan` for the order of the steps). They plan
every submission the compiled pass of :mod:`dmamig.dma.plan_loops` does not, and stay its reference.
"""

from __future__ import annotations

import numpy as np

from .copy_plan import METHOD_BATCH, METHOD_GATHER, METHOD_MEMCPY, PlanOptions

__all__ = ["balance_runs", "choose_methods", "coalesce_runs", "sort_pages", "split_runs"]


def sort_pages(pair: np.ndarray | int, src_idx: np.ndarray) -> np.ndarray | None:
    """Order that sorts pages by ``(pair, src_idx)``.

    Parameters
    ----------
    pair : numpy.ndarray or int
        Non-negative int64 node-pair code of each page (a scalar when all pages share one pair).
    src_idx : numpy.ndarray
        Non-negative int64 source frame index of each page.

    Returns
    -------
    numpy.ndarray or None
        int64 permutation, or ``None`` when the pages are already in order.

    Notes
    -----
    A comparison sort of 256 Ki keys costs ~20 ms, a quarter of the time needed to copy the 1 GiB they
    describe. Keys are bounded integers and usually distinct, so when the key range is small compared with the
    number of pages a counting placement (one scatter, one compaction) does it in ~2 ms; duplicates or a sparse
    key range fall back to ``argsort``.
    """
    n = src_idx.size
    if n <= 1:
        return None
    if isinstance(pair, np.ndarray):
        key = pair * (int(src_idx.max()) + 1) + src_idx
    else:
        key = src_idx
    if bool((key[1:] >= key[:-1]).all()):
        return None
    krange = int(key.max()) + 1
    if krange <= 8 * n + 4096:
        slots = np.full(krange, -1, dtype=np.int64)
        slots[key] = np.arange(n, dtype=np.int64)
        order = slots[slots >= 0]
        if order.size == n:  # every key distinct: the compaction is the sorted order
            return order
    return np.argsort(key, kind="stable").astype(np.int64, copy=False)


def coalesce_runs(src_idx: np.ndarray, dst_idx: np.ndarray,
                  pair: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coalesce consecutive pages that are contiguous on both sides into runs.

    Parameters
    ----------
    src_idx, dst_idx : numpy.ndarray
        int64 frame indices of each page, in the order to coalesce (sort first to find every run).
    pair : numpy.ndarray, optional
        Node-pair code of each page; a run never crosses a change of pair.

    Returns
    -------
    tuple of numpy.ndarray
        ``(starts, src_start, npages)``: ``starts`` indexes the first page of each run (so the destination
        start is ``dst_idx[starts]``), ``src_start = src_idx[starts]`` and ``npages`` counts pages per run.
    """
    n = src_idx.size
    if n == 0:
        e = np.empty(0, dtype=np.int64)
        return e, e, e
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(src_idx[1:], src_idx[:-1] + 1, out=brk[1:])
    brk[1:] |= dst_idx[1:] != dst_idx[:-1] + 1
    if pair is not None:
        brk[1:] |= pair[1:] != pair[:-1]
    if bool(brk.all()):
        # Every page is its own run; a broadcast view avoids allocating (and page-faulting) a ones array.
        return np.arange(n, dtype=np.int64), src_idx, np.broadcast_to(np.int64(1), (n,))
    starts = np.flatnonzero(brk)
    npages = np.diff(np.append(starts, n))
    return starts, src_idx[starts], npages


def split_runs(src_start: np.ndarray, dst_start: np.ndarray, npages: np.ndarray, pair: np.ndarray | None,
               max_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Split every run longer than ``max_pages`` into near-equal pieces of at most ``max_pages`` (vectorized)."""
    if int(npages.max()) <= max_pages:
        return src_start, dst_start, npages, pair
    pieces = -(-npages // max_pages)
    owner = np.repeat(np.arange(npages.size), pieces)
    first = np.cumsum(pieces) - pieces
    k = np.arange(owner.size) - first[owner]  # piece number within its run
    # Near-equal pieces (lengths differ by at most one page) so channels end together.
    base, extra = np.divmod(npages[owner], pieces[owner])
    length = base + (k < extra)
    offset = k * base + np.minimum(k, extra)
    return (src_start[owner] + offset, dst_start[owner] + offset, length,
            pair[owner] if pair is not None else None)


def balance_runs(npages: np.ndarray, channels: int, large_fraction: int) -> np.ndarray:
    """Assign each run (in source order) to a channel so that pages per channel are balanced.

    Large runs (at least ``1/large_fraction`` of the fair share) are placed first by greedy LPT; the remaining
    small runs fill the channels' deficits to the mean in source order (prefix partition by the midpoint of
    each run). The max channel load is at most ``mean + largest run``, the list-scheduling bound.
    """
    nruns = npages.size
    chan = np.zeros(nruns, dtype=np.int64)
    if channels == 1 or nruns == 0:
        return chan
    total = int(npages.sum())
    mean = total / channels
    large_min = max(1.0, mean / large_fraction)
    load = np.zeros(channels, dtype=np.float64)
    large = np.flatnonzero(npages >= large_min) if int(npages.max()) >= large_min else npages[:0]
    if large.size:
        # LPT: biggest first, each to the least-loaded channel. At most channels * large_fraction iterations.
        by_size = large[np.argsort(-npages[large], kind="stable")]
        for r in by_size.tolist():
            c = int(np.argmin(load))
            chan[r] = c
            load[c] += npages[r]
    if large.size:
        small = np.flatnonzero(npages < large_min)
        sizes = npages[small]
    else:
        small, sizes = None, npages
    if sizes.size:
        end = np.cumsum(sizes)
        deficit = np.maximum(mean - load, 0.0)
        bounds = np.cumsum(deficit)[:-1]
        # Channels' deficits, laid end to end, cover the small runs' total (exactly, unless LPT overfilled a
        # channel; then the trailing channels simply end up slightly short). A run goes to the first channel
        # whose stretch reaches its end, so a channel overshoots its deficit by less than one small run.
        # ``end`` is increasing, so cut it at the C-1 bounds (C binary searches) instead of placing every run.
        cuts = np.searchsorted(end, np.floor(bounds + 0.5).astype(np.int64), side="right")
        slot = np.repeat(np.arange(channels, dtype=np.int64), np.diff(cuts, prepend=0, append=sizes.size))
        if small is None:
            chan = slot
        else:
            chan[small] = slot
    return chan


def choose_methods(npages: np.ndarray, options: PlanOptions, batch_available: bool) -> np.ndarray:
    """Copy method of each run (``METHOD_*``, int8) from its length and the options."""
    longest = int(npages.max()) if npages.size else 0
    if longest < options.memcpy_min_pages:  # all short (scattered pages): skip the per-run comparison
        return np.broadcast_to(np.int8(METHOD_GATHER), npages.shape)
    method = np.where(npages >= options.memcpy_min_pages, METHOD_MEMCPY, METHOD_GATHER).astype(np.int8)
    if options.use_batch and batch_available:
        mid = (npages >= options.memcpy_min_pages) & (npages < options.batch_max_pages)
        method[mid] = METHOD_BATCH
    return method
