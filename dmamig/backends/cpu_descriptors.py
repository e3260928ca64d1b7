"""DMA descriptors of the CPU backend's polling channels: rows of raw copies, and a plan written straight into them.

A descriptor is one ``(source address, destination address, bytes, flags)`` int64 row; flag :data:`DESC_STREAM`
copies with streaming stores (the DMA kernel of :mod:`~dmamig.backends.cpu_kernels`), else with ``memcpy``.
:func:`descriptors` turns a channel's work into rows; :func:`plan_descriptors` plans a one-node-pair submission
with the planner's own compiled pass and writes the rows of every channel in the same call (the engine's path
for a migration batch); :func:`run_descriptors` is what a channel's compiled loop runs. The arrays the
addresses point into must stay alive until the rows have run.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .cpu_spin import SPIN_AVAILABLE

__all__ = ["DESC_STREAM", "PlannedCopy", "descriptors", "plan_descriptors"]

#: Descriptor flag: copy with streaming stores.
DESC_STREAM = 1

if SPIN_AVAILABLE:
    from numba import njit

    from ..dma import plan_kernels
    from .cpu_kernels import STREAM_ALIGN, STREAM_STEP, _memcpy, _store_fence, _stream64
    from .cpu_spin import _load_plain

    @njit(nogil=True, cache=True)
    def run_descriptors(addr, count):  # pragma: no cover - compiled
        for i in range(count):
            row = addr + i * 32
            src = _load_plain(row)
            dst = _load_plain(row + 8)
            nbytes = _load_plain(row + 16)
            if _load_plain(row + 24) & DESC_STREAM:
                for off in range(0, nbytes, STREAM_STEP):
                    _stream64(dst + off, src + off)
            else:
                _memcpy(dst, src, nbytes)
        _store_fence()  # streaming stores are weakly ordered: make them visible before HEAD moves

    @njit(nogil=True, cache=True)
    def _fill(desc, at, src, dst, src_start, dst_start, npages):  # pragma: no cover - compiled
        row = src.shape[1]
        sbase = src.ctypes.data
        dbase = dst.ctypes.data
        # Streaming stores need an aligned destination and whole steps (the rule of cpu_kernels.stream_copy_ok).
        flags = DESC_STREAM if dbase % STREAM_ALIGN == 0 and row % STREAM_STEP == 0 else 0
        for i in range(npages.shape[0]):
            desc[at + i, 0] = sbase + src_start[i] * row
            desc[at + i, 1] = dbase + dst_start[i] * row
            desc[at + i, 2] = npages[i] * row
            desc[at + i, 3] = flags

    @njit(nogil=True, cache=True)
    def _in_order(a):  # pragma: no cover - compiled
        for i in range(1, a.shape[0]):
            if a[i] < a[i - 1]:
                return False
        return True

    @njit(nogil=True, cache=True)
    def _plan_descriptors(src_pfns, dst_pfns, src_base, dst_base, channels, split_min, large_fraction, memcpy_min,
                          src, dst, desc, run_dst, run_np, per_channel):  # pragma: no cover - compiled
        n = src_pfns.shape[0]
        src_idx = src_pfns - src_base
        dst_idx = dst_pfns - dst_base
        run_src = np.empty(n, dtype=np.int64)
        run_ch = np.empty(n, dtype=np.int64)
        run_m = np.empty(n, dtype=np.int8)
        seg = np.empty(n + 1, dtype=np.int64)
        nr, nseg = plan_kernels.plan_runs(src_idx, dst_idx, channels, split_min, large_fraction, memcpy_min,
                                          False, 0, run_src, run_dst, run_np, run_ch, run_m, seg)
        _fill(desc, 0, src, dst, run_src[:nr], run_dst[:nr], run_np[:nr])
        # Per channel: first run, gather segments (one kernel launch each), memcpy runs (one call each).
        for c in range(channels):
            per_channel[c, 0] = nr
            per_channel[c, 1] = 0
            per_channel[c, 2] = 0
        for k in range(nseg - 1, -1, -1):
            a = seg[k]
            b = seg[k + 1]
            c = run_ch[a]
            per_channel[c, 0] = a
            if run_m[a] == plan_kernels._GATHER:
                per_channel[c, 1] += 1
            else:
                per_channel[c, 2] += b - a
        for c in range(channels - 2, -1, -1):  # channels without runs start where the next one does
            if per_channel[c, 0] > per_channel[c + 1, 0]:
                per_channel[c, 0] = per_channel[c + 1, 0]
        return nr


def descriptors(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The descriptor rows of a copy job, run by run, in order: one ``(src_frames, dst_frames, src_start,
    dst_start, npages)`` per piece of work (C-contiguous uint8 frames of equal rows, int64 runs). Streaming
    stores where the destination allows them."""
    if len(runs) == 1:
        src, dst, s, d, n = runs[0]
        desc = np.empty((n.shape[0], 4), dtype=np.int64)
        _fill(desc, 0, src, dst, s, d, n)
        return desc
    desc = np.empty((sum(int(r[4].shape[0]) for r in runs), 4), dtype=np.int64)
    at = 0
    for src, dst, s, d, n in runs:
        _fill(desc, at, src, dst, s, d, n)
        at += int(n.shape[0])
    return desc


class PlannedCopy(NamedTuple):
    """A one-node-pair submission planned straight into descriptor rows (:func:`plan_descriptors`).

    Attributes
    ----------
    desc : numpy.ndarray
        ``(nr_runs, 4)`` descriptor rows, ordered by channel.
    dst_start, npages : numpy.ndarray
        Destination frame index and pages of each run (what a failed share names).
    bounds : list of int
        Channel ``c`` takes runs ``bounds[c]:bounds[c + 1]``.
    launches, calls : list of int
        Per channel, gather segments (kernel launches) and memcpy runs (calls), for the channel counters.
    """

    desc: np.ndarray
    dst_start: np.ndarray
    npages: np.ndarray
    bounds: list[int]
    launches: list[int]
    calls: list[int]

    @property
    def nr_runs(self) -> int:
        """Runs planned."""
        return int(self.npages.size)


def plan_descriptors(src: np.ndarray, dst: np.ndarray, src_pfns: np.ndarray, dst_pfns: np.ndarray,
                     src_base: int, dst_base: int, channels: int, options: Any) -> PlannedCopy:
    """Plan pages ``src[src_pfns[i] - src_base] -> dst[dst_pfns[i] - dst_base]`` over ``channels`` and write the
    descriptor rows, in one compiled call.

    The pages are put in source order (stably) as :func:`~dmamig.dma.plan.plan_one_pair` does, then planned by
    :func:`dmamig.dma.plan_kernels.plan_runs`, the planner's compiled pass (coalesce, split, balance, order by
    channel), with ``options`` a :class:`~dmamig.dma.plan.PlanOptions` (batched copies never apply on the CPU).
    ``src_pfns`` and ``dst_pfns`` are validated int64 arrays.
    """
    n = int(src_pfns.shape[0])
    if not (src_pfns.flags.c_contiguous and dst_pfns.flags.c_contiguous):  # one compiled signature only
        src_pfns, dst_pfns = np.ascontiguousarray(src_pfns), np.ascontiguousarray(dst_pfns)
    if not _in_order(src_pfns):  # source order first, stably (what sort_pages gives the planner)
        order = np.argsort(src_pfns, kind="stable")
        src_pfns, dst_pfns = src_pfns[order], dst_pfns[order]
    desc = np.empty((n, 4), dtype=np.int64)
    run_dst = np.empty(n, dtype=np.int64)
    run_np = np.empty(n, dtype=np.int64)
    per_channel = np.empty((int(channels), 3), dtype=np.int64)
    nr = int(_plan_descriptors(src_pfns, dst_pfns, int(src_base), int(dst_base), int(channels),
                               int(options.split_min_pages), float(options.large_run_fraction),
                               int(options.memcpy_min_pages), src, dst, desc, run_dst, run_np, per_channel))
    table = per_channel.tolist()
    return PlannedCopy(desc[:nr], run_dst[:nr], run_np[:nr], [row[0] for row in table] + [nr],
                       [row[1] for row in table], [row[2] for row in table])
