"""Planning a DMA submission: coalesce pages into runs, balance runs over channels, choose a copy method per run.

Everything here is pure numpy and vectorized over the submission: a plan is a handful of parallel arrays (one
entry per run), never a Python object per page or per run. The only Python loops are bounded by the number of
channels (the longest-processing-time placement of the few large runs) or by the number of segments
(channel x node pair x method), never by the number of pages.

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

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument
from . import plan_kernels

__all__ = [
    "METHOD_BATCH",
    "METHOD_GATHER",
    "METHOD_MEMCPY",
    "METHOD_NAMES",
    "CopyPlan",
    "PlanOptions",
    "Segment",
    "coalesce_runs",
    "plan_copy",
    "plan_one_pair",
    "sort_pages",
]

#: One large copy per run (cudaMemcpyAsync on a GPU channel, a memcpy on a CPU channel).
METHOD_MEMCPY = 0
#: Many short runs copied by one batched gather/scatter kernel launch.
METHOD_GATHER = 1
#: Many runs copied by one batched copy call (cuMemcpyBatchAsync), where the driver offers it.
METHOD_BATCH = 2
#: Printable names, indexed by method number.
METHOD_NAMES = ("memcpy", "gather", "batch")


@dataclass(frozen=True)
class PlanOptions:
    """Tunable thresholds of the planner.

    Attributes
    ----------
    memcpy_min_pages : int
        Runs of at least this many pages are copied with one large copy each (``METHOD_MEMCPY``); shorter runs
        go to the batched gather/scatter kernel. 8 pages (32 KiB of 4 KiB pages): below ~28 KiB a copy-engine
        call costs more in submission overhead (2-7 us each) than an SM kernel spends copying the bytes.
    use_batch : bool
        Allow ``METHOD_BATCH`` (cuMemcpyBatchAsync) for mid-sized runs when the backend reports it available.
        Off by default: it only pays off when many mid-sized runs would each cost a cudaMemcpyAsync call.
    batch_max_pages : int
        With ``use_batch``, runs of ``memcpy_min_pages`` up to (excluding) this many pages use
        ``METHOD_BATCH``; longer runs keep their own ``METHOD_MEMCPY`` call (their submission cost is
        amortised already).
    split_min_pages : int
        Long runs are cut into pieces of ``max(fair share, split_min_pages)`` pages, where the fair share is
        ``ceil(pages / channels)``: a short copy stays whole (spreading it over channels costs more in
        synchronisation than it gains in bandwidth), a huge one is spread over every channel. 64 pages =
        256 KiB of 4 KiB pages.
    large_run_fraction : int
        A run holding at least ``1/large_run_fraction`` of a channel's fair share is placed by LPT; smaller
        runs are placed by the prefix partition. Bounds the LPT loop to ``channels * large_run_fraction``
        iterations whatever the submission size.
    """

    memcpy_min_pages: int = 8
    use_batch: bool = False
    batch_max_pages: int = 128
    split_min_pages: int = 64
    large_run_fraction: int = 8

    def __post_init__(self) -> None:
        for name in ("memcpy_min_pages", "batch_max_pages", "split_min_pages", "large_run_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"PlanOptions.{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Segment:
    """A homogeneous slice of a plan: one channel, one node pair, one method; ``runs`` indexes the plan arrays."""

    channel: int
    src_node: int
    dst_node: int
    method: int
    runs: slice


@dataclass(frozen=True)
class CopyPlan:
    """A planned submission: parallel per-run arrays ordered by ``(channel, src_node, dst_node, method)``.

    Attributes
    ----------
    src_node, dst_node : numpy.ndarray
        int64 node ids of each run.
    src_start, dst_start : numpy.ndarray
        int64 first frame index (within its node) of each run.
    npages : numpy.ndarray
        int64 pages in each run (>= 1).
    channel : numpy.ndarray
        int64 channel executing each run.
    method : numpy.ndarray
        int8 copy method of each run (``METHOD_*``).
    channels : int
        Number of channels the plan was made for.
    seg_start, seg_end : numpy.ndarray
        int64 bounds of the homogeneous segments (see :meth:`segments`).
    """

    src_node: np.ndarray
    dst_node: np.ndarray
    src_start: np.ndarray
    dst_start: np.ndarray
    npages: np.ndarray
    channel: np.ndarray
    method: np.ndarray
    channels: int
    seg_start: np.ndarray = field(repr=False)
    seg_end: np.ndarray = field(repr=False)

    @property
    def nr_runs(self) -> int:
        """Number of runs."""
        return int(self.npages.size)

    @property
    def nr_pages(self) -> int:
        """Number of pages copied."""
        return int(self.npages.sum())

    def channel_pages(self) -> np.ndarray:
        """Pages assigned to each channel, ``(channels,)`` int64."""
        return np.bincount(self.channel, weights=self.npages, minlength=self.channels).astype(np.int64)

    def segments(self) -> Iterator[Segment]:
        """Yield the plan's homogeneous segments in order (few: at most channels x node pairs x methods)."""
        for a, b in zip(self.seg_start.tolist(), self.seg_end.tolist()):
            yield Segment(int(self.channel[a]), int(self.src_node[a]), int(self.dst_node[a]),
                          int(self.method[a]), slice(a, b))

    def truncated(self, keep: float) -> CopyPlan:
        """A plan holding the first ``keep`` share of each segment's runs (models a submission that failed part
        way)."""
        lens = self.seg_end - self.seg_start
        kept = np.floor(lens * keep).astype(np.int64)
        mask = np.zeros(self.nr_runs, dtype=bool)
        if self.nr_runs:
            seg_of = np.repeat(np.arange(lens.size), lens)
            pos = np.arange(self.nr_runs) - np.repeat(self.seg_start, lens)
            mask = pos < kept[seg_of]
        return _finish(self.src_node[mask], self.dst_node[mask], self.src_start[mask], self.dst_start[mask],
                       self.npages[mask], self.channel[mask], self.method[mask], self.channels)


def _empty_plan(channels: int) -> CopyPlan:
    e64 = np.empty(0, dtype=np.int64)
    return CopyPlan(e64, e64, e64, e64, e64, e64, np.empty(0, dtype=np.int8), channels, e64, e64)


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


def _split_runs(src_start: np.ndarray, dst_start: np.ndarray, npages: np.ndarray, pair: np.ndarray | None,
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


def _balance(npages: np.ndarray, channels: int, large_fraction: int) -> np.ndarray:
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


def _finish(src_node: np.ndarray, dst_node: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray,
            npages: np.ndarray, channel: np.ndarray, method: np.ndarray, channels: int) -> CopyPlan:
    """Order runs by (channel, src node, dst node, method), keeping source order inside, and cut segments."""
    n = npages.size
    if n == 0:
        return _empty_plan(channels)
    nn = int(max(src_node.max(), dst_node.max())) + 1
    # Build the key only from the components that vary: with one node pair and one method (scattered pages,
    # or one contiguous block) the key is the channel alone, which saves several passes over the runs.
    key = channel
    if src_node.strides[0] != 0 and (int(src_node.min()) != int(src_node.max())
                                     or int(dst_node.min()) != int(dst_node.max())):
        key = (key * nn + src_node) * nn + dst_node
    if int(method.min()) != int(method.max()):
        key = key * len(METHOD_NAMES) + method
    if bool((key[1:] >= key[:-1]).all()):
        # Already in order (the usual case: one node pair, one method, channels filled in source order).
        pass
    else:
        # Small-range keys sort by radix (stable, linear) when they fit 16 bits; else a stable comparison sort.
        kdt = np.uint16 if int(key.max()) < 65536 else np.int64
        order = np.argsort(key.astype(kdt), kind="stable")
        key = key[order]
        src_node, dst_node, src_start, dst_start = src_node[order], dst_node[order], src_start[order], dst_start[order]
        npages, channel, method = npages[order], channel[order], method[order]
    brk = np.flatnonzero(key[1:] != key[:-1]) + 1
    seg_start = np.concatenate(([0], brk)).astype(np.int64)
    seg_end = np.append(brk, n).astype(np.int64)
    return CopyPlan(src_node, dst_node, src_start, dst_start, npages, channel, method.astype(np.int8, copy=False),
                    channels, seg_start, seg_end)


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


#: Plan one-node-pair submissions with the compiled pass (numba); the numpy steps above are its reference.
USE_COMPILED = True


def _plan_one_pair(src_node: int, dst_node: int, src_idx: np.ndarray, dst_idx: np.ndarray, channels: int,
                   options: PlanOptions, batch_available: bool) -> CopyPlan:
    n = src_idx.size
    runs = np.empty((4, n), dtype=np.int64)
    method = np.empty(n, dtype=np.int8)
    seg = np.empty(n + 1, dtype=np.int64)
    nr, nseg = plan_kernels.plan_runs(np.ascontiguousarray(src_idx), np.ascontiguousarray(dst_idx), channels,
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
    if not (plan_kernels.HAVE_NUMBA and USE_COMPILED):
        n = src_idx.size
        return plan_copy(np.full(n, src_node), src_idx, np.full(n, dst_node), dst_idx, channels=channels,
                         options=options, batch_available=batch_available)
    if src_idx.size == 0:
        return _empty_plan(channels)
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
        return _empty_plan(channels)
    nn = int(max(src_node.max(), dst_node.max())) + 1
    # One node pair (the common case) needs no pair codes at all: skip that arithmetic and its gathers.
    one_pair = int(src_node.min()) == int(src_node.max()) and int(dst_node.min()) == int(dst_node.max())
    pair = None if one_pair else src_node * nn + dst_node
    order = sort_pages(pair if pair is not None else 0, src_idx)
    if one_pair and plan_kernels.HAVE_NUMBA and USE_COMPILED:
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
        src_start, dst_start, npages, rpair = _split_runs(src_start, dst_start, npages, rpair,
                                                          max(share, options.split_min_pages))
    channel = _balance(npages, channels, options.large_run_fraction)
    method = choose_methods(npages, options, batch_available)
    if rpair is None:
        # Read-only broadcast views: one node pair needs no per-run storage.
        rsrc = np.broadcast_to(np.int64(src_node[0]), npages.shape)
        rdst = np.broadcast_to(np.int64(dst_node[0]), npages.shape)
    else:
        rsrc, rdst = np.divmod(rpair, nn)
    return _finish(rsrc, rdst, src_start, dst_start, npages, channel, method, channels)
