"""The planner's common case as one compiled pass (numba): one node pair, pages already in source order.

:func:`plan_runs` coalesces, splits, balances, picks methods and orders the runs exactly as the numpy steps of
:mod:`dmamig.dma.plan_steps` do (they stay the reference; the tests compare both on random submissions). A migration
submits one such list per batch, so the planner's cost is paid 512 pages at a time: the numpy steps cost tens
of microseconds there, this loop a few.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BATCH", "GATHER", "HAVE_NUMBA", "MEMCPY", "coalesce", "plan_coalesced", "plan_runs"]

try:
    from numba import njit

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - numba is a dependency
    HAVE_NUMBA = False

#: Method numbers, as in copy_plan.py (kept literal here so the compiled code sees constants).
MEMCPY, GATHER, BATCH = 0, 1, 2


def _coalesce(src_idx, dst_idx, run_src, run_dst, run_np):
    """Runs of pages contiguous on both sides, in page order, into the run arrays; return ``(nruns, longest)``."""
    n = src_idx.size
    if n == 0:
        return 0, 0
    nr = 0
    longest = 0
    s0 = src_idx[0]
    d0 = dst_idx[0]
    length = 1
    for i in range(1, n):
        s = src_idx[i]
        d = dst_idx[i]
        if s == s0 + length and d == d0 + length:
            length += 1
        else:  # the run's length stays in a register until it ends: a store per page costs more than the test
            run_src[nr] = s0
            run_dst[nr] = d0
            run_np[nr] = length
            nr += 1
            if length > longest:
                longest = length
            s0 = s
            d0 = d
            length = 1
    run_src[nr] = s0
    run_dst[nr] = d0
    run_np[nr] = length
    if length > longest:
        longest = length
    return nr + 1, longest


def _plan_runs(src_idx, dst_idx, channels, split_min, large_fraction, memcpy_min, use_batch, batch_max,
               run_src, run_dst, run_np, run_ch, run_m, seg_bounds):
    """Fill the run arrays (capacity ``len(src_idx)``) and segment bounds; return ``(nruns, nsegs)``."""
    nr, longest = coalesce(src_idx, dst_idx, run_src, run_dst, run_np)
    aux = np.empty(2 * channels + 2 * src_idx.size, dtype=np.int64)
    return plan_coalesced(src_idx.size, nr, longest, channels, split_min, large_fraction, memcpy_min, use_batch,
                          batch_max, run_src, run_dst, run_np, run_ch, run_m, seg_bounds, aux)


def _plan_coalesced(n, nr, longest, channels, split_min, large_fraction, memcpy_min, use_batch, batch_max,
                    run_src, run_dst, run_np, run_ch, run_m, seg_bounds, aux):
    """Steps 2 to 5 over ``nr`` runs of ``n`` pages in all (the longest ``longest`` pages), already coalesced in
    the run arrays (capacity ``n``); return ``(nruns, nsegs)``. ``aux``: int64 scratch of at least
    ``2 * channels + 2 * n`` words (the common case then allocates nothing).

    The steps are the reference's, but fused: a submission of scattered pages is a few hundred one-page runs, and
    each extra pass over them costs about as much as the work in it. The common case (no run to split, no large
    run, runs already in channel order) is one pass: channel, method and segments together."""
    # 2. Split runs longer than a channel's fair share into near-equal pieces (in place, from the back).
    if channels > 1:
        share = -(-n // channels)
        max_pages = share if share > split_min else split_min
        if longest > max_pages:
            extra_runs = 0
            for r in range(nr):
                if run_np[r] > max_pages:
                    extra_runs += -(-run_np[r] // max_pages) - 1
            w = nr + extra_runs
            for r in range(nr - 1, -1, -1):
                length = run_np[r]
                pieces = -(-length // max_pages) if length > max_pages else 1
                base = length // pieces
                extra = length - base * pieces
                s0 = run_src[r]
                d0 = run_dst[r]
                for k in range(pieces - 1, -1, -1):
                    off = k * base + (k if k < extra else extra)
                    w -= 1
                    run_src[w] = s0 + off
                    run_dst[w] = d0 + off
                    run_np[w] = base + (1 if k < extra else 0)
            nr += extra_runs
            longest = 0
            for r in range(nr):
                if run_np[r] > longest:
                    longest = run_np[r]
    # 3. Balance over channels: large runs by LPT, small ones by a prefix partition of the deficits. The total
    # is n pages, whatever the runs.
    mean = n / channels
    large_min = mean / large_fraction
    if large_min < 1.0:
        large_min = 1.0
    # Loads are whole pages, so integers; the scratch is the caller's.
    load = aux[0:channels]
    bounds = aux[channels:2 * channels]
    for k in range(channels):
        load[k] = 0
    nlarge = 0
    if channels > 1 and nr > 0 and longest >= large_min:
        large = aux[2 * channels:2 * channels + nr]
        for r in range(nr):
            if run_np[r] >= large_min:
                large[nlarge] = r
                nlarge += 1
        # Longest first, ties in run order: a stable insertion sort (at most channels * large_fraction runs).
        for j in range(1, nlarge):
            r = large[j]
            i = j
            while i > 0 and run_np[large[i - 1]] < run_np[r]:
                large[i] = large[i - 1]
                i -= 1
            large[i] = r
        for j in range(nlarge):
            r = large[j]
            c = 0
            for k in range(1, channels):
                if load[k] < load[c]:
                    c = k
            run_ch[r] = c
            load[c] += run_np[r]
    acc = 0.0
    for k in range(channels - 1):
        d = mean - load[k]
        acc += d if d > 0.0 else 0.0
        bounds[k] = np.int64(np.floor(acc + 0.5))
    # 4. With the small runs' channels: methods, the (channel, method) order and the segments, in one pass.
    gather_all = longest < memcpy_min
    end = 0
    c = 0
    prev = -1
    ordered = True
    nseg = 0
    for r in range(nr):
        length = run_np[r]
        if channels > 1 and not (nlarge and length >= large_min):
            end += length
            while c < channels - 1 and end > bounds[c]:
                c += 1
            run_ch[r] = c
        elif channels == 1:
            run_ch[r] = 0
        if gather_all or length < memcpy_min:
            m = GATHER
        elif use_batch and length < batch_max:
            m = BATCH
        else:
            m = MEMCPY
        run_m[r] = m
        key = run_ch[r] * 3 + m
        if key != prev:
            if key < prev:
                ordered = False
            seg_bounds[nseg] = r
            nseg += 1
            prev = key
    if ordered:
        seg_bounds[nseg] = nr
        return nr, nseg
    # 5. Otherwise order by (channel, method), stable, and cut the segments again.
    keys = np.empty(nr, dtype=np.int64)
    for r in range(nr):
        keys[r] = run_ch[r] * 3 + run_m[r]
    order = np.argsort(keys, kind="mergesort")
    tmp = np.empty(nr, dtype=np.int64)
    for a in (run_src, run_dst, run_np, run_ch):
        for r in range(nr):
            tmp[r] = a[order[r]]
        for r in range(nr):
            a[r] = tmp[r]
    tm = np.empty(nr, dtype=np.int8)
    for r in range(nr):
        tm[r] = run_m[order[r]]
    for r in range(nr):
        run_m[r] = tm[r]
    nseg = 0
    for r in range(nr):
        if r == 0 or keys[order[r]] != keys[order[r - 1]]:
            seg_bounds[nseg] = r
            nseg += 1
    seg_bounds[nseg] = nr
    return nr, nseg


if HAVE_NUMBA:
    coalesce = njit(nogil=True, cache=True)(_coalesce)
    plan_coalesced = njit(nogil=True, cache=True)(_plan_coalesced)
    plan_runs = njit(nogil=True, cache=True)(_plan_runs)
else:  # pragma: no cover
    coalesce = plan_coalesced = plan_runs = None
