"""DMA channels on CUDA streams: one non-blocking stream per device, the per-page descriptors of gather runs
and their upload, and per run the plan's method.

Each channel owns one non-blocking stream per device (so it never serialises with the legacy default stream).
Per run the plan's method picks ``cudaMemcpyAsync`` (``cudaMemcpyPeerAsync`` between devices), the batched
``page_gather_copy`` kernel from ``kernels/page_copy.cu``, or ``cuMemcpyBatchAsync`` when it was switched on;
staged work (two GPUs without peer access) goes through the channel's pinned bounce buffer
(:class:`ChannelStaging`, below). Completions are CUDA events recorded after the work
(:mod:`dmamig.backends.cuda.events`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...dma.channel import CHANNEL_COUNTERS, ChannelWork, route_counts
from ...dma.copy_plan import METHOD_BATCH, METHOD_GATHER
from ...dma.staging import stage_capacity, stage_chunks
from ...errors import DmaError
from .codes import (
    EVENT_BLOCKING_SYNC,
    EVENT_DISABLE_TIMING,
    MEMCPY_DEFAULT,
    MEMCPY_HOST_TO_DEVICE,
    collect_first_error,
    map_cuda_error,
)
from .events import TIMING_RING, CudaCompletion, PendingRing
from .kernels import launch
from .memory import alloc_pinned, device_of, frames_ptr

if TYPE_CHECKING:
    from .backend import CudaBackend
    from .persistent_lane import PersistentRingLane
    from .ring_lane import CudaRingLane

__all__ = ["CudaChannel"]


def _nvtx(cp: Any) -> Any:
    return getattr(cp.cuda, "nvtx", None)


class CudaChannel:
    """One DMA channel: a non-blocking stream per device, with per-method copy issue.

    The engine gives each device its own channels; a channel's work runs on its stream of the device that
    drives the copy, and a staged copy (two GPUs without peer access) on its streams of both devices through
    its pinned bounce buffer (:class:`ChannelStaging`, below).

    Parameters
    ----------
    index : int
        Channel number within its device.
    backend : CudaBackend
        The backend owning the kernels and peer-access table.
    device : int
        The device whose channel this is.
    """

    def __init__(self, index: int, backend: CudaBackend, device: int = 0,
                 lane: CudaRingLane | PersistentRingLane | None = None):
        #: Microseconds a waiter polls this channel's events before it sleeps in eventSynchronize.
        self.poll_us = float(backend.poll_us)
        self.index = int(index)
        self.device = int(device)
        self._backend = backend
        self._staging: Any = None  # ChannelStaging, made on the first staged copy
        self._retired_staging: list[Any] = []  # outgrown ones, freed at close (queued work may still use them)
        self._cp = backend.cp
        self._rt = backend.runtime
        self._streams: dict[int, Any] = {}
        self._scratch: dict[int, tuple[int, int]] = {}  # device -> (descriptor buffer, bytes)
        self._retired: list[tuple[int, int]] = []  # outgrown descriptor buffers, freed at close
        self._lock = threading.Lock()  # counters, busy time, the timing ring
        self._submit_lock = threading.Lock()  # one submission at a time owns the descriptor buffers
        self._counters = dict.fromkeys(CHANNEL_COUNTERS, 0)
        self._busy = 0.0
        self._ring = PendingRing(TIMING_RING)
        self._closed = False
        # The device's ring lane (one kernel launch per submission, or a persistent consumer), shared with the other
        # channels of the lane.
        self._lane = lane

    def stream(self, device: int) -> Any:
        """This channel's stream on ``device`` (created on first use, non-blocking)."""
        with self._lock:  # copy() may be called from several threads
            s = self._streams.get(device)
            if s is None:
                with self._cp.cuda.Device(device):
                    s = self._cp.cuda.Stream(non_blocking=True)
                self._streams[device] = s
            return s

    @property
    def busy_seconds(self) -> float:
        """GPU time spent on this channel's completed work (CUDA event timing; failed jobs do not count)."""
        with self._lock:
            ready = self._ring.pop_ready(lambda c: c._settled or c._poll())
        for c in ready:
            c._settle()
        with self._lock:
            return self._busy

    @property
    def runtime(self) -> Any:
        """``cupy.cuda.runtime`` of the backend this channel issues on."""
        return self._rt

    def add_busy(self, seconds: float) -> None:
        """Fold ``seconds`` of GPU time of a finished job into :attr:`busy_seconds`."""
        with self._lock:
            self._busy += seconds

    @property
    def counters(self) -> dict[str, int]:
        """``kernel_launches``, ``memcpy_calls`` and ``batch_calls`` issued so far (the ring lane's launches, one
        per submission for every channel, count on channel 0), and the device-to-device runs and bytes copied
        directly (``peer_*``) or through host memory (``staged_*``)."""
        with self._lock:
            out = dict(self._counters)
        if self._lane is not None and self.index == 0:  # one ring_copy launch serves every channel of the lane
            out["kernel_launches"] += self._lane.launches
        return out

    # -- the ring lane (see ring_lane.py) ------------------------------------------------------------------------
    @property
    def ring_set(self) -> Any:
        """The lane's :class:`~dmamig.dma.ring.RingSet`, or ``None`` where the ring kernel is not available."""
        return self._lane.rings if self._lane is not None else None

    @property
    def ring_lane(self) -> CudaRingLane | PersistentRingLane | None:
        """The lane whose rings this channel shares (its consumer's counters and words), or ``None``."""
        return self._lane

    @property
    def takes_rows(self) -> bool:
        """Whether compiled submissions may publish on this channel's ring (the lane has not failed)."""
        return self._lane is not None and self._lane.failure is None

    def completion(self, seq: int) -> Any:
        """The completion of job ``seq``, published on this channel's ring by a compiled submission."""
        return self._lane.job(self.index, seq)

    def wake(self) -> None:
        """Nothing to wake: each submission launches its consumer."""

    def wait_for_progress(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the oldest unfinished job of this channel's ring finishes."""
        ring = self._lane.rings.rings[self.index]
        head = ring.head
        if head < ring.tail:
            self._lane.job(self.index, head).wait(timeout)

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self._counters[key] += n

    def submit(self, work: list[ChannelWork]) -> CudaCompletion:
        """Issue ``work`` on this channel's streams and return its completion without waiting.

        Raises
        ------
        DmaError
            The channel is closed.
        """
        if self._closed:
            raise DmaError(f"DMA channel {self.index} is closed; open a new engine to copy")
        cp, rt = self._cp, self._rt
        ends: list[Any] = []
        starts: list[Any] = []
        error: BaseException | None = None
        by_device: dict[int, list[ChannelWork]] = {}
        staged: list[ChannelWork] = []
        for w in work:
            if w.staged:
                staged.append(w)
            else:
                by_device.setdefault(w.exec_device, []).append(w)
        timed: list[int] = []  # devices whose stream got a start event (each gets an end event below)

        def begin(dev: int) -> None:
            if dev not in timed:
                with cp.cuda.Device(dev):
                    start = rt.eventCreateWithFlags(0)
                    starts.append(start)
                    timed.append(dev)
                    rt.eventRecord(start, self.stream(dev).ptr)

        nvtx = _nvtx(cp)
        if nvtx is not None:
            nvtx.RangePush(f"dmamig dma channel {self.index}")
        try:
            with self._submit_lock:
                if self._closed:  # close() ran after the check above and freed the streams: make none anew
                    raise DmaError(f"DMA channel {self.index} was closed during the submission; nothing was queued")
                try:
                    for dev, items in by_device.items():
                        with cp.cuda.Device(dev):
                            s = self.stream(dev)
                            # Host-side descriptor work first, so the timed span covers the GPU's work only.
                            prepared = [(w, self._prepare(dev, w)) for w in items]
                            begin(dev)
                            for w, desc in prepared:
                                self._issue(dev, s, w, desc)
                    for w in staged:
                        ChannelStaging.of(self, w).issue(w, begin)
                finally:
                    # Recorded even after a failed issue, so a wait covers what did get queued.
                    for dev in timed:
                        with cp.cuda.Device(dev):
                            end = rt.eventCreateWithFlags(EVENT_BLOCKING_SYNC)
                            rt.eventRecord(end, self.stream(dev).ptr)
                            ends.append(end)
        except Exception as exc:
            error = map_cuda_error(exc, f"DMA channel {self.index}: issuing copies")
            if error is not exc:
                error.__cause__ = exc
        finally:
            if nvtx is not None:
                nvtx.RangePop()
        if len(starts) > len(ends):  # the end event could not be made: drop the unmatched start event
            for ev in starts[len(ends):]:
                try:
                    rt.eventDestroy(ev)
                except Exception:
                    pass
            del starts[len(ends):]
        completion = CudaCompletion(self, ends, starts, error)
        with self._lock:
            over = self._ring.push(completion)
            if self._closed:  # close() may have drained the ring before this push: settle the job here
                over.append(completion)
        for old in over:  # keep the number of live timing events bounded: settle the oldest job now
            old.wait(None)
        return completion

    def _prepare(self, dev: int, w: ChannelWork) -> np.ndarray | None:
        """Per-page descriptors (2, n) of a gather run set, or ``None`` when it goes another way."""
        if w.method != METHOD_GATHER or not self._backend.kernel_can_reach(dev, w):
            return None
        if self._backend.kernel(dev, "page_copy.cu", "page_gather_copy") is None:
            return None  # no kernel (NVRTC missing): the runs go as memcpy calls
        page = int(w.src_frames.shape[1])
        n = w.npages
        total = int(n.sum())
        # Expand runs into per-page byte addresses (vectorized): page k of run r is start[r] + k.
        off = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        desc = np.empty((2, total), dtype=np.uint64)
        desc[0] = frames_ptr(w.src_frames) + (np.repeat(w.src_start, n) + off) * page
        desc[1] = frames_ptr(w.dst_frames) + (np.repeat(w.dst_start, n) + off) * page
        return desc

    def _issue(self, dev: int, s: Any, w: ChannelWork, desc: np.ndarray | None) -> None:
        b = self._backend
        page = int(w.src_frames.shape[1])
        for key, n in route_counts(w).items():
            self._count(key, n)
        if desc is not None:
            self._gather(dev, s, desc, page)
            return
        if w.method == METHOD_BATCH and b.batch_copier is not None:
            sp, dp = frames_ptr(w.src_frames), frames_ptr(w.dst_frames)
            try:
                b.batch_copier.copy((dp + w.dst_start * page).tolist(), (sp + w.src_start * page).tolist(),
                              (w.npages * page).tolist(), s.ptr)
                self._count("batch_calls", 1)
                return
            except Exception as exc:
                b.disable_batch_copy(exc)
        self._memcpy_runs(s, w, page)

    def _memcpy_runs(self, s: Any, w: ChannelWork, page: int) -> None:
        rt = self._rt
        sp, dp = frames_ptr(w.src_frames), frames_ptr(w.dst_frames)
        sdev, ddev = device_of(w.src_frames), device_of(w.dst_frames)
        # Between two devices cudaMemcpyPeerAsync is always valid: direct over the peer link when peer access
        # is enabled, staged through host memory by the driver when it is not.
        peer = sdev >= 0 and ddev >= 0 and sdev != ddev
        for s0, d0, n in zip(w.src_start.tolist(), w.dst_start.tolist(), w.npages.tolist()):
            if peer:
                rt.memcpyPeerAsync(dp + d0 * page, ddev, sp + s0 * page, sdev, n * page, s.ptr)
            else:
                rt.memcpyAsync(dp + d0 * page, sp + s0 * page, n * page, MEMCPY_DEFAULT, s.ptr)
        self._count("memcpy_calls", int(w.npages.size))

    def _descriptor_buffer(self, dev: int, nbytes: int) -> int:
        """This channel's descriptor buffer on ``dev`` of at least ``nbytes`` (grown by doubling).

        Reusing one buffer is safe: the upload of the next submission is queued on the same stream, after the
        kernel that read the previous descriptors. An outgrown buffer may still be read by a queued kernel, so
        it is only freed at close.
        """
        ptr, size = self._scratch.get(dev, (0, 0))
        if size >= nbytes:
            return ptr
        new_size = max(nbytes, 2 * size, 1 << 16)
        new = self._rt.malloc(new_size)
        if ptr:
            self._retired.append((dev, ptr))
        self._scratch[dev] = (new, new_size)
        return new

    def _gather(self, dev: int, s: Any, desc: np.ndarray, page: int) -> None:
        total = int(desc.shape[1])
        kernel = self._backend.kernel(dev, "page_copy.cu", "page_gather_copy")
        buf = self._descriptor_buffer(dev, desc.nbytes)
        # A pageable source: the call returns once the bytes are staged, so ``desc`` may go right after.
        self._rt.memcpyAsync(buf, int(desc.ctypes.data), desc.nbytes, MEMCPY_HOST_TO_DEVICE, s.ptr)
        launch(kernel, s, total,
               (np.uint64(buf), np.uint64(buf + 8 * total), np.uint64(total), np.uint64(page)))
        self._count("kernel_launches", 1)

    def close(self) -> None:
        """Wait for this channel's work, then release its streams, events and buffers. Idempotent.

        Never raises: after a sticky CUDA error every release is still attempted.
        """
        if self._closed:
            return
        self._closed = True
        with self._submit_lock:
            streams = list(self._streams.items())
            self._streams.clear()
            buffers = [(d, p) for d, (p, _) in self._scratch.items()] + self._retired
            self._scratch.clear()
            self._retired = []
            staging = self._retired_staging + ([self._staging] if self._staging is not None else [])
            self._staging, self._retired_staging = None, []
        # Drained once no submission is issuing (a later one refuses); one that pushes its completion after this
        # drain sees ``_closed`` and settles it itself, so no job's events are left behind.
        with self._lock:
            pending = self._ring.drain()
        for c in pending:
            c.wait(None)
        collect_first_error([lambda s=s: s.synchronize() for _, s in streams])
        if self._lane is not None:  # idempotent: the lane's first channel to close waits for its stream
            self._lane.close()
        collect_first_error([lambda d=d, p=p: self._backend.free_device(d, p) for d, p in buffers])
        for st in staging:  # after every stream finished: nothing reads the bounce buffers any more
            st.close()


# -- staged channel work: two GPUs without peer access ---------------------------------------------------------------
# A channel's staged work runs in chunks of STAGE_BYTES through the channel's pinned bounce buffer of two slots:
# hop 1 (device to host) on the channel's stream of the source device, hop 2 (host to device) on its stream of
# the destination device, after an event recorded behind hop 1. Before a slot is filled again, the source
# stream waits for the event recorded behind that slot's last hop 2, so chunk k + 1 comes in while chunk k goes
# out. Scattered pages go through the gather kernel on each side (the kernels read and write the mapped pinned
# buffer directly), long runs as one cudaMemcpyAsync per piece.

def _expand(start: np.ndarray, npages: np.ndarray) -> np.ndarray:
    """Every page of runs ``(start, npages)``, in order."""
    off = np.arange(int(npages.sum()), dtype=np.int64) - np.repeat(np.cumsum(npages) - npages, npages)
    return np.repeat(start, npages) + off


class ChannelStaging:
    """A channel's pinned bounce buffer (two slots) and the events that order its reuse.

    Owned by one :class:`~dmamig.backends.cuda.CudaChannel` and used under its submission lock.
    """

    def __init__(self, channel: CudaChannel, page: int):
        self._ch = channel
        self._rt = channel._rt
        self.page = int(page)
        self.capacity = stage_capacity(self.page)
        self.ptr = alloc_pinned(self._rt, 2 * self.capacity * self.page)
        self._events: dict[tuple[str, int, int], Any] = {}  # (kind, device, slot) -> reusable event
        self._slot_free: list[Any] = [None, None]  # the event behind each slot's last read, on whatever device

    @classmethod
    def of(cls, channel: CudaChannel, w: ChannelWork) -> ChannelStaging:
        """``channel``'s staging for pages of ``w``'s size, made on first use (under its submission lock)."""
        page = int(w.src_frames.shape[1])
        st = channel._staging
        if st is None or st.page != page:
            if st is not None:  # queued work may still read it: freed when the channel closes
                channel._retired_staging.append(st)
            st = channel._staging = cls(channel, page)
        return st

    def _event(self, kind: str, device: int, slot: int) -> Any:
        ev = self._events.get((kind, device, slot))
        if ev is None:
            with self._ch._cp.cuda.Device(device):
                ev = self._events[(kind, device, slot)] = self._rt.eventCreateWithFlags(EVENT_DISABLE_TIMING)
        return ev

    def issue(self, w: ChannelWork, timing: Callable[[int], None]) -> None:
        """Queue ``w`` (two devices without peer access) as hop 1 / hop 2 pairs per chunk.

        ``timing(device)`` is called before the first operation each stream gets, to record its start event.
        """
        ch = self._ch
        sdev, ddev = int(w.src_device), int(w.dst_device)
        src_s, dst_s = ch.stream(sdev), ch.stream(ddev)
        page = self.page
        pieces = stage_chunks(w.src_start, w.dst_start, w.npages, self.capacity)
        sp, dp = frames_ptr(w.src_frames), frames_ptr(w.dst_frames)
        gather = w.method == METHOD_GATHER and page % 16 == 0
        timing(sdev)
        try:
            self._issue_chunks(pieces, sdev, ddev, src_s, dst_s, sp, dp, gather, timing)
        except BaseException:
            # Part of a hop may be queued, and the slot events no longer say when the buffer is free: retire
            # it (freed when the channel closes, after its streams) so no later submission writes into it.
            if ch._staging is self:
                ch._staging = None
                ch._retired_staging.append(self)
            raise
        for key, v in route_counts(w).items():
            ch._count(key, v)

    def _issue_chunks(self, pieces: Any, sdev: int, ddev: int, src_s: Any, dst_s: Any, sp: int, dp: int,
                      gather: bool, timing: Callable[[int], None]) -> None:
        rt, cp = self._rt, self._ch._cp
        cap = self.capacity
        for k in range(pieces.nr_chunks):
            slot = k & 1
            s0, d0, n, b0 = pieces.chunk(k)
            b0 = b0 + slot * cap  # page index within the whole two-slot buffer
            with cp.cuda.Device(sdev):
                if self._slot_free[slot] is not None:
                    rt.streamWaitEvent(src_s.ptr, self._slot_free[slot], 0)  # its last hop 2 has read it
                self._hop(sdev, src_s, sp, s0, self.ptr, b0, n, gather)
                filled = self._event("filled", sdev, slot)
                rt.eventRecord(filled, src_s.ptr)
            with cp.cuda.Device(ddev):
                rt.streamWaitEvent(dst_s.ptr, filled, 0)
                if k == 0:
                    timing(ddev)  # the destination's span starts once the first chunk is in host memory
                self._hop(ddev, dst_s, self.ptr, b0, dp, d0, n, gather)
                free = self._slot_free[slot] = self._event("free", ddev, slot)
                rt.eventRecord(free, dst_s.ptr)

    def _hop(self, dev: int, s: Any, src_ptr: int, src_start: np.ndarray, dst_ptr: int, dst_start: np.ndarray,
             npages: np.ndarray, gather: bool) -> None:
        ch, page = self._ch, self.page
        if gather and ch._backend.kernel(dev, "page_copy.cu", "page_gather_copy") is not None:
            desc = np.empty((2, int(npages.sum())), dtype=np.uint64)
            desc[0] = src_ptr + _expand(src_start, npages) * page
            desc[1] = dst_ptr + _expand(dst_start, npages) * page
            ch._gather(dev, s, desc, page)
            return
        for a, b, n in zip(src_start.tolist(), dst_start.tolist(), npages.tolist()):
            self._rt.memcpyAsync(dst_ptr + b * page, src_ptr + a * page, n * page, MEMCPY_DEFAULT, s.ptr)
        ch._count("memcpy_calls", int(npages.size))

    def close(self) -> None:
        """Free the events and the buffer (the channel's streams have finished). Never raises."""
        rt = self._rt
        events, self._events = list(self._events.values()), {}
        collect_first_error([lambda e=e: rt.eventDestroy(e) for e in events] + [lambda: rt.freeHost(self.ptr)])


