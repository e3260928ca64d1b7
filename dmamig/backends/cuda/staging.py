"""Staged copies between two GPUs without peer access, through pinned host memory: a channel's work and the
migrating thread's copy.

A channel's staged work runs in chunks of :data:`~dmamig.dma.staging.STAGE_BYTES` through the channel's pinned
bounce buffer of two slots: hop 1 (device to host) on the channel's stream of the source device, hop 2 (host
to device) on its stream of the destination device, after an event recorded behind hop 1. Before a slot is
filled again, the source stream waits for the event recorded behind that slot's last hop 2, so chunk k + 1
comes in while chunk k goes out. Scattered pages go through the gather kernel on each side (the kernels read
and write the mapped pinned buffer directly), long runs as one ``cudaMemcpyAsync`` per piece. The migrating
thread's copy (:func:`stage_folios`) takes a bounce buffer from the backend's pool and waits for each hop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...dma.channel import ChannelWork, route_counts
from ...dma.copy_plan import METHOD_GATHER
from ...dma.staging import stage_capacity, stage_chunks
from .codes import _EVENT_DISABLE_TIMING, _MEMCPY_DEFAULT, collect_first_error
from .memory import _ptr, alloc_pinned

if TYPE_CHECKING:
    from .backend import CudaBackend
    from .channels import CudaChannel

__all__ = ["ChannelStaging", "stage_folios", "staging_pool"]


# -- staged channel work --------------------------------------------------------------------------------------------

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
                ev = self._events[(kind, device, slot)] = self._rt.eventCreateWithFlags(_EVENT_DISABLE_TIMING)
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
        sp, dp = _ptr(w.src_frames), _ptr(w.dst_frames)
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
            self._rt.memcpyAsync(dst_ptr + b * page, src_ptr + a * page, n * page, _MEMCPY_DEFAULT, s.ptr)
        ch._count("memcpy_calls", int(npages.size))

    def close(self) -> None:
        """Free the events and the buffer (the channel's streams have finished). Never raises."""
        rt = self._rt
        events, self._events = list(self._events.values()), {}
        collect_first_error([lambda e=e: rt.eventDestroy(e) for e in events] + [lambda: rt.freeHost(self.ptr)])


# -- the migrating thread's staged copy -----------------------------------------------------------------------------

class _PinnedPool:
    """Pinned bounce buffers for the migrating threads' staged copies: one per thread copying at a time."""

    def __init__(self, rt: Any, nbytes: int):
        self._rt, self.nbytes = rt, int(nbytes)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._all: list[int] = []

    def take(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
        ptr = alloc_pinned(self._rt, self.nbytes)
        with self._lock:
            self._all.append(ptr)
        return ptr

    def give(self, ptr: int) -> None:
        with self._lock:
            self._free.append(ptr)

    def close(self) -> None:
        with self._lock:
            ptrs, self._all, self._free = self._all, [], []
        collect_first_error([lambda p=p: self._rt.freeHost(p) for p in ptrs])


def staging_pool(backend: CudaBackend, nbytes: int) -> _PinnedPool:
    """The backend's pool of pinned bounce buffers of ``nbytes`` for staged folio copies (made on first use)."""
    with backend._lock:
        pool = backend._pinned_pool
        if pool is None or pool.nbytes != nbytes:
            if pool is not None:  # another page size: its buffers are freed when the backend closes
                backend._retired_pools.append(pool)
            pool = backend._pinned_pool = _PinnedPool(backend._rt, nbytes)
        return pool


def _copies(rt: Any, page: int, from_ptr: int, a: np.ndarray, to_ptr: int, b: np.ndarray,
             n: np.ndarray) -> Callable[[Any], None]:
    """An operation for ``_device_op``: one ``cudaMemcpyAsync`` per run on the stream it is given."""
    def op(s: Any) -> None:
        for x, y, c in zip(a.tolist(), b.tolist(), n.tolist()):
            rt.memcpyAsync(to_ptr + y * page, from_ptr + x * page, c * page, _MEMCPY_DEFAULT, s.ptr)
    return op


def stage_folios(backend: CudaBackend, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                 nr_pages: np.ndarray) -> None:
    """The migrating thread's copy between two GPUs without peer access: per chunk, one ``cudaMemcpyAsync`` per
    folio piece into a pinned bounce buffer on the source device's stream, a wait, then out of it on the
    destination's. The buffer goes back to the pool only after a copy that finished: after a failure, copies
    already queued may still use it."""
    page = int(src.shape[1])
    cap = stage_capacity(page)
    pool = staging_pool(backend, cap * page)
    buf = pool.take()
    rt = backend._rt
    sp, dp = _ptr(src), _ptr(dst)
    pieces = stage_chunks(src_idx, dst_idx, nr_pages, cap)
    for k in range(pieces.nr_chunks):
        s0, d0, n, b0 = pieces.chunk(k)
        # A hop that fails may leave copies it queued still reading or writing ``buf``: the buffer is then kept
        # out of the pool (the backend frees it when it closes) rather than handed to the next staged copy.
        backend._device_op(src.device, "staging folios into host memory", _copies(rt, page, sp, s0, buf, b0, n))
        backend._device_op(dst.device, "staging folios out of host memory", _copies(rt, page, buf, b0, dp, d0, n))
    pool.give(buf)
