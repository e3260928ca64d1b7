"""The copy plan's data: copy methods, planner options, and :class:`CopyPlan`, the per-run arrays of a planned
submission cut into homogeneous segments.

:func:`finish_plan` turns runs (already split, balanced and given a method) into a plan: it orders them by
``(channel, source node, destination node, method)`` and cuts the segments. The planners of
:mod:`dmamig.dma.plan` end with it; :meth:`CopyPlan.truncated` reuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument

__all__ = [
    "METHOD_BATCH",
    "METHOD_GATHER",
    "METHOD_MEMCPY",
    "METHOD_NAMES",
    "CopyPlan",
    "PlanOptions",
    "Segment",
    "empty_plan",
    "finish_plan",
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
        return finish_plan(self.src_node[mask], self.dst_node[mask], self.src_start[mask], self.dst_start[mask],
                           self.npages[mask], self.channel[mask], self.method[mask], self.channels)


def empty_plan(channels: int) -> CopyPlan:
    """A plan with no runs for ``channels`` channels."""
    e64 = np.empty(0, dtype=np.int64)
    return CopyPlan(e64, e64, e64, e64, e64, e64, np.empty(0, dtype=np.int8), channels, e64, e64)


def finish_plan(src_node: np.ndarray, dst_node: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray,
                npages: np.ndarray, channel: np.ndarray, method: np.ndarray, channels: int) -> CopyPlan:
    """Order runs by (channel, src node, dst node, method), keeping source order inside, and cut segments."""
    n = npages.size
    if n == 0:
        return empty_plan(channels)
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
