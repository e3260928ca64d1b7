"""Planning a DMA submission: coalesce pages into runs, balance runs over channels, choose a copy method per run.

This module holds the planners' entry points (:func:`plan_copy`, :func:`plan_one_pair`) and picks how a
submission is planned: by the numpy steps of :mod:`dmamig.dma.plan_steps`, or, for one node pair, by the compiled
pass of :mod:`dmamig.dma.plan_loops`. The plan's data types are in :mod:`dmamig.dma.copy_plan`.

Everything is vectorized over the submission: a plan is a handful of parallel arrays (one entry per run), never
a Python object per page or per run. The only Python loops are bounded by the number of channels (the
longest-processing-time placement of the few large runs) or by the number of segments (channel x node pair x
method), never by the number of pages.

The steps:

1. **Sort** the pages by ``(source node, destination node, source frame)``.
2. **Coalesce** neighbours that are contiguous on *both* sides into runs ``(src_start, dst_start, npages)``.
3. **Split** runs longer than one channel's fair share, so one huge contiguous copy still uses every channel.
4. **Balance** runs over channels by bytes: the few large runs by greedy longest-processing-time (LPT), then
   the many small runs, in source order, fill each channel up to the mean (a prefix partition, so each channel
   reads a contiguous stretch of the source, which is what the memory system likes).
5. **Choose a method** per run: one large copy (``METHOD_MEMCPY``), a batched copy call (``METHOD_BATCH``,
   cuMemcpyBatchAsync where reachable and enabled) or the batched gather/scatter kernel (``METHOD_GATHER``) for
   short scattered runs.
6. **Order** runs by ``(channel, source node, destination node, method)`` so each channel's work is a few
   homogeneous segments, each executed by one call.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from . import plan_loops
from .copy_plan import CopyPlan, PlanOptions, empty_plan, finish_plan
from .plan_steps import balance_runs, choose_methods, coalesce_runs, sort_pages, split_runs

__all__ = ["plan_copy", "plan_one_pair"]


#: Plan one-node-pair submissions with the compiled pass (numba); the numpy steps of
#: :mod:`dmamig.dma.plan_steps` are its reference.
USE_COMPILED = True


def _plan_one_pair(src_node: int, dst_node: int, src_idx: np.ndarray, dst_idx: np.ndarray, channels: int,
                   options: PlanOptions, batch_available: bool) -> CopyPlan:
    n = src_idx.size
    runs = np.empty((4, n), dtype=np.int64)
    method = np.empty(n, dtype=np.int8)
    seg = np.empty(n + 1, dtype=np.int64)
    nr, nseg = plan_loops.plan_runs(np.ascontiguousarray(src_idx), np.ascontiguousarray(dst_idx), channels,
                                      options.split_min_pages, options.large_run_fraction,
                                      options.memcpy_min_pages, bool(options.use_batch and batch_available),
                                      options.batch_max_pages, runs[0], runs[1], runs[2], runs[3], method, seg)
    return CopyPlan(np.full(nr, src_node, dtype=np.int64), np.full(nr, dst_node, dtype=np.int64),
                    runs[0, :nr], runs[1, :nr], runs[2, :nr], runs[3, :nr], method[:nr], channels,
                    seg[:nseg], seg[1:nseg + 1])


def plan_one_pair(src_node: int, src_idx: np.ndarray, dst_node: int, dst_idx: np.ndarray, *, channels: int,
                  options: PlanOptions | None = None, batch_available: bool = False) -> CopyPlan:
    """:func:`plan_copy` for a submission whose pages all go from node ``src_node`` to node ``dst_node``.

    The caller already knows the node pair (a migration batch does), so no per-page node arrays are built.
    ``src_idx`` and ``dst_idx`` are int64 frame indices within those nodes.
    """
    options = options or PlanOptions()
    if not (plan_loops.HAVE_NUMBA and USE_COMPILED):
        n = src_idx.size
        return plan_copy(np.full(n, src_node), src_idx, np.full(n, dst_node), dst_idx, channels=channels,
                         options=options, batch_available=batch_available)
    if src_idx.size == 0:
        return empty_plan(channels)
    order = sort_pages(0, src_idx)
    if order is not None:
        src_idx, dst_idx = src_idx[order], dst_idx[order]
    return _plan_one_pair(src_node, dst_node, src_idx, dst_idx, int(channels), options, batch_available)


def plan_copy(src_node: np.ndarray, src_idx: np.ndarray, dst_node: np.ndarray, dst_idx: np.ndarray, *,
              channels: int, options: PlanOptions | None = None, batch_available: bool = False) -> CopyPlan:
    """Plan one submission.

    Parameters
    ----------
    src_node, dst_node : numpy.ndarray
        Node id of each page's source and destination (non-negative integers).
    src_idx, dst_idx : numpy.ndarray
        Frame index of each page within its node (non-negative integers).
    channels : int
        Channels to spread the work over (>= 1).
    options : PlanOptions, optional
        Thresholds; ``PlanOptions()`` by default.
    batch_available : bool
        Whether the backend can run ``METHOD_BATCH``.

    Returns
    -------
    CopyPlan
        Runs ordered by ``(channel, src_node, dst_node, method)``, source order within each segment.
    """
    options = options or PlanOptions()
    if not isinstance(channels, (int, np.integer)) or channels < 1:
        raise InvalidArgument(f"channels must be an integer >= 1, got {channels!r}")
    channels = int(channels)
    src_node = np.asarray(src_node, dtype=np.int64)
    dst_node = np.asarray(dst_node, dtype=np.int64)
    src_idx = np.asarray(src_idx, dtype=np.int64)
    dst_idx = np.asarray(dst_idx, dtype=np.int64)
    n = src_idx.size
    if not (src_node.size == dst_node.size == dst_idx.size == n):
        raise InvalidArgument("plan_copy: src_node, src_idx, dst_node and dst_idx must have the same length")
    if n == 0:
        return empty_plan(channels)
    nn = int(max(src_node.max(), dst_node.max())) + 1
    # One node pair (the common case) needs no pair codes at all: skip that arithmetic and its gathers.
    one_pair = int(src_node.min()) == int(src_node.max()) and int(dst_node.min()) == int(dst_node.max())
    pair = None if one_pair else src_node * nn + dst_node
    order = sort_pages(pair if pair is not None else 0, src_idx)
    if one_pair and plan_loops.HAVE_NUMBA and USE_COMPILED:
        if order is not None:
            src_idx, dst_idx = src_idx[order], dst_idx[order]
        return _plan_one_pair(int(src_node[0]), int(dst_node[0]), src_idx, dst_idx, channels, options,
                              batch_available)
    if order is not None:
        src_idx, dst_idx = src_idx[order], dst_idx[order]
        if pair is not None:
            pair = pair[order]
    starts, src_start, npages = coalesce_runs(src_idx, dst_idx, pair)
    if starts.size == n:
        # Nothing coalesced (scattered pages): the runs are the pages themselves, no gathers needed.
        dst_start, rpair = dst_idx, pair
    else:
        dst_start = dst_idx[starts]
        rpair = pair[starts] if pair is not None else None
    if channels > 1:
        share = -(-n // channels)
        src_start, dst_start, npages, rpair = split_runs(src_start, dst_start, npages, rpair,
                                                         max(share, options.split_min_pages))
    channel = balance_runs(npages, channels, options.large_run_fraction)
    method = choose_methods(npages, options, batch_available)
    if rpair is None:
        # Read-only broadcast views: one node pair needs no per-run storage.
        rsrc = np.broadcast_to(np.int64(src_node[0]), npages.shape)
        rdst = np.broadcast_to(np.int64(dst_node[0]), npages.shape)
    else:
        rsrc, rdst = np.divmod(rpair, nn)
    return finish_plan(rsrc, rdst, src_start, dst_start, npages, channel, method, channels)
