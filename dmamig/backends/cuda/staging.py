"""The CUDA backend between devices: the topology read from the runtime, staged copies through pinned host
memory where two GPUs have no peer access, and per-pair copy ceilings.

Topology. Peer access is what ``cudaDeviceCanAccessPeer`` allows and the backend enabled. The link class comes
from ``cudaDeviceGetP2PAttribute``: native atomics over the link (``cudaDevP2PAttrNativeAtomicSupported``) mean
NVLink; peer access without them is PCIe under a switch; no peer access is PCIe through the host (the copy goes
through host memory whatever the wiring). CuPy does not bind that call, so it is asked of
``cupy.cuda.runtime.deviceGetP2PAttribute`` where a build offers it, else of the driver library
(``cuDeviceGetP2PAttribute`` in ``libcuda.so.1``, through ctypes); without either the class follows peer access
alone and the topology's name says so.

Staging. A channel's staged work runs in chunks of :data:`~dmamig.dma.staging.STAGE_BYTES` through the
channel's pinned bounce buffer of two slots: hop 1 (device to host) on the channel's stream of the source
device, hop 2 (host to device) on its stream of the destination device, after an event recorded behind hop 1.
Before a slot is filled again, the source stream waits for the event recorded behind that slot's last hop 2, so
chunk k + 1 comes in while chunk k goes out. Scattered pages go through the gather kernel on each side (the
kernels read and write the mapped pinned buffer directly), long runs as one ``cudaMemcpyAsync`` per piece.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...dma.plan import METHOD_GATHER
from ...dma.staging import STAGE_BYTES, stage_capacity, stage_chunks
from ...topology import LINK_NVLINK, LINK_PCIE_HOST, LINK_PCIE_SWITCH, Topology
from ..base import ChannelWork, route_counts
from .backend import (
    _EVENT_BLOCKING_SYNC,
    _EVENT_DISABLE_TIMING,
    _HOST_ALLOC_MAPPED,
    _HOST_ALLOC_PORTABLE,
    _MEMCPY_DEFAULT,
    _ptr,
    collect_first_error,
    map_cuda_error,
)

if TYPE_CHECKING:
    from .backend import CudaBackend, CudaChannel

__all__ = ["P2P_ACCESS_SUPPORTED", "P2P_NATIVE_ATOMIC_SUPPORTED", "P2P_PERFORMANCE_RANK", "ChannelStaging",
           "cuda_pair_ceiling", "link_class", "p2p_attribute_reader", "read_runtime_topology", "stage_folios",
           "staging_pool"]

# cudaDeviceP2PAttr (and CUdevice_P2PAttribute: the same numbers).
P2P_PERFORMANCE_RANK = 1
P2P_ACCESS_SUPPORTED = 2
P2P_NATIVE_ATOMIC_SUPPORTED = 3


# -- topology ---------------------------------------------------------------------------------------------------

def _libcuda() -> Any:
    """The driver library through ctypes, initialised, or ``None`` where it cannot be loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return None
        return lib
    except (OSError, AttributeError):
        return None


def p2p_attribute_reader(rt: Any) -> tuple[Callable[[int, int, int], int] | None, str]:
    """A function ``(attribute, src_device, dst_device) -> int`` reading ``cudaDeviceGetP2PAttribute``, and where
    it comes from; ``(None, why)`` when nothing here can ask."""
    fn = getattr(rt, "deviceGetP2PAttribute", None)
    if fn is not None:
        return (lambda attr, a, b: int(fn(attr, a, b))), "cupy.cuda.runtime.deviceGetP2PAttribute"
    lib = _libcuda()
    if lib is None or not hasattr(lib, "cuDeviceGetP2PAttribute"):
        return None, "no P2P attribute query (cupy does not bind it and libcuda.so.1 is not loadable)"

    def read(attr: int, a: int, b: int) -> int:
        da, db, value = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        # Driver device handles of the runtime's ordinals (both honour CUDA_VISIBLE_DEVICES).
        for ordinal, handle in ((a, da), (b, db)):
            if lib.cuDeviceGet(ctypes.byref(handle), ordinal) != 0:
                raise OSError(f"cuDeviceGet({ordinal}) failed")
        code = lib.cuDeviceGetP2PAttribute(ctypes.byref(value), attr, da, db)
        if code != 0:
            raise OSError(f"cuDeviceGetP2PAttribute({attr}, {a}, {b}) returned CUresult {code}")
        return int(value.value)

    return read, "libcuda.so.1 cuDeviceGetP2PAttribute"


def link_class(peer: bool, native_atomics: bool) -> str:
    """The link class the runtime's answers imply: native atomics over the link are NVLink; peer access without
    them is PCIe under a switch; no peer access is PCIe through the host (where the copy goes anyway)."""
    if peer and native_atomics:
        return LINK_NVLINK
    return LINK_PCIE_SWITCH if peer else LINK_PCIE_HOST


def read_runtime_topology(rt: Any, ndev: int, peers: set[tuple[int, int]],
                          reader: Callable[[int, int, int], int] | None = None, how: str = "") -> Topology:
    """The topology of ``ndev`` visible GPUs: peer access as enabled (``peers``), links from the P2P attributes.

    Parameters
    ----------
    rt : module
        ``cupy.cuda.runtime`` (or a stand-in).
    ndev : int
        Visible devices.
    peers : set of (int, int)
        Ordered pairs whose peer access the backend enabled.
    reader, how : optional
        An attribute reader and its origin (default: :func:`p2p_attribute_reader`).
    """
    if reader is None and not how:
        reader, how = p2p_attribute_reader(rt)
    links = [[""] * ndev for _ in range(ndev)]
    peer = [[a == b or (a, b) in peers for b in range(ndev)] for a in range(ndev)]
    rank: list[list[int]] | None = [[0] * ndev for _ in range(ndev)] if reader is not None else None
    atomics = [[a == b for b in range(ndev)] for a in range(ndev)]
    failed = None
    for a in range(ndev):
        for b in range(ndev):
            if a == b:
                continue
            if reader is not None and failed is None:
                try:
                    atomics[a][b] = bool(reader(P2P_NATIVE_ATOMIC_SUPPORTED, a, b))
                    rank[a][b] = max(0, reader(P2P_PERFORMANCE_RANK, a, b))
                except Exception as exc:  # an old driver or a refused query: fall back on peer access alone
                    failed = f"{type(exc).__name__}: {exc}"
            links[a][b] = link_class(peer[a][b], atomics[a][b])
    name = "cuda-runtime"
    if ndev > 1 and (reader is None or failed is not None):
        rank = None  # the class defaults say as much as is known
        atomics = [[a == b for b in range(ndev)] for a in range(ndev)]
        links = [["" if a == b else link_class(peer[a][b], False) for b in range(ndev)] for a in range(ndev)]
        name = f"cuda-runtime (links from peer access only: {failed or how})"
    return Topology(links, peer, rank=rank, native_atomics=atomics, name=name, source="runtime")


# -- staged channel work --------------------------------------------------------------------------------------------

def _alloc_pinned(rt: Any, nbytes: int) -> int:
    flags = getattr(rt, "hostAllocPortable", _HOST_ALLOC_PORTABLE) | getattr(rt, "hostAllocMapped", _HOST_ALLOC_MAPPED)
    return int(rt.hostAlloc(nbytes, flags))


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
        self.ptr = _alloc_pinned(self._rt, 2 * self.capacity * self.page)
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
        ch, rt, cp = self._ch, self._rt, self._ch._cp
        sdev, ddev = int(w.src_device), int(w.dst_device)
        src_s, dst_s = ch.stream(sdev), ch.stream(ddev)
        page, cap = self.page, self.capacity
        pieces = stage_chunks(w.src_start, w.dst_start, w.npages, cap)
        sp, dp = _ptr(w.src_frames), _ptr(w.dst_frames)
        gather = w.method == METHOD_GATHER and page % 16 == 0
        timing(sdev)
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
        for key, v in route_counts(w).items():
            ch._count(key, v)

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
        ptr = _alloc_pinned(self._rt, self.nbytes)
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
    destination's."""
    page = int(src.shape[1])
    cap = stage_capacity(page)
    pool = staging_pool(backend, cap * page)
    buf = pool.take()
    rt = backend._rt
    sp, dp = _ptr(src), _ptr(dst)
    try:
        pieces = stage_chunks(src_idx, dst_idx, nr_pages, cap)
        for k in range(pieces.nr_chunks):
            s0, d0, n, b0 = pieces.chunk(k)
            backend._device_op(src.device, "staging folios into host memory", _copies(rt, page, sp, s0, buf, b0, n))
            backend._device_op(dst.device, "staging folios out of host memory", _copies(rt, page, buf, b0, dp, d0, n))
    finally:
        pool.give(buf)


# -- ceilings ---------------------------------------------------------------------------------------------------------

def cuda_pair_ceiling(backend: CudaBackend, src_dev: int, dst_dev: int, nbytes: int, repeat: int,
                      staged: bool) -> float:
    """Best seconds of a contiguous copy of ``nbytes`` from ``src_dev`` to ``dst_dev`` (-1: pinned host), timed
    with CUDA events: one ``cudaMemcpyPeerAsync`` / ``cudaMemcpyAsync``, or, ``staged``, the two-hop chunked
    copy the channels make (both events on the destination's stream; the source's waits for the start)."""
    cp, rt = backend._cp, backend._rt
    frees: list[Callable[[], Any]] = []
    events: list[tuple[int, Any]] = []

    def buffer(dev: int) -> int:
        if dev < 0:
            p = _alloc_pinned(rt, nbytes)
            frees.append(lambda: rt.freeHost(p))
            return p
        with cp.cuda.Device(dev):
            p = rt.malloc(nbytes)
        frees.append(lambda: backend._free_device(dev, p))
        return p

    def event(dev: int, flags: int) -> Any:
        with cp.cuda.Device(dev):
            ev = rt.eventCreateWithFlags(flags)
        events.append((dev, ev))
        return ev

    timer = dst_dev if dst_dev >= 0 else max(src_dev, 0)
    try:
        src, dst = buffer(src_dev), buffer(dst_dev)
        with cp.cuda.Device(timer):
            stream = cp.cuda.Stream(non_blocking=True)
        start, end = event(timer, 0), event(timer, _EVENT_BLOCKING_SYNC)
        if staged:
            step = min(nbytes, STAGE_BYTES)
            bounce = _alloc_pinned(rt, 2 * step)
            frees.append(lambda: rt.freeHost(bounce))
            with cp.cuda.Device(src_dev):
                src_stream = cp.cuda.Stream(non_blocking=True)
            filled = [event(src_dev, _EVENT_DISABLE_TIMING) for _ in range(2)]
            free = [event(timer, _EVENT_DISABLE_TIMING) for _ in range(2)]
        best = float("inf")
        for i in range(repeat + 1):
            with cp.cuda.Device(timer):
                rt.eventRecord(start, stream.ptr)
                if not staged and src_dev >= 0 and dst_dev >= 0 and src_dev != dst_dev:
                    rt.memcpyPeerAsync(dst, dst_dev, src, src_dev, nbytes, stream.ptr)
                elif not staged:
                    rt.memcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream.ptr)
            if staged:
                with cp.cuda.Device(src_dev):
                    rt.streamWaitEvent(src_stream.ptr, start, 0)
                for k, a in enumerate(range(0, nbytes, step)):
                    n, slot = min(step, nbytes - a), k & 1
                    with cp.cuda.Device(src_dev):
                        if k >= 2:  # the slot's previous chunk has left host memory
                            rt.streamWaitEvent(src_stream.ptr, free[slot], 0)
                        rt.memcpyAsync(bounce + slot * step, src + a, n, _MEMCPY_DEFAULT, src_stream.ptr)
                        rt.eventRecord(filled[slot], src_stream.ptr)
                    with cp.cuda.Device(timer):
                        rt.streamWaitEvent(stream.ptr, filled[slot], 0)
                        rt.memcpyAsync(dst + a, bounce + slot * step, n, _MEMCPY_DEFAULT, stream.ptr)
                        rt.eventRecord(free[slot], stream.ptr)
            with cp.cuda.Device(timer):
                rt.eventRecord(end, stream.ptr)
            rt.eventSynchronize(end)
            if i:  # the first copy is the warm-up
                best = min(best, rt.eventElapsedTime(start, end) / 1e3)
        stream.synchronize()
        if staged:
            src_stream.synchronize()
    except Exception as exc:
        raise map_cuda_error(exc, f"measuring the device {src_dev} -> {dst_dev} copy ceiling") from exc
    finally:
        collect_first_error([lambda e=e: rt.eventDestroy(e) for _d, e in events] + frees)
    return best
