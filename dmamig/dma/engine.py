"""The device DMA engine: asynchronous page copies between any nodes, spread over channels.

A submission (:meth:`DmaEngine.copy`) is validated (:mod:`dmamig.dma.validate`), planned
(:mod:`dmamig.dma.plan`: sorted, coalesced into runs, balanced over channels, a copy method per run) and handed
to the backend's channels, each of which runs its share asynchronously. The caller gets a :class:`Fence` at once
and keeps working. Its counters are :class:`~dmamig.dma.stats.DmaStats`; while fault points are armed,
:mod:`dmamig.dma.inject` decides what each share suffers.

Channels belong to devices, as a GPU's copy engines do: each device gets its own ``channels`` channels (opened
on its first copy), and a copy runs on the channels of its destination device (of its source for a copy to host
memory; device 0's for copies between host nodes). Copies towards different devices therefore run concurrently,
whatever else is queued. Between two devices the machine's topology decides the route: a direct peer copy, or,
without peer access, a copy staged through each channel's pinned host bounce buffer (:mod:`dmamig.dma.staging`).

Ordering: work on one channel runs in submission order, but different channels run concurrently, so two
submissions are **not** ordered with respect to each other. Wait for a fence before submitting a copy that
reads what that fence's copy writes (or writes what it reads).
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import DmaError, InvalidArgument
from ..fault_injection import FaultPoints
from ..topology import ROUTE_STAGED, Topology, node_routes
from .channel import ChannelWork, Completion, exec_device
from .copy_plan import CopyPlan, PlanOptions
from .fence import DONE, FailedCompletion, Fence
from .inject import add_submit_errors, emulate_fault, share_fault
from .plan import plan_copy, plan_one_pair
from .ring import SUBMIT_NO_ROOM, RingRoute
from .stats import DmaStats, baseline_of, with_channels, zero_baseline
from .validate import pfn_array, validate_bounds

# The native int64 dtype, compared as a dtype (comparing with the scalar type costs twice as much; arrays made by
# compiled code carry equal dtype objects that are not numpy's own, so ``is`` would miss them).
_INT64 = np.dtype(np.int64)

__all__ = ["DmaEngine", "RingBatches"]

#: Submissions kept for ``synchronize`` before the finished ones are dropped from the list.
_PRUNE_PENDING = 32
#: Seconds a submission that found a ring full waits for its oldest job before it looks again.
_ROOM_WAIT_S = 0.05
#: RingBatches kept per node pair for reuse (RingBatches.close): one per migrating thread, a few threads.
_IDLE_BATCHES = 4


class DmaEngine:
    """Asynchronous page copies between memory nodes over ``channels`` backend channels.

    Parameters
    ----------
    nodes : tuple of Node
        The machine's nodes (each with ``frames``, ``kind``, ``device``, ``base_pfn``, ``total_pages``).
    nodemap : NodeMap
        Translates machine-wide pfns to (node, frame index).
    backend : Backend
        Provides the channels (:meth:`~dmamig.backends.base.Backend.open_channels`) and checksums.
    page_size : int
        Bytes of a base page.
    channels : int
        DMA channels per device (>= 1).
    options : PlanOptions, optional
        Planner thresholds.
    faults : FaultPoints, optional
        Fault points consulted on every submission (``dma_submit``, ``dma_copy``, ``dma_complete``,
        ``channel_crash``); the machine passes its own ``m.faults``. A new, unarmed set by default.
    content : PageArray, optional
        What the destinations of every submission are stamped in before it is published: its ``write_seq``
        array (int64, one per pfn) gets a new number from its ``next_write_seq()`` (the machine's page array,
        so that a NO_COPY migration can tell a current copy from a stale one).
    topology : Topology, optional
        Peer access between the nodes' devices; pairs without it are staged through host memory. ``None``: every
        pair of devices has peer access.

    Examples
    --------
    >>> fence = engine.copy(src_pfns, dst_pfns)   # doctest: +SKIP
    >>> fence.wait()                              # doctest: +SKIP
    True
    """

    def __init__(self, nodes: Any, nodemap: Any, backend: Any, page_size: int = 4096, channels: int = 4,
                 options: PlanOptions | None = None, faults: FaultPoints | None = None,
                 content: Any = None, topology: Topology | None = None):
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
            raise InvalidArgument(f"channels must be an integer >= 1, got {channels!r}")
        if not isinstance(page_size, (int, np.integer)) or page_size < 1:
            raise InvalidArgument(f"page_size must be a positive integer, got {page_size!r}")
        self.nodes = tuple(nodes)
        if not self.nodes:
            raise InvalidArgument("the DMA engine needs at least one node")
        self.nodemap = nodemap
        self.backend = backend
        self.page_size = int(page_size)
        self._options = options or PlanOptions()
        self._nr_pfns = int(nodemap.nr_pfns)
        self._bases = np.array([n.base_pfn for n in self.nodes], dtype=np.int64)
        self._base_list = self._bases.tolist()
        if self._bases.size > 1 and not bool((np.diff(self._bases) > 0).all()):
            raise InvalidArgument("nodes must be given in increasing base_pfn order")
        self._lock = threading.Lock()
        self._closed = False
        self._batch_available = bool(getattr(backend, "batch_copy_available", False))
        # Node pair -> its ring route (see _ring_route); () where it has none.
        self._routes: dict[tuple[int, int], tuple[Any, ...]] = {}
        # The route of the last submission published in one compiled call between two different nodes: a
        # migration's batches keep to one node pair, and the compiled call itself sends back a page off the
        # route, so the next batch needs no look-up.
        self._last_route: tuple[Any, ...] | None = None
        self.faults = faults if faults is not None else FaultPoints()
        # Stamped with the destination pfns of every submission before it is published (the machine's page
        # array: a NO_COPY migration tells a current copy from a stale one by these write sequence numbers).
        self._content = content
        self._write_seq = content.write_seq if content is not None else np.zeros(0, dtype=np.int64)
        self._next_write_seq: Callable[[], int] = content.next_write_seq if content is not None else int
        self._seq = 0
        # The submission in flight of each RingBatches (its lane and jobs), for synchronize().
        self._in_flight: dict[RingBatches, tuple[list[Any], list[list[int]]]] = {}
        # Node pair -> RingBatches given back (RingBatches.close) for the next caller: a migration call of one
        # batch asks for one, and a new one costs it more than a look here.
        self._idle_batches: dict[tuple[int, int], list[RingBatches]] = {}
        self._stats = DmaStats()
        self._pending: list[Fence] = []
        self.topology = topology
        # Node pair -> staged (True where two devices lack peer access), looked up once per segment.
        self._staged = (node_routes([n.device for n in self.nodes], topology) == ROUTE_STAGED).tolist()
        self._nchan = int(channels)
        # Backends whose open_channels takes no device (older or test doubles) share one set of channels.
        try:
            self._per_device = "device" in inspect.signature(backend.open_channels).parameters
        except (TypeError, ValueError):
            self._per_device = False
        self._lanes: dict[int, list[Any]] = {}
        self._base: dict[int, tuple[float, dict[str, int], int]] = {}  # id(channel) -> stats baseline
        self._open_lane(0)

    def _open_lane(self, device: int) -> list[Any]:
        """The channels of ``device``, opened on first use (caller holds the lock, or is the constructor)."""
        key = device if self._per_device else 0
        lane = self._lanes.get(key)
        if lane is None:
            chans = self.backend.open_channels(self._nchan, device=key) if key else \
                self.backend.open_channels(self._nchan)
            lane = self._lanes[key] = list(chans)
            # A lane opened after reset_stats counts from zero, so its baseline is zero too.
            for ch in lane:
                self._base[id(ch)] = zero_baseline()
        return lane

    @property
    def _channels(self) -> list[Any]:
        """Every open channel, device by device in the order the devices were first used."""
        return [ch for lane in list(self._lanes.values()) for ch in lane]

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def options(self) -> PlanOptions:
        """How submissions are planned (fixed for the engine's life: routes pack them once)."""
        return self._options

    @property
    def channels(self) -> int:
        """Number of channels per device."""
        return self._nchan

    @property
    def devices_used(self) -> tuple[int, ...]:
        """Devices whose channels have been opened (device 0's always are)."""
        return tuple(self._lanes)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def stats(self) -> DmaStats:
        """A snapshot of the counters (see :class:`DmaStats`)."""
        with self._lock:
            # Every page counted is a page of bytes: the submissions count only pages.
            s = dataclasses.replace(self._stats, bytes=self._stats.pages * self.page_size, busy_seconds=[],
                                    busy_by_device={})
            lanes = [(dev, list(lane)) for dev, lane in self._lanes.items()]
            base = dict(self._base)
        return with_channels(s, lanes, base)

    def reset_stats(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._stats = DmaStats()
            for ch in self._channels:
                self._base[id(ch)] = baseline_of(ch)

    def _count_error(self) -> None:
        with self._lock:
            self._stats.errors += 1

    # -- fault injection -----------------------------------------------------------------------------------
    def inject_errors(self, n: int = 1) -> None:
        """Make the next ``n`` non-empty submissions fail; ``0`` cancels the failures still pending.

        A shortcut onto the ``dma_submit`` fault point (``faults["dma_submit"]``): calls add up, and a
        probabilistic setting there is replaced. A failing submission has one channel's share refused (with
        one channel, nothing is copied); the destination contents are then unspecified, the sources are never
        written, and its fence's ``wait`` raises :class:`~dmamig.errors.DmaError`. The engine stays usable.

        Raises
        ------
        InvalidArgument
            ``n`` is not an integer >= 0.
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise InvalidArgument(f"inject_errors needs a count >= 0, got {n!r}")
        with self._lock:
            add_submit_errors(self.faults, int(n))

    # -- submission ----------------------------------------------------------------------------------------
    def plan(self, src_pfns: Any, dst_pfns: Any) -> CopyPlan:
        """Validate and plan a submission without running it (for inspection and tests)."""
        src, dst, _ = validate_bounds(src_pfns, dst_pfns, self._nr_pfns)
        return self._plan(src, dst)

    def _locate(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bases = self._bases
        if bases.size == 1:
            return np.broadcast_to(np.int64(0), pfns.shape), pfns - bases[0]
        if bases.size <= 8:
            # A few comparisons beat a binary search per pfn (searchsorted costs ~12 ns per random key).
            nid = (pfns >= bases[1]).astype(np.int64)
            for b in bases[2:].tolist():
                nid += pfns >= b
            return nid, pfns - bases[nid]
        return self.nodemap.locate(pfns)

    def _node_of(self, pfn: int) -> int:
        return bisect.bisect_right(self._base_list, pfn) - 1  # the last node whose base is <= pfn

    def _plan(self, src: np.ndarray, dst: np.ndarray, bounds: tuple[int, ...] | None = None) -> CopyPlan:
        batch = self._batch_available
        # One source node and one destination node (every migration batch): the ends of each range tell.
        s_lo, s_hi, d_lo, d_hi = bounds if bounds is not None else \
            (int(src.min()), int(src.max()), int(dst.min()), int(dst.max()))
        sn, dn = self._node_of(s_lo), self._node_of(d_lo)
        if sn == self._node_of(s_hi) and dn == self._node_of(d_hi):
            base = self._base_list
            return plan_one_pair(sn, src - base[sn], dn, dst - base[dn], channels=self.channels,
                                 options=self._options, batch_available=batch)
        snode, sidx = self._locate(src)
        dnode, didx = self._locate(dst)
        return plan_copy(snode, sidx, dnode, didx, channels=self.channels, options=self._options,
                         batch_available=batch)

    def copy(self, src_pfns: Any, dst_pfns: Any) -> Fence:
        """Copy page ``src_pfns[i]`` to page ``dst_pfns[i]`` for every ``i``, asynchronously.

        Parameters
        ----------
        src_pfns, dst_pfns : array_like of int
            Machine-wide base pfns (each base page of a folio listed), any node pair per page. Destinations
            must be distinct and no page may be both a source and a destination.

        Returns
        -------
        Fence
            Completes when every page is copied; already done for an empty submission.

        Raises
        ------
        InvalidArgument
            Lengths differ, a non-integer dtype, a pfn out of range, a duplicate destination, or a page that
            is both source and destination.
        DmaError
            The engine is closed.
        """
        if self._closed:
            raise DmaError("the DMA engine is closed; create a new Machine (or engine) to copy")
        if self._routes and type(src_pfns) is np.ndarray and type(dst_pfns) is np.ndarray \
                and src_pfns.dtype == _INT64 and dst_pfns.dtype == _INT64 and src_pfns.ndim == 1 \
                and src_pfns.shape == dst_pfns.shape and src_pfns.size and not self.faults.armed:
            # The last route, then the route of the first page's node pair; every page is checked against the
            # route inside the compiled call: a batch of a migration between two nodes needs no other pass over
            # its pfns (a page elsewhere sends it the long way).
            s0, d0 = src_pfns.item(0), dst_pfns.item(0)
            last = self._last_route
            if last is not None and last[0].covers(s0, d0):
                fence = self._submit_rows(last, src_pfns, dst_pfns, checked=False)
                if fence is not None:
                    return fence
            fast = self._routes.get((self._node_of(s0), self._node_of(d0)))
            if fast and fast[-1] and fast is not last:
                fence = self._submit_rows(fast, src_pfns, dst_pfns, checked=False)
                if fence is not None:
                    return fence
        src, dst, bounds = validate_bounds(src_pfns, dst_pfns, self._nr_pfns)
        if src.size == 0:
            return DONE
        route = self._ring_route(bounds)
        if route is not None:
            fence = self._submit_rows(route, src, dst, checked=True)
            if fence is not None:
                return fence
        if self._content is not None:
            self._content.note_written(dst)
        plan = self._plan(src, dst, bounds)
        # Submission happens under the engine lock so that close() cannot slip between the check and the
        # queueing: no share is ever queued behind a channel's stop.
        with self._lock:
            if self._closed:
                raise DmaError("the DMA engine is closed; create a new Machine (or engine) to copy")
            seq = self._count_submission(int(src.size), plan.nr_runs)
            completions, error, share_runs = self._submit(plan, seq, int(src.size) * self.page_size)
            if error is not None:
                self._stats.errors += 1
            fence = self._track(Fence(completions, error, self._count_error, seq, share_runs))
        return fence

    def ring_route(self, src_pfns: Any, dst_pfns: Any) -> tuple[RingRoute, list[Any]] | None:
        """Where :meth:`copy` of these pages goes in one compiled call: the :class:`~dmamig.dma.ring.RingRoute` and
        the channels that run its jobs (``channel.completion(seq)``); ``None`` where it takes the general path.
        For benchmarks that time the compiled call alone; a lane opens on its first general-path copy.

        Raises
        ------
        InvalidArgument
            As :meth:`copy`.
        """
        src, _dst, bounds = validate_bounds(src_pfns, dst_pfns, self._nr_pfns)
        route = self._ring_route(bounds) if src.size else None
        return (route[0], list(route[1])) if route else None

    def ring_batches(self, src_node: int, dst_node: int, pages: int) -> RingBatches | None:
        """The rings between two nodes, for a caller that publishes submissions of at most ``pages`` pages from
        its own compiled call (:class:`RingBatches`); ``None`` where a copy between them takes the general path
        (see :meth:`ring_route`: no lane open yet, fault points armed, a batched-copy backend, two devices).
        Asked again later, it may be there (a lane opens on its first general-path copy)."""
        if self.faults.armed or self._batch_available or self._closed:
            return None
        key = (int(src_node), int(dst_node))
        idle = self._idle_batches.get(key)
        if idle:
            try:
                batches = idle.pop()  # (another thread may have taken the last one since the test)
            except IndexError:
                pass
            else:
                if pages > batches._pages:
                    batches._pages = int(pages)  # hold() has the route grow its workspace
                return batches
        route = self._routes.get(key)
        if route is None:
            route = self._make_route(*key)
            if route is None:
                return None
            self._routes[key] = route
        return RingBatches(self, route[0], route[1], int(pages), key) if route else None

    def _count_submission(self, pages: int, runs: int) -> int:
        """Count one submission of ``pages`` pages in ``runs`` runs; its sequence number (caller holds the lock)."""
        self._seq += 1
        stats = self._stats
        stats.submissions += 1
        stats.pages += pages  # and pages * page_size bytes (see stats)
        stats.runs += runs
        return self._seq

    def _track(self, fence: Fence) -> Fence:
        """Keep ``fence`` for :meth:`synchronize` (caller holds the lock)."""
        if len(self._pending) >= _PRUNE_PENDING:  # prune now and then: done fences need no synchronize()
            self._pending = [f for f in self._pending if not f.done]
        self._pending.append(fence)
        return fence

    def _ring_route(self, bounds: tuple[int, ...]) -> tuple[Any, ...] | None:
        """How a submission goes to the lane's rings in one compiled call, or ``None`` when it takes the general
        path: a fault point armed, a batched-copy backend, more than one node pair, two devices, a lane not yet
        open (it opens on the general path), or channels that do not take rows (:attr:`takes_rows`).

        Returns ``(RingRoute, lane, nodes differ)``.
        """
        if self.faults.armed or self._batch_available:
            return None
        s_lo, s_hi, d_lo, d_hi = bounds
        sn, dn = self._node_of(s_lo), self._node_of(d_lo)
        if sn != self._node_of(s_hi) or dn != self._node_of(d_hi):
            return None
        route = self._routes.get((sn, dn))
        if route is None:
            route = self._make_route(sn, dn)
            if route is None:
                return None
            self._routes[(sn, dn)] = route
        return route or None

    def _make_route(self, sn: int, dn: int) -> tuple[Any, ...] | None:
        """The ring route of node pair ``(sn, dn)``; ``()`` where there is none; ``None`` until its lane is open.

        A route is ``(RingRoute, lane, nodes differ)``.
        """
        s, d = self.nodes[sn], self.nodes[dn]
        if s.kind == d.kind == "device":
            return ()
        key = exec_device(s.kind, s.device, d.kind, d.device) if self._per_device else 0
        lane = self._lanes.get(key)
        if lane is None:
            return None
        rings = getattr(lane[0], "ring_set", None)
        where = getattr(self.backend, "frames_address", None)
        if rings is None or where is None \
                or not all(getattr(ch, "ring_set", None) is rings and ch.takes_rows for ch in lane):
            return ()
        spans = [where(n.frames) for n in self.nodes]
        if spans[sn] is None or spans[dn] is None:
            return ()
        # Rows may only touch registered memory: every node's frames, so that a wrong address is a job status.
        for node, span in zip(self.nodes, spans):
            if span is not None:
                rings.register(span[0], span[0] + span[1], owner=node.frames)
        return (rings.route(s.base_pfn, d.base_pfn, spans[sn][0], spans[dn][0], self.page_size, self._options,
                            src_pages=s.total_pages, dst_pages=d.total_pages), lane, sn != dn)

    def _submit_rows(self, route: tuple[Any, ...], src: np.ndarray, dst: np.ndarray, checked: bool) -> Fence | None:
        """Check, stamp and publish a submission on the lane's rings in one compiled call.

        ``None`` when nothing was published and the general path must take it: a channel's share is more rows
        than its ring holds, or (``checked`` false) a page is off the route or the destinations need the full
        validation.
        """
        # A channel that broke is not asked here: its jobs fail when a waiter finds its worker gone (revive).
        ring_route, lane, differ = route
        while True:
            with self._lock:
                if self._closed:
                    raise DmaError("the DMA engine is closed; create a new Machine (or engine) to copy")
                got = ring_route.submit(src, dst, checked, self._write_seq, self._next_write_seq())
                if type(got) is not int:
                    submission = self._count_submission(int(src.size), got.nr_runs)
                    jobs = got.jobs
                    # The channels' completions are made when the fence is first asked (while the copy runs).
                    fence = self._track(Fence(None, None, self._count_error, submission, None, (lane, jobs)))
                    if differ:
                        self._last_route = route
                    break
                if got != SUBMIT_NO_ROOM:
                    return None
            # A ring is full: collect finished jobs' statuses, and wait (outside the lock) for the oldest jobs.
            ring_route.ring_set.make_room()
            for ch in lane:
                ch.wait_for_progress(_ROOM_WAIT_S)
        for ch, (_seq, asleep) in zip(lane, jobs):
            if asleep:  # a channel without a job reports its consumer awake
                ch.wake()
        return fence

    def _submit(self, plan: CopyPlan, seq: int,
                nbytes: int) -> tuple[list[Completion], DmaError | None, list[list[tuple[int, Any, Any]]]]:
        """Queue each channel's share; consult the fault points (caller holds the lock).

        Returns the completions (one per share), the submission's own error, and per share the destination
        runs ``(node base pfn, dst_start, npages)``, so a failure can be traced to the pages it hit.
        """
        # One share per (device, channel): each segment goes to its device's channel of the planned number.
        per_share: dict[tuple[int, int], tuple[Any, list[ChannelWork], list[tuple[int, Any, Any]]]] = {}
        nodes, staged = self.nodes, self._staged
        for seg in plan.segments():
            s, d = nodes[seg.src_node], nodes[seg.dst_node]
            dst_start, npages = plan.dst_start[seg.runs], plan.npages[seg.runs]
            w = ChannelWork(s.frames, d.frames, s.kind, d.kind, s.device, d.device, seg.method,
                            plan.src_start[seg.runs], dst_start, npages, staged[seg.src_node][seg.dst_node])
            dev = w.exec_device if self._per_device else 0
            share = per_share.get((dev, seg.channel))
            if share is None:
                share = per_share[(dev, seg.channel)] = (self._open_lane(dev)[seg.channel], [], [])
            share[1].append(w)
            share[2].append((d.base_pfn, dst_start, npages))
        shares = [(ch, work) for ch, work, _runs in per_share.values()]
        share_runs = [runs for _ch, _work, runs in per_share.values()]
        faults = self.faults
        # dma_submit is decided once per submission (so inject_errors(n) fails n submissions); the refused
        # share is the first one, the others still run, as when one channel's descriptor ring rejects its part.
        refused = faults.armed and faults.should_fail("dma_submit", nbytes)
        error = None
        if refused:
            error = DmaError(f"DMA submission #{seq} failed (injected dma_submit fault): channel "
                             f"{shares[0][0].index} refused its share; destination contents are unspecified, "
                             f"sources are intact")
        out: list[Completion] = []
        for i, (ch, work) in enumerate(shares):
            if refused and i == 0:
                out.append(FailedCompletion(error))
                continue
            fault = share_fault(faults, work, self.page_size) if faults.armed else None
            out.append(self._queue(ch, work, fault, seq))
        return out, error, share_runs

    def _queue(self, ch: Any, work: list[ChannelWork], fault: str | None, seq: int) -> Completion:
        if fault is None:
            return ch.submit(work)
        if getattr(ch, "injects_faults", False):
            return ch.submit(work, fault=fault)
        return emulate_fault(ch, work, fault, seq)

    # -- checksums -----------------------------------------------------------------------------------------
    def checksum(self, pfns: Any) -> np.ndarray:
        """Per-page checksums of ``pfns`` (uint64; :func:`dmamig.dma.checksum.page_checksums`).

        Runs the backend's checksum (the ``page_checksum`` kernel on CUDA, the numpy reference on CPU)
        synchronously. Pending copies are not waited for: wait on their fences first.
        """
        if self._closed:
            raise DmaError("the DMA engine is closed; checksums need an open engine (create a new Machine)")
        p = pfn_array("pfns", pfns, self._nr_pfns)
        out = np.empty(p.size, dtype=np.uint64)
        if p.size == 0:
            return out
        nid, idx = self._locate(p)
        for node_id in np.unique(nid).tolist():
            sel = np.flatnonzero(nid == node_id)
            out[sel] = self.backend.checksum_frames(self.nodes[node_id].frames, idx[sel])
        return out

    # -- life cycle ----------------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until everything submitted so far has stopped (errors are left to the fences' ``wait``).

        Never hangs on a dead channel: its completions fail (see :class:`Fence`).
        """
        with self._lock:
            pending, self._pending = self._pending, []
            in_flight, self._in_flight = self._in_flight, {}
        completions = [ch.completion(seq) for lane, jobs in in_flight.values()
                       for ch, (seq, _) in zip(lane, jobs) if seq >= 0]
        for fence in pending:
            for c in fence.completions:
                c.wait(None)
        for c in completions:
            c.wait(None)

    def close(self) -> None:
        """Let submitted work finish (or fail, on a dead channel), then stop the channels.

        Idempotent; ``copy`` raises :class:`~dmamig.errors.DmaError` afterwards. A channel whose worker does
        not stop in time is reported with a DmaError naming it, after the other channels were stopped.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.synchronize()
        errors = []
        for ch in self._channels:
            try:
                ch.close()
            except DmaError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> DmaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DmaEngine(backend={getattr(self.backend, 'name', '?')!r}, channels={self.channels}, "
                f"closed={self._closed})")


class RingBatches:
    """The rings of one node pair, for a caller that publishes its submissions from its own compiled call (the
    migration core's fused batch: a move pass, an unmap pass and the submission of its pages, in one call).

    One caller's, with one submission in flight at a time (each migration asks :meth:`DmaEngine.ring_batches` for
    its own): :meth:`hold` takes the engine's lock and the rings' (in that order, after any lock of the
    caller's), draws the submission's write sequence number (:attr:`seq`) and gives the route's table, what
    :func:`~dmamig.dma.ring.submit_table` takes besides the pfns, ``checked`` and :attr:`seq`
    (:meth:`~dmamig.dma.ring.RingRoute.table`'s words); the caller submits with it, calls
    :meth:`published` if the submission published (a non-negative return), then :meth:`release` in any case,
    and :meth:`wait` outside its locks. The engine counts the submission as it counts :meth:`DmaEngine.copy`'s,
    and :meth:`DmaEngine.synchronize` waits for it. :meth:`close` gives the rings back when the caller is done: the
    next caller between the same nodes gets them.
    """

    __slots__ = ("_asleep", "_engine", "_jobs", "_key", "_lane", "_pages", "_route", "seq")

    def __init__(self, engine: DmaEngine, route: RingRoute, lane: list[Any], pages: int,
                 key: tuple[int, int]) -> None:
        self._engine = engine
        self._route = route
        self._lane = lane
        self._pages = pages
        self._key = key  # the node pair
        self._asleep: list[Any] = []
        self._jobs: list[list[int]] | None = None  # the submission in flight: [seq, asleep] per channel
        #: The write sequence number :meth:`hold` drew for the submission.
        self.seq = 0

    def hold(self) -> np.ndarray | None:
        """Take the locks; the route's table for the compiled submission (:attr:`seq` drawn here). ``None``
        (nothing held) while fault points are armed: the general path must take the copy.

        Raises
        ------
        DmaError
            The engine is closed (nothing held).
        """
        eng = self._engine
        eng._lock.acquire()
        if eng._closed or eng.faults.armed:
            eng._lock.release()
            if eng._closed:
                raise DmaError("the DMA engine is closed; create a new Machine (or engine) to copy")
            return None
        rs = self._route.ring_set
        rs.lock.acquire()
        self.seq = eng._next_write_seq()
        return self._route.table(self._pages, eng._write_seq).words

    def published(self, pages: int, runs: int) -> None:
        """Count what the submission just made under :meth:`hold` published (``pages`` pages in ``runs`` runs,
        the return of :func:`~dmamig.dma.ring.submit_pages`)."""
        self._jobs = jobs = self._route.jobs_published()
        eng = self._engine
        eng._count_submission(pages, runs)
        eng._in_flight[self] = (self._lane, jobs)
        for ch, (_seq, asleep) in zip(self._lane, jobs):
            if asleep:  # a channel without a job reports its consumer awake
                self._asleep.append(ch)

    def release(self) -> None:
        """Give the locks back, then wake the consumers the submission found asleep."""
        self._route.ring_set.lock.release()
        self._engine._lock.release()
        if self._asleep:
            asleep, self._asleep = self._asleep, []
            for ch in asleep:
                ch.wake()

    def close(self) -> None:
        """Give these rings back to the engine, for the next caller between the same nodes (with nothing in
        flight; else, or once a few wait there already, they are left to go)."""
        if self._jobs is None:
            idle = self._engine._idle_batches.setdefault(self._key, [])
            if len(idle) < _IDLE_BATCHES:
                idle.append(self)

    def wait(self) -> None:
        """Wait for the submission in flight to finish (never on a dead channel: its jobs fail).

        Raises
        ------
        DmaError
            A channel did not copy its share (its status, or its channel's failure); which pages it hit is not
            told: treat every page of the submission as not copied.
        """
        jobs = self._jobs
        if jobs is None:
            return
        error = None
        for ch, (seq, _) in zip(self._lane, jobs):
            if seq >= 0:
                c = ch.completion(seq)
                c.wait(None)
                if c.error is not None and error is None:
                    error = c.error
        self._jobs = None
        with self._engine._lock:
            self._engine._in_flight.pop(self, None)
        if error is not None:
            self._engine._count_error()
            raise DmaError(f"DMA submission of a batch failed on a channel: {type(error).__name__}: {error}") \
                from error
