"""The planner's common case as one compiled pass (numba): one node pair, pages already in source order.

:func:`plan_runs` coalesces, splits, balances, picks methods and orders the runs exactly as the numpy steps of
:mod:`dmamig.dma.plan_steps` do (they stay the reference; the tests compare both on random submissions). A migration
submits one such list per batch, so the planner's cost is paid 512 pages at a time: the numpy steps cost tens
of microseconds there, this loop a few.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BATCH", "GATHER", "HAVE_NUMBA", "MEMCPY", "plan_runs"]

try:
    from numba import njit

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - numba is a dependency
    HAVE_NUMBA = False

#: Method numbers, as in copy_plan.py (kept literal here so the compiled code sees constants).
MEMCPY, GATHER, BATCH = 0, 1, 2


def _plan_runs(src_idx, dst_idx, channels, split_min, large_fraction, memcpy_min, use_batch, batch_max,
               run_src, run_dst, run_np, run_ch, run_m, seg_bounds):
    """Fill the run arrays (capacity ``len(src_idx)``) and segment bounds; return ``(nruns, nsegs)``."""
    n = src_idx.size
    # 1. Coalesce pages contiguous on both sides.
    nr = 0
    for i in range(n):
        if i > 0 and src_idx[i] == src_idx[i - 1] + 1 and dst_idx[i] == dst_idx[i - 1] + 1:
            run_np[nr - 1] += 1
        else:
            run_src[nr] = src_idx[i]
            run_dst[nr] = dst_idx[i]
            run_np[nr] = 1
            nr += 1
    # 2. Split runs longer than a channel's fair share into near-equal pieces (in place, from the back).
    if channels > 1:
        share = -(-n // channels)
        max_pages = share if share > split_min else split_min
        extra_runs = 0
        for r in range(nr):
            extra_runs += -(-run_np[r] // max_pages) - 1
        if extra_runs:
            w = nr + extra_runs
            for r in range(nr - 1, -1, -1):
                length = run_np[r]
                pieces = -(-length // max_pages)
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
    # 3. Balance over channels: large runs by LPT, small ones by a prefix partition of the deficits.
    for r in range(nr):
        run_ch[r] = 0
    if channels > 1 and nr > 0:
        total = 0
        longest = 0
        for r in range(nr):
            total += run_np[r]
            if run_np[r] > longest:
                longest = run_np[r]
        mean = total / channels
        large_min = mean / large_fraction
        if large_min < 1.0:
            large_min = 1.0
        load = np.zeros(channels, dtype=np.float64)
        nlarge = 0
        if longest >= large_min:
            for r in range(nr):
                if run_np[r] >= large_min:
                    nlarge += 1
        if nlarge:
            large = np.empty(nlarge, dtype=np.int64)
            sizes = np.empty(nlarge, dtype=np.int64)
            j = 0
            for r in range(nr):
                if run_np[r] >= large_min:
                    large[j] = r
                    sizes[j] = -run_np[r]
                    j += 1
            order = np.argsort(sizes, kind="mergesort")
            for j in range(nlarge):
                r = large[order[j]]
                c = 0
                for k in range(1, channels):
                    if load[k] < load[c]:
                        c = k
                run_ch[r] = c
                load[c] += run_np[r]
        nsmall = nr - nlarge
        if nsmall:
            bounds = np.empty(channels - 1, dtype=np.int64)
            acc = 0.0
            for k in range(channels - 1):
                d = mean - load[k]
                acc += d if d > 0.0 else 0.0
                bounds[k] = np.int64(np.floor(acc + 0.5))
            end = 0
            for r in range(nr):
                if nlarge and run_np[r] >= large_min:
                    continue
                end += run_np[r]
                c = channels - 1
                for k in range(channels - 1):
                    if end <= bounds[k]:
                        c = k
                        break
                run_ch[r] = c
    # 4. Methods.
    longest = 0
    for r in range(nr):
        if run_np[r] > longest:
            longest = run_np[r]
    for r in range(nr):
        if longest < memcpy_min or run_np[r] < memcpy_min:
            run_m[r] = GATHER
        elif use_batch and run_np[r] < batch_max:
            run_m[r] = BATCH
        else:
            run_m[r] = MEMCPY
    # 5. Order by (channel, method), stable, and cut segments.
    key = np.empty(nr, dtype=np.int64)
    ordered = True
    for r in range(nr):
        key[r] = run_ch[r] * 3 + run_m[r]
        if r > 0 and key[r] < key[r - 1]:
            ordered = False
    if not ordered:
        order = np.argsort(key, kind="mergesort")
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
        for r in range(nr):
            key[r] = run_ch[r] * 3 + run_m[r]
    nseg = 0
    for r in range(nr):
        if r == 0 or key[r] != key[r - 1]:
            seg_bounds[nseg] = r
            nseg += 1
    seg_bounds[nseg] = nr
    return nr, nseg


if HAVE_NUMBA:
    plan_runs = njit(nogil=True, cache=True)(_plan_runs)
else:  # pragma: no cover
    plan_runs = None
