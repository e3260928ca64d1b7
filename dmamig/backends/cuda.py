"""The CUDA backend (CuPy): pinned host frames, device frames, stream channels and RawModule kernels.

``cupy`` is imported here only, and only when a backend object is made or a kernel is built, so importing this
module (and :mod:`dmamig`) works on machines without cupy or without a GPU.

Memory: host RAM frames are pinned (``cudaHostAlloc``, portable and mapped): copies from them are truly
asynchronous and, under unified virtual addressing, the host pointer is also a device pointer, so the
gather/scatter kernel reads and writes host pages directly. Device frames are cupy arrays on their device.

Channels: each DMA channel owns one non-blocking stream per device (so it never serialises with the legacy
default stream). Per run the plan's method picks ``cudaMemcpyAsync`` (``cudaMemcpyPeerAsync`` between devices
with peer access), the batched ``page_gather_copy`` kernel from ``kernels/page_copy.cu``, or
``cuMemcpyBatchAsync`` where the CUDA Python driver bindings offer it. Completions are CUDA events recorded
after the work; waiting blocks on the event (blocking-sync events yield the CPU) or polls with a sleeping
back-off when a timeout is given.
"""

from __future__ import annotations

import importlib.resources
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..dma.checksum import page_checksums
from ..dma.plan import METHOD_BATCH, METHOD_GATHER
from ..errors import BackendUnavailable, InvalidArgument
from . import cpu_kernels
from .base import ChannelWork, DeviceInfo

__all__ = ["KERNEL_FILES", "CudaBackend", "CudaChannel", "kernel_build_status", "kernel_source"]

#: The CUDA sources shipped in ``dmamig.kernels`` and the ``extern "C"`` kernels each must provide.
KERNEL_FILES: dict[str, tuple[str, ...]] = {
    "page_copy.cu": ("page_gather_copy",),
    "page_checksum.cu": ("page_checksum",),
}
#: Threads per block of both kernels (a multiple of 32, as the checksum's warp reduction requires).
BLOCK_THREADS = 256
#: Upper bound on the grid; both kernels stride over pages, so larger submissions still work.
MAX_GRID = 1 << 16

# cudaHostAllocPortable | cudaHostAllocMapped: pinned for every device, and device-addressable.
_HOST_ALLOC_PORTABLE = 1
_HOST_ALLOC_MAPPED = 2
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the driver infers the direction from the pointers (UVA)


def _cupy() -> Any:
    try:
        import cupy
    except Exception as exc:
        raise BackendUnavailable(f"the CUDA backend needs cupy, which failed to import: {exc}; install "
                                 f"dmamig[cuda12] or dmamig[cuda13]") from exc
    return cupy


def kernel_source(name: str) -> str:
    """Text of a CUDA source file shipped in ``dmamig.kernels`` (works from a wheel or a source tree)."""
    try:
        return importlib.resources.files("dmamig.kernels").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Running from a source checkout on sys.path (not installed): kernels/ sits beside the package.
        return (Path(__file__).resolve().parents[2] / "kernels" / name).read_text(encoding="utf-8")


def kernel_build_status() -> dict[str, str]:
    """Build every kernel now and report, per ``.cu`` file, ``"compiled OK"``, ``"error: ..."`` or ``"no GPU
    (...)"`` (for ``dmamig info``)."""
    from . import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    status: dict[str, str] = {}
    for fname, funcs in KERNEL_FILES.items():
        try:
            code = kernel_source(fname)
        except Exception as exc:
            status[fname] = f"error: cannot read the source: {exc}"
            continue
        if reason is not None:
            status[fname] = f"no GPU ({reason})"
            continue
        try:
            cp = _cupy()
            module = cp.RawModule(code=code)
            for func in funcs:
                module.get_function(func)
            status[fname] = "compiled OK"
        except Exception as exc:
            status[fname] = f"error: {type(exc).__name__}: {exc}"
    return status


def _ptr(frames: Any) -> int:
    """Base address of a frame buffer: numpy (pinned host) or cupy (device)."""
    if isinstance(frames, np.ndarray):
        return int(frames.ctypes.data)
    return int(frames.data.ptr)


def _device_of(frames: Any) -> int:
    """Device id of a cupy buffer, -1 for host memory."""
    return -1 if isinstance(frames, np.ndarray) else int(frames.device.id)


def _nvtx(cp: Any) -> Any:
    return getattr(cp.cuda, "nvtx", None)


class _BatchCopy:
    """``cuMemcpyBatchAsync`` through the CUDA Python driver bindings (``cuda.bindings``), when installed."""

    def __init__(self, driver: Any):
        self._driver = driver
        attrs = driver.CUmemcpyAttributes()
        # Stream order for the sources: the copies may start once prior work on the stream finished.
        attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        self._attrs = attrs

    @classmethod
    def probe(cls) -> tuple[_BatchCopy | None, str]:
        """The batch copier, or ``None`` with the reason it is unavailable."""
        try:
            from cuda.bindings import driver
        except Exception as exc:
            return None, f"cuda.bindings is not installed ({type(exc).__name__})"
        if not hasattr(driver, "cuMemcpyBatchAsync"):
            return None, "the installed cuda.bindings has no cuMemcpyBatchAsync (needs CUDA 12.8+)"
        try:
            return cls(driver), "available"
        except Exception as exc:
            return None, f"cuMemcpyBatchAsync attributes could not be built: {exc}"

    def copy(self, dsts: list[int], srcs: list[int], sizes: list[int], stream_ptr: int) -> None:
        d = self._driver
        res = d.cuMemcpyBatchAsync([d.CUdeviceptr(x) for x in dsts], [d.CUdeviceptr(x) for x in srcs], sizes,
                                   len(sizes), [self._attrs], [0], 1, d.CUstream(stream_ptr))
        err = res[0] if isinstance(res, tuple) else res
        if err != d.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuMemcpyBatchAsync failed: {err}")


class _CudaCompletion:
    """Completion of one channel job: CUDA events recorded after the work on each stream it used."""

    def __init__(self, events: list[Any], keep: list[Any], error: BaseException | None):
        self._events = events
        self._keep: list[Any] | None = keep  # device descriptor arrays: alive until the kernels finished
        self.error = error

    def _query(self) -> bool:
        try:
            finished = all(e.done for e in self._events)
        except Exception as exc:  # an asynchronous CUDA error surfaces on the query
            self.error = self.error or exc
            finished = True
        if finished:
            self._keep = None
        return finished

    def done(self) -> bool:
        return self._query()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            try:
                for e in self._events:
                    e.synchronize()  # blocking-sync events: the thread sleeps in the driver
            except Exception as exc:
                self.error = self.error or exc
            self._keep = None
            return True
        deadline = time.monotonic() + timeout
        delay = 50e-6
        while not self._query():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))  # sleeping back-off, never a busy spin
            delay = min(delay * 2, 2e-3)
        return True


class CudaChannel:
    """One DMA channel: a non-blocking stream per device, with per-method copy issue.

    Parameters
    ----------
    index : int
        Channel number.
    backend : CudaBackend
        The backend owning the kernels and peer-access table.
    """

    def __init__(self, index: int, backend: CudaBackend):
        self.index = int(index)
        self._backend = backend
        self._cp = backend._cp
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._counters = {"kernel_launches": 0, "memcpy_calls": 0, "batch_calls": 0}
        self._busy = 0.0
        self._timings: list[tuple[Any, Any]] = []
        self._closed = False

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
        """GPU time spent on this channel's completed work (CUDA event timing)."""
        with self._lock:
            still = []
            for start, end in self._timings:
                try:
                    if end.done:
                        self._busy += self._cp.cuda.get_elapsed_time(start, end) / 1e3
                    else:
                        still.append((start, end))
                except Exception:  # a failed job has no meaningful timing
                    pass
            self._timings = still
            return self._busy

    @property
    def counters(self) -> dict[str, int]:
        """``kernel_launches``, ``memcpy_calls`` and ``batch_calls`` issued so far."""
        with self._lock:
            return dict(self._counters)

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self._counters[key] += n

    @staticmethod
    def _exec_device(w: ChannelWork) -> int:
        # The destination's GPU drives the copy when there is one (writes are what a DMA engine pushes); else
        # the source's; host-to-host copies go through device 0.
        if w.dst_kind == "device":
            return int(w.dst_device)
        if w.src_kind == "device":
            return int(w.src_device)
        return 0

    def submit(self, work: list[ChannelWork]) -> _CudaCompletion:
        """Issue ``work`` on this channel's streams and return its completion without waiting."""
        cp = self._cp
        events: list[Any] = []
        keep: list[Any] = []
        error: BaseException | None = None
        by_device: dict[int, list[ChannelWork]] = {}
        for w in work:
            by_device.setdefault(self._exec_device(w), []).append(w)
        nvtx = _nvtx(cp)
        if nvtx is not None:
            nvtx.RangePush(f"dmamig dma channel {self.index}")
        try:
            for dev, items in by_device.items():
                with cp.cuda.Device(dev):
                    s = self.stream(dev)
                    start = cp.cuda.Event(block=True, disable_timing=False)
                    start.record(s)
                    try:
                        for w in items:
                            self._issue(dev, s, w, keep)
                    finally:
                        # Recorded even after a failed issue, so a wait covers what did get queued.
                        end = cp.cuda.Event(block=True, disable_timing=False)
                        end.record(s)
                        events.append(end)
                        with self._lock:
                            self._timings.append((start, end))
        except Exception as exc:
            error = exc
        finally:
            if nvtx is not None:
                nvtx.RangePop()
        return _CudaCompletion(events, keep, error)

    def _issue(self, dev: int, s: Any, w: ChannelWork, keep: list[Any]) -> None:
        b = self._backend
        page = int(w.src_frames.shape[1])
        if w.method == METHOD_GATHER and b.kernel_can_reach(dev, w):
            self._gather(dev, s, w, page, keep)
            return
        if w.method == METHOD_BATCH and b._batch is not None:
            sp, dp = _ptr(w.src_frames), _ptr(w.dst_frames)
            try:
                b._batch.copy((dp + w.dst_start * page).tolist(), (sp + w.src_start * page).tolist(),
                              (w.npages * page).tolist(), s.ptr)
                self._count("batch_calls", 1)
                return
            except Exception:
                b._batch = None  # the bindings disagree with this driver: use per-run copies from now on
        self._memcpy_runs(s, w, page)

    def _memcpy_runs(self, s: Any, w: ChannelWork, page: int) -> None:
        rt = self._cp.cuda.runtime
        sp, dp = _ptr(w.src_frames), _ptr(w.dst_frames)
        sdev, ddev = _device_of(w.src_frames), _device_of(w.dst_frames)
        peer = sdev >= 0 and ddev >= 0 and sdev != ddev and (ddev, sdev) in self._backend.peers
        for s0, d0, n in zip(w.src_start.tolist(), w.dst_start.tolist(), w.npages.tolist()):
            if peer:
                rt.memcpyPeerAsync(dp + d0 * page, ddev, sp + s0 * page, sdev, n * page, s.ptr)
            else:
                rt.memcpyAsync(dp + d0 * page, sp + s0 * page, n * page, _MEMCPY_DEFAULT, s.ptr)
        self._count("memcpy_calls", int(w.npages.size))

    def _gather(self, dev: int, s: Any, w: ChannelWork, page: int, keep: list[Any]) -> None:
        cp = self._cp
        n = w.npages
        total = int(n.sum())
        # Expand runs into per-page byte addresses (vectorized): page k of run r is start[r] + k.
        off = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        desc = np.empty((2, total), dtype=np.uint64)
        desc[0] = _ptr(w.src_frames) + (np.repeat(w.src_start, n) + off) * page
        desc[1] = _ptr(w.dst_frames) + (np.repeat(w.dst_start, n) + off) * page
        kernel = self._backend.kernel(dev, "page_copy.cu", "page_gather_copy")
        with s:
            desc_d = cp.asarray(desc)  # copied on this stream, so the kernel below sees it
            kernel((min(total, MAX_GRID),), (BLOCK_THREADS,),
                   (desc_d[0], desc_d[1], np.uint64(total), np.uint64(page)))
        keep.append(desc_d)
        self._count("kernel_launches", 1)

    def close(self) -> None:
        """Wait for this channel's streams, then drop them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._streams.values():
            s.synchronize()
        self._streams.clear()


class CudaBackend:
    """Frames in pinned host memory and on CUDA devices; DMA channels on CUDA streams.

    Raises
    ------
    BackendUnavailable
        cupy is missing or no CUDA device is usable.
    """

    name = "cuda"

    def __init__(self) -> None:
        cp = _cupy()
        self._cp = cp
        try:
            self._ndev = int(cp.cuda.runtime.getDeviceCount())
        except Exception as exc:
            raise BackendUnavailable(f"the CUDA runtime is not usable: {exc}") from exc
        if self._ndev < 1:
            raise BackendUnavailable("no CUDA device is visible")
        self._lock = threading.Lock()
        self._functions: dict[tuple[int, str, str], Any] = {}
        self._sync_streams: dict[int, Any] = {}
        self.peers: set[tuple[int, int]] = self._enable_peer_access()
        self._batch, self.batch_copy_reason = _BatchCopy.probe()

    # -- setup -----------------------------------------------------------------------------------------------
    def _enable_peer_access(self) -> set[tuple[int, int]]:
        """Enable peer access between every pair of devices that supports it; return the enabled pairs."""
        rt = self._cp.cuda.runtime
        pairs: set[tuple[int, int]] = set()
        for a in range(self._ndev):
            for b in range(self._ndev):
                if a == b or not rt.deviceCanAccessPeer(a, b):
                    continue
                with self._cp.cuda.Device(a):
                    try:
                        rt.deviceEnablePeerAccess(b)
                    except Exception as exc:
                        if "AlreadyEnabled" not in str(exc) and "already enabled" not in str(exc).lower():
                            continue
                pairs.add((a, b))
        return pairs

    def kernel(self, device: int, fname: str, func: str) -> Any:
        """The compiled kernel ``func`` of ``fname`` on ``device`` (compiled and loaded once, then cached)."""
        key = (device, fname, func)
        with self._lock:
            fn = self._functions.get(key)
            if fn is None:
                with self._cp.cuda.Device(device):
                    fn = self._cp.RawModule(code=kernel_source(fname)).get_function(func)
                self._functions[key] = fn
            return fn

    def kernel_can_reach(self, device: int, w: ChannelWork) -> bool:
        """Whether a kernel on ``device`` can address both sides of ``w`` (pinned host, itself, or a peer)."""
        if int(w.src_frames.shape[1]) % 16:
            return False
        for kind, dev in ((w.src_kind, w.src_device), (w.dst_kind, w.dst_device)):
            if kind == "device" and dev != device and (device, dev) not in self.peers:
                return False
        return True

    def sync_stream(self, device: int) -> Any:
        """The stream of the synchronous operations (reads, writes, folio copies) on ``device``."""
        with self._lock:
            s = self._sync_streams.get(device)
            if s is None:
                with self._cp.cuda.Device(device):
                    s = self._cp.cuda.Stream(non_blocking=True)
                self._sync_streams[device] = s
            return s

    # -- frames ------------------------------------------------------------------------------------------------
    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> Any:
        """Zero-filled frames: pinned host memory (numpy view) for ``"host"``, a cupy array for ``"device"``."""
        cp = self._cp
        nbytes = int(nr_pages) * int(page_size)
        if kind == "host":
            if nbytes == 0:
                return np.zeros((int(nr_pages), int(page_size)), dtype=np.uint8)
            flags = (getattr(cp.cuda.runtime, "hostAllocPortable", _HOST_ALLOC_PORTABLE)
                     | getattr(cp.cuda.runtime, "hostAllocMapped", _HOST_ALLOC_MAPPED))
            mem = cp.cuda.PinnedMemoryPointer(cp.cuda.PinnedMemory(nbytes, flags), 0)
            # The array keeps ``mem`` (and so the pinned allocation) alive through its base.
            frames = np.frombuffer(mem, dtype=np.uint8, count=nbytes).reshape(int(nr_pages), int(page_size))
            frames.fill(0)
            return frames
        if kind != "device":
            raise InvalidArgument(f"frame kind must be 'host' or 'device', got {kind!r}")
        if not 0 <= int(device) < self._ndev:
            raise InvalidArgument(f"device {device} does not exist; devices 0..{self._ndev - 1} are visible")
        with cp.cuda.Device(int(device)):
            s = self.sync_stream(int(device))
            with s:
                frames = cp.zeros((int(nr_pages), int(page_size)), dtype=cp.uint8)
            s.synchronize()  # channel streams do not order after this stream: finish the fill now
        return frames

    def _index(self, frames: Any, idx: np.ndarray) -> Any:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and bool((np.diff(idx) == 1).all()):
            return slice(int(idx[0]), int(idx[0]) + idx.size)
        return self._cp.asarray(idx)

    def read_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Host copy of the frames at ``idx`` (synchronous)."""
        if isinstance(frames, np.ndarray):
            return frames[idx]
        dev = _device_of(frames)
        with self._cp.cuda.Device(dev):
            s = self.sync_stream(dev)
            with s:
                out = frames[self._index(frames, idx)].get(stream=s)
            s.synchronize()
        return out

    def write_frames(self, frames: Any, idx: np.ndarray, data: np.ndarray) -> None:
        """Store host ``data`` into the frames at ``idx`` (synchronous)."""
        if isinstance(frames, np.ndarray):
            frames[idx] = data
            return
        dev = _device_of(frames)
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(len(idx), frames.shape[1])
        with self._cp.cuda.Device(dev):
            s = self.sync_stream(dev)
            with s:
                frames[self._index(frames, idx)] = self._cp.asarray(data)
            s.synchronize()

    def zero_frames(self, frames: Any, idx: np.ndarray) -> None:
        """Zero the frames at ``idx`` (synchronous)."""
        if isinstance(frames, np.ndarray):
            frames[idx] = 0
            return
        dev = _device_of(frames)
        with self._cp.cuda.Device(dev):
            s = self.sync_stream(dev)
            with s:
                frames[self._index(frames, idx)] = 0
            s.synchronize()

    def copy_folios(self, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                    nr_pages: np.ndarray) -> None:
        """Copy folio by folio on the calling thread: one ``cudaMemcpyAsync`` (``cudaMemcpyDefault``, UVA) per
        folio on the device's synchronous-operations stream, and one wait at the end of the batch."""
        src_idx = np.asarray(src_idx, dtype=np.int64)
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        nr_pages = np.asarray(nr_pages, dtype=np.int64)
        if not (src_idx.shape == dst_idx.shape == nr_pages.shape) or src_idx.ndim != 1:
            raise InvalidArgument("copy_folios: src_idx, dst_idx and nr_pages must be 1-D of one length")
        cpu_kernels.check_runs(src, dst, src_idx, dst_idx, nr_pages)
        if isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
            cpu_kernels.copy_runs_cached(src, dst, src_idx, dst_idx, nr_pages)
            return
        dev = _device_of(dst) if _device_of(dst) >= 0 else _device_of(src)
        page = int(src.shape[1])
        sp, dp = _ptr(src), _ptr(dst)
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(dev):
            s = self.sync_stream(dev)
            for a, b, n in zip(src_idx.tolist(), dst_idx.tolist(), nr_pages.tolist()):
                rt.memcpyAsync(dp + b * page, sp + a * page, n * page, _MEMCPY_DEFAULT, s.ptr)
            s.synchronize()

    # -- DMA -------------------------------------------------------------------------------------------------
    def open_channels(self, count: int) -> list[CudaChannel]:
        """Create ``count`` stream channels (streams are made per device on first use)."""
        return [CudaChannel(i, self) for i in range(int(count))]

    @property
    def batch_copy_available(self) -> bool:
        """Whether ``cuMemcpyBatchAsync`` is reachable (see ``batch_copy_reason``)."""
        return self._batch is not None

    def checksum_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Per-page checksums with the ``page_checksum`` kernel (pinned host pages are read through UVA)."""
        cp = self._cp
        idx = np.asarray(idx, dtype=np.int64)
        page = int(frames.shape[1])
        if idx.size == 0:
            return np.empty(0, dtype=np.uint64)
        if page % 16:
            return page_checksums(self.read_frames(frames, idx))
        dev = max(_device_of(frames), 0)
        addrs = (_ptr(frames) + idx * page).astype(np.uint64)
        kernel = self.kernel(dev, "page_checksum.cu", "page_checksum")
        with cp.cuda.Device(dev):
            s = self.sync_stream(dev)
            with s:
                addr_d = cp.asarray(addrs)
                out_d = cp.empty(idx.size, dtype=cp.uint64)
                kernel((min(idx.size, MAX_GRID),), (BLOCK_THREADS,),
                       (addr_d, out_d, np.uint64(idx.size), np.uint64(page)))
                out = out_d.get(stream=s)
            s.synchronize()
        return out

    def copy_ceiling(self, direction: str, nbytes: int, repeat: int = 3) -> float:
        """Best seconds of one ``cudaMemcpyAsync`` of ``nbytes`` contiguous bytes, timed with CUDA events.

        ``"h2d"`` copies pinned host memory to device 0, ``"d2h"`` the reverse, ``"d2d"`` device 0 to device 1
        where two devices exist (a peer copy when peer access is enabled), else within device 0. One untimed
        copy warms up first; the best of ``repeat`` timed copies is returned: the ceiling the migration
        throughput of the same run is compared against.
        """
        if direction not in ("h2d", "d2h", "d2d"):
            raise InvalidArgument(f"direction must be 'h2d', 'd2h' or 'd2d', got {direction!r}")
        cp = self._cp
        rt = cp.cuda.runtime
        nbytes = int(nbytes)
        with cp.cuda.Device(0):
            stream = cp.cuda.Stream(non_blocking=True)
            dev0 = cp.zeros(nbytes, dtype=cp.uint8)
            keep: list[Any] = [dev0]
            if direction == "d2d":
                if self._ndev > 1:
                    with cp.cuda.Device(1):
                        other = cp.zeros(nbytes, dtype=cp.uint8)
                else:
                    other = cp.zeros(nbytes, dtype=cp.uint8)
                keep.append(other)
                src, dst = dev0.data.ptr, other.data.ptr
            else:
                host = cp.cuda.alloc_pinned_memory(nbytes)
                keep.append(host)
                src, dst = (host.ptr, dev0.data.ptr) if direction == "h2d" else (dev0.data.ptr, host.ptr)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            best = float("inf")
            for i in range(max(1, int(repeat)) + 1):
                start.record(stream)
                rt.memcpyAsync(dst, src, nbytes, rt.memcpyDefault, stream.ptr)
                end.record(stream)
                end.synchronize()
                if i:  # the first copy is the warm-up
                    best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3)
            del keep
        return best

    def devices(self) -> list[DeviceInfo]:
        """Name, memory, compute capability and peers of every visible device."""
        rt = self._cp.cuda.runtime
        out = []
        for i in range(self._ndev):
            props = rt.getDeviceProperties(i)
            name = props.get("name", b"")
            out.append(DeviceInfo(
                id=i,
                name=name.decode(errors="replace") if isinstance(name, bytes) else str(name),
                memory_bytes=int(props.get("totalGlobalMem", 0)),
                compute_capability=(int(props.get("major", 0)), int(props.get("minor", 0))),
                peers=sorted(b for a, b in self.peers if a == i),
            ))
        return out

    def close(self) -> None:
        """Wait for the synchronous-operation streams and drop cached kernels. Idempotent."""
        with self._lock:
            streams = list(self._sync_streams.values())
            self._sync_streams.clear()
            self._functions.clear()
        for s in streams:
            s.synchronize()
