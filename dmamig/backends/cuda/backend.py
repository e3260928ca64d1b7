"""The CUDA backend object: devices and peer access, the kernel cache, frames and their synchronous operations,
copy mode, channels, copy ceilings, device information, and close.

Frame operations run on each device's synchronous stream and are waited for: allocation, reads, writes and
zeroing (one copy or memset per run of consecutive frames), a device's own access through the ``page_access``
kernels, and per-page checksums with the ``page_checksum`` kernel. Copy mode is the migrating thread's
folio-by-folio copy, one driver call per folio, counted (:attr:`CudaBackend.copy_stats`). Copy ceilings are timed
by the functions of :mod:`~dmamig.backends.cuda.ceilings`.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ...dma.channel import DEFAULT_POLL_US, ChannelWork
from ...dma.checksum import page_checksums
from ...dma.ring import RING_AVAILABLE
from ...dma.staging import stage_capacity, stage_chunks
from ...errors import BackendUnavailable, DmaError, DmamigError, InvalidArgument
from ..base import DeviceInfo, check_dma_engine
from ..ceiling import check_pair_args, topology_staged
from ..cpu import copy_loops
from . import runtime
from .batch import BATCH_COPY_ENV, BatchCopy, batch_copy_requested
from .ceilings import cuda_copy_ceiling, cuda_pair_ceiling
from .channels import CudaChannel
from .codes import (
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED,
    MEMCPY_DEFAULT,
    MEMCPY_DEVICE_TO_HOST,
    MEMCPY_HOST_TO_DEVICE,
    collect_first_error,
    is_sticky,
    map_cuda_error,
)
from .kernels import kernel_source, launch
from .memory import (
    DEVICE_FRAMES,
    HOST_MAPPED,
    DeviceFrames,
    alloc_pinned,
    device_of,
    frames_ptr,
    pinned_frames,
    run_spans,
)
from .persistent_lane import (
    ATTR_MULTIPROCESSOR_COUNT,
    PERSISTENT_BLOCKS,
    PersistentRingLane,
    persistent_refusal,
)
from .ring_lane import MAX_RING_CHANNELS, CudaRingLane
from .topology import read_runtime_topology

__all__ = ["CudaBackend"]


class CudaBackend:
    """Frames in pinned host memory and on CUDA devices; DMA channels on CUDA streams.

    Parameters
    ----------
    batch_copy : bool, optional
        Let channels use ``cuMemcpyBatchAsync`` for ``METHOD_BATCH`` runs where the driver and ``cuda.bindings``
        offer it. Default: off, unless the environment variable ``DMAMIG_CUDA_BATCH_COPY=1``.
    cupy : module, optional
        The cupy module to drive (imported when omitted). Any object offering the same names works.
    rings : bool
        Submit DMA copies between two nodes through each device's ring lane, one ``ring_copy`` launch per
        submission (the default). ``False`` issues every submission on the channels' streams (a
        ``cudaMemcpyAsync`` per long run, a gather launch per segment of short ones, an event pair per job),
        as the work the rings cannot take always is.
    dma_engine : {"launch", "persistent"}
        What consumes the rings: one ``ring_copy`` launch per submission (the default), or a persistent consumer
        kernel per device (:mod:`~dmamig.backends.cuda.persistent_lane`, an experiment setting); see
        :meth:`set_dma_engine`.

    Raises
    ------
    BackendUnavailable
        cupy is missing or no CUDA device is usable, or ``dma_engine="persistent"`` is unsafe here.
    InvalidArgument
        ``dma_engine`` is not one of the two.
    """

    name = "cuda"
    #: Microseconds a waiter polls a channel's CUDA events before sleeping in ``eventSynchronize`` (set by
    #: :class:`~dmamig.machine.Machine`); 0: waits sleep at once.
    poll_us: float = DEFAULT_POLL_US
    #: What consumes the rings of channels opened from now on: ``"launch"`` or ``"persistent"``
    #: (:meth:`set_dma_engine`).
    dma_engine: str = "launch"

    @property
    def polling(self) -> bool:
        """Whether waits on new channels poll first (``poll_us > 0``)."""
        return self.poll_us > 0

    def __init__(self, batch_copy: bool | None = None, cupy: Any = None, rings: bool = True,
                 dma_engine: str = "launch") -> None:
        cp = cupy if cupy is not None else runtime.import_cupy()
        self.rings = bool(rings)
        self._cp = cp
        self._rt = cp.cuda.runtime
        try:
            self._ndev = int(self._rt.getDeviceCount())
        except Exception as exc:
            raise BackendUnavailable(f"the CUDA runtime is not usable: {exc}") from exc
        if self._ndev < 1:
            raise BackendUnavailable("no CUDA device is visible")
        self._lock = threading.Lock()
        self._closed = False
        self._functions: dict[tuple[int, str, str], Any] = {}
        self._lanes: list[CudaRingLane | PersistentRingLane] = []
        # Device -> the first sticky error met there: its context is unusable, so nothing more is asked of it.
        self._sticky: dict[int, BaseException] = {}
        self.kernel_error: str | None = None
        self._sync_streams: dict[int, Any] = {}
        self._sync_locks = [threading.Lock() for _ in range(self._ndev)]
        self._sync_scratch: dict[int, tuple[int, int]] = {}
        self._device_frames: list[weakref.ref] = []
        self._copy_calls = 0
        self._copy_seconds = 0.0
        self._pinned_pool: Any = None  # bounce buffers of staged folio copies (_PinnedPool)
        self._retired_pools: list[Any] = []
        self.peers: set[tuple[int, int]] = self._enable_peer_access()
        self._runtime_topology: Any = None
        #: The machine's topology (set by :class:`~dmamig.machine.Machine`, within what the runtime allows);
        #: ``None`` until then: peer access as enabled.
        self.topology: Any = None
        try:
            driver = int(self._rt.driverGetVersion())
        except Exception:
            driver = 0
        if batch_copy_requested(batch_copy):
            self._batch, self.batch_copy_reason = BatchCopy.probe(driver)
        else:
            self._batch = None
            self.batch_copy_reason = (f"off by default (set {BATCH_COPY_ENV}=1 or batch_copy=True): no "
                                      f"calibration shows it faster than per-run copies yet")
        self.set_dma_engine(dma_engine)

    def set_dma_engine(self, dma_engine: str) -> None:
        """Choose what consumes the rings of channels opened from now on (``Machine(dma_engine=)`` calls this).

        ``"persistent"`` is refused where it is unsafe, on any visible device (see
        :func:`~dmamig.backends.cuda.persistent_lane.persistent_refusal`: a kernel execution timeout, no
        cooperative launch, a running MPS daemon), and where the rings themselves are off or unavailable.

        Raises
        ------
        InvalidArgument
            Not ``"launch"`` or ``"persistent"``.
        BackendUnavailable
            ``"persistent"`` cannot run safely here; the message says why.
        """
        engine = check_dma_engine(dma_engine)
        if engine == "persistent":
            if not self.rings:
                raise BackendUnavailable("dma_engine='persistent' consumes the DMA rings, which this backend has "
                                         "switched off (CudaBackend(rings=False))")
            if not RING_AVAILABLE:
                raise BackendUnavailable("dma_engine='persistent' consumes the DMA rings, which cannot be driven "
                                         "here (numba or the atomics are missing)")
            for dev in range(self._ndev):
                reason = persistent_refusal(self._rt, dev)
                if reason is not None:
                    raise BackendUnavailable(f"dma_engine='persistent' is refused: {reason}; use "
                                             f"dma_engine='launch' (one kernel launch per submission)")
        self.dma_engine = engine

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("this CUDA backend is closed; create a new Machine")

    def _enable_peer_access(self) -> set[tuple[int, int]]:
        """Enable peer access between every pair of devices that supports it; return the enabled pairs."""
        rt = self._rt
        pairs: set[tuple[int, int]] = set()
        for a in range(self._ndev):
            for b in range(self._ndev):
                if a == b:
                    continue
                try:
                    if not rt.deviceCanAccessPeer(a, b):
                        continue
                    with self._cp.cuda.Device(a):
                        rt.deviceEnablePeerAccess(b)
                except Exception as exc:
                    # "Already enabled" (another backend in this process did it) still means enabled. CuPy
                    # resets the runtime's last-error state before raising, so nothing stale is left behind.
                    if getattr(exc, "status", None) != CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED:
                        continue
                pairs.add((a, b))
        return pairs

    def runtime_topology(self) -> Any:
        """The :class:`~dmamig.topology.Topology` of every visible GPU, read from the runtime once (peer access as
        enabled; links from ``cudaDeviceGetP2PAttribute``, see :mod:`dmamig.backends.cuda.topology`)."""
        if self._runtime_topology is None:
            try:
                self._runtime_topology = read_runtime_topology(self._rt, self._ndev, self.peers)
            except Exception as exc:
                raise map_cuda_error(exc, "reading the GPU topology") from exc
        return self._runtime_topology

    def kernel(self, device: int, fname: str, func: str) -> Any:
        """The compiled kernel ``func`` of ``fname`` on ``device`` (built and loaded once, then cached).

        Returns ``None`` when kernels cannot be built here (e.g. NVRTC is missing); the first failure is
        reported once as a ``RuntimeWarning`` and kept in ``kernel_error``, and callers use their fallbacks.
        """
        key = (device, fname, func)
        with self._lock:
            fn = self._functions.get(key)
            if fn is not None or self.kernel_error is not None:
                return fn
            try:
                with self._cp.cuda.Device(device):
                    fn = self._cp.RawModule(code=kernel_source(fname)).get_function(func)
            except Exception as exc:
                self.kernel_error = f"{fname}: {type(exc).__name__}: {exc}"
                nv = runtime.nvrtc_status(self._cp)
                hint = "" if nv["found"] else f" (NVRTC not found: {nv['detail']})"
                warnings.warn(f"dmamig: the CUDA kernels cannot be built ({self.kernel_error}){hint}. Copies "
                              f"fall back to one cudaMemcpyAsync per run and checksums to the host.",
                              RuntimeWarning, stacklevel=3)
                return None
            self._functions[key] = fn
            return fn

    @property
    def kernels_available(self) -> bool:
        """``False`` once a kernel failed to build (the backend then uses its fallbacks)."""
        return self.kernel_error is None

    def kernel_can_reach(self, device: int, w: ChannelWork) -> bool:
        """Whether a kernel on ``device`` can address both sides of ``w`` (pinned host, itself, or a peer)."""
        if int(w.src_frames.shape[1]) % 16:
            return False
        for kind, dev in ((w.src_kind, w.src_device), (w.dst_kind, w.dst_device)):
            if kind == "device" and dev != device and (device, dev) not in self.peers:
                return False
        return True

    def disable_batch_copy(self, exc: BaseException) -> None:
        """Stop using cuMemcpyBatchAsync after it failed, and record why (shown by ``batch_copy_reason``)."""
        self._batch = None
        self.batch_copy_reason = (f"switched off after a failure: {type(exc).__name__}: {exc}; runs go as "
                                  f"cudaMemcpyAsync calls")
        warnings.warn(f"dmamig: {self.batch_copy_reason}", RuntimeWarning, stacklevel=4)

    def _staging_pool(self, nbytes: int) -> _PinnedPool:
        """The pool of pinned bounce buffers of ``nbytes`` for staged folio copies (made on first use)."""
        with self._lock:
            pool = self._pinned_pool
            if pool is None or pool.nbytes != nbytes:
                if pool is not None:  # another page size: its buffers are freed when the backend closes
                    self._retired_pools.append(pool)
                pool = self._pinned_pool = _PinnedPool(self._rt, nbytes)
            return pool

    def free_device(self, device: int, ptr: int) -> None:
        """Free device memory at ``ptr`` of ``device`` (allocated with the runtime's ``malloc``)."""
        with self._cp.cuda.Device(device):
            self._rt.free(ptr)

    @property
    def cp(self) -> Any:
        """The cupy module (or stand-in) this backend drives."""
        return self._cp

    @property
    def runtime(self) -> Any:
        """``cupy.cuda.runtime`` of :attr:`cp`."""
        return self._rt

    @property
    def batch_copier(self) -> Any:
        """The ``cuMemcpyBatchAsync`` caller channels use for ``METHOD_BATCH`` runs, or ``None`` (off, or switched
        off after a failure: see ``batch_copy_reason``)."""
        return self._batch

    # -- DMA -------------------------------------------------------------------------------------------------
    def open_channels(self, count: int, device: int = 0) -> list[CudaChannel]:
        """Create ``count`` channels of ``device``: over one ring lane (:mod:`~dmamig.backends.cuda.ring_lane`,
        one ``ring_copy`` launch per submission) where the kernel builds and ``count`` is at most
        :data:`~dmamig.backends.cuda.ring_lane.MAX_RING_CHANNELS`, with a stream each for the work that takes
        the general path (made per device on first use)."""
        self._check_open()
        lane: CudaRingLane | PersistentRingLane | None = None
        if self.dma_engine == "persistent":
            lane = self._persistent_lane(int(count), device)
        elif self.rings and int(count) <= MAX_RING_CHANNELS and RING_AVAILABLE:
            kernel = self.kernel(device, "ring_copy.cu", "ring_copy")
            if kernel is not None:
                lane = CudaRingLane(self._cp, device, int(count), kernel, self.poll_us, on_sticky=self.note_sticky)
        if lane is not None:
            with self._lock:
                self._lanes.append(lane)
        return [CudaChannel(i, self, device, lane) for i in range(int(count))]

    def _persistent_lane(self, count: int, device: int) -> PersistentRingLane:
        """The lane of ``dma_engine="persistent"``; never a quiet fall-back to another consumer, so that a result
        recorded with the setting measured it."""
        if count > MAX_RING_CHANNELS:
            raise InvalidArgument(f"dma_engine='persistent' serves at most {MAX_RING_CHANNELS} channels per "
                                  f"device, got channels={count}")
        kernel = self.kernel(device, "ring_persist.cu", "ring_persist")
        if kernel is None:
            raise BackendUnavailable(f"dma_engine='persistent' needs the ring_persist kernel, which cannot be "
                                     f"built here: {self.kernel_error}")
        try:
            sms = int(self._rt.deviceGetAttribute(ATTR_MULTIPROCESSOR_COUNT, device))
        except Exception as exc:
            raise map_cuda_error(exc, f"reading device {device}'s multiprocessor count") from exc
        return PersistentRingLane(self._cp, device, count, kernel, self.poll_us,
                                  blocks=max(1, min(PERSISTENT_BLOCKS, sms)), on_sticky=self.note_sticky)

    def note_sticky(self, device: int, error: BaseException) -> None:
        """Device ``device`` met a sticky CUDA error (its context is unusable until the process exits): from now
        on every operation on it fails at once with :meth:`sticky_error`'s error, without calling into CUDA."""
        with self._lock:
            self._sticky.setdefault(int(device), error)

    def sticky_error(self, device: int) -> BaseException | None:
        """The first sticky CUDA error met on ``device``, or ``None``."""
        return self._sticky.get(int(device))

    def frames_address(self, frames: Any) -> tuple[int, int] | None:
        """Where a node's frames are, for the DMA rings: ``(address, bytes)`` (pinned host or device memory)."""
        if isinstance(frames, np.ndarray):
            return int(frames.ctypes.data), int(frames.nbytes)
        if isinstance(frames, DeviceFrames) and not frames.released:
            return int(frames.ptr), int(frames.shape[0]) * int(frames.shape[1])
        return None

    @property
    def batch_copy_available(self) -> bool:
        """Whether channels use ``cuMemcpyBatchAsync`` (see ``batch_copy_reason`` when not)."""
        return self._batch is not None

    def devices(self) -> list[DeviceInfo]:
        """Name, memory, compute capability and peers of every visible device."""
        rt = self._rt
        out = []
        for i in range(self._ndev):
            try:
                props = rt.getDeviceProperties(i)
            except Exception as exc:
                raise map_cuda_error(exc, f"reading the properties of device {i}") from exc
            name = props.get("name", b"")
            out.append(DeviceInfo(
                id=i,
                name=name.decode(errors="replace") if isinstance(name, bytes) else str(name),
                memory_bytes=int(props.get("totalGlobalMem", 0)),
                compute_capability=(int(props.get("major", 0)), int(props.get("minor", 0))),
                peers=sorted(b for a, b in self.peers if a == i),
            ))
        return out

    # -- frames and their synchronous operations ------------------------------------------------------------

    def sync_stream(self, device: int) -> Any:
        """The stream of the synchronous operations (reads, writes, folio copies) on ``device``."""
        with self._lock:
            s = self._sync_streams.get(device)
            if s is None:
                with self._cp.cuda.Device(device):
                    s = self._cp.cuda.Stream(non_blocking=True)
                self._sync_streams[device] = s
            return s

    def _device_op(self, dev: int, what: str, op: Callable[[Any], Any]) -> Any:
        """Run ``op(stream)`` on device ``dev``'s synchronous stream, wait, and map CUDA errors; refuse at once on a
        device whose context a sticky error made unusable (a migration's fallback copy after a failed DMA never
        calls into it)."""
        self._check_open()
        sticky = self._sticky.get(dev)
        if sticky is not None:
            raise DmaError(f"{what} on device {dev}: its CUDA context is unusable after a sticky error ({sticky}); "
                           f"nothing more can run there until the process exits") from sticky
        try:
            with self._sync_locks[dev], self._cp.cuda.Device(dev):
                s = self.sync_stream(dev)
                out = op(s)
                s.synchronize()
            return out
        except DmamigError:
            raise
        except Exception as exc:
            error = map_cuda_error(exc, f"{what} on device {dev}")
            if is_sticky(getattr(exc, "status", None)):
                self.note_sticky(dev, error)
            raise error from exc

    def _sync_buffer(self, dev: int, nbytes: int) -> int:
        """The synchronous stream's scratch buffer on ``dev`` (the caller holds that device's sync lock)."""
        ptr, size = self._sync_scratch.get(dev, (0, 0))
        if size >= nbytes:
            return ptr
        if ptr:
            # Everything on this stream has finished (each sync op waits), so the old buffer is free.
            self._rt.free(ptr)
            self._sync_scratch.pop(dev, None)
        new_size = max(nbytes, 2 * size, 1 << 16)
        ptr = self._rt.malloc(new_size)
        self._sync_scratch[dev] = (ptr, new_size)
        return ptr

    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> Any:
        """Zero-filled frames: pinned host memory (a numpy array) for ``"host"``, :class:`DeviceFrames` for
        ``"device"``, and for ``"host-mapped"`` a device node's frames in pinned, mapped host memory (a numpy
        array, ``Machine(device_frames="host-mapped")``).

        Host-mapped device frames are what the migrating CPU can copy into, as it can into device memory over a
        cache-coherent link (Grace Hopper C2C): :meth:`copy_folios` copies them with the CPU's memcpy, and the
        device reads and writes them through their mapped address (unified addressing), as it does host frames.
        Like host frames they are freed when the last reference to them goes, not at :meth:`close`: they are
        numpy arrays that user code may still hold.

        Raises
        ------
        InvalidArgument
            ``kind`` is not ``"host"``, ``"device"`` or ``"host-mapped"``, or ``device`` does not exist.
        OutOfMemory
            The allocation failed.
        BackendUnavailable
            The backend is closed, or CUDA failed in a way that makes it unusable.
        """
        self._check_open()
        nr_pages, page_size = int(nr_pages), int(page_size)
        if kind == "host":
            return self._pinned_frames(nr_pages, page_size, "pinned host frames")
        if kind not in DEVICE_FRAMES:
            raise InvalidArgument(f"frame kind must be 'host' or 'device', or 'host-mapped' (a device's frames in "
                                  f"pinned host memory), got {kind!r}")
        if not 0 <= int(device) < self._ndev:
            raise InvalidArgument(f"device {device} does not exist; devices 0..{self._ndev - 1} are visible")
        device = int(device)
        if kind == HOST_MAPPED:
            return self._pinned_frames(nr_pages, page_size, f"host-mapped frames of device {device}")
        nbytes = nr_pages * page_size
        ptr = 0
        try:
            with self._cp.cuda.Device(device):
                ptr = self._rt.malloc(max(nbytes, 1))
                frames = DeviceFrames(ptr, device, nr_pages, page_size)
                s = self.sync_stream(device)
                self._rt.memsetAsync(ptr, 0, nbytes, s.ptr)
                s.synchronize()  # channel streams do not order after this stream: finish the fill now
        except Exception as exc:
            if ptr:
                collect_first_error([lambda: self.free_device(device, ptr)])
            raise map_cuda_error(exc, f"allocating {nbytes} bytes of frames on device {device}") from exc
        frames.own(self._cp)
        with self._lock:
            self._device_frames.append(weakref.ref(frames))
        return frames

    def _pinned_frames(self, nr_pages: int, page_size: int, what: str) -> np.ndarray:
        """``(nr_pages, page_size)`` zero-filled frames in pinned, mapped host memory (:func:`pinned_frames`)."""
        nbytes = nr_pages * page_size
        if nbytes == 0:
            return np.zeros((nr_pages, page_size), dtype=np.uint8)
        try:
            return pinned_frames(self._rt, nbytes).reshape(nr_pages, page_size)
        except Exception as exc:
            raise map_cuda_error(exc, f"allocating {nbytes} bytes of {what}") from exc

    def read_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Host copy of the frames at ``idx`` (synchronous; one copy per run of consecutive frames)."""
        if isinstance(frames, np.ndarray):
            return frames[idx]
        idx = np.asarray(idx, dtype=np.int64)
        page = frames.shape[1]
        out = np.empty((idx.size, page), dtype=np.uint8)
        first, pos, length = run_spans(idx)
        base = frames_ptr(frames)

        def op(s: Any) -> np.ndarray:
            for f, p, n in zip(first.tolist(), pos.tolist(), length.tolist()):
                self._rt.memcpyAsync(int(out.ctypes.data) + p * page, base + f * page, n * page,
                                     MEMCPY_DEVICE_TO_HOST, s.ptr)
            return out

        return self._device_op(frames.device, "reading frames", op)

    def write_frames(self, frames: Any, idx: np.ndarray, data: np.ndarray) -> None:
        """Store host ``data`` into the frames at ``idx`` (synchronous; one copy per run)."""
        if isinstance(frames, np.ndarray):
            frames[idx] = data
            return
        idx = np.asarray(idx, dtype=np.int64)
        page = frames.shape[1]
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(idx.size, page)
        first, pos, length = run_spans(idx)
        base = frames_ptr(frames)

        def op(s: Any) -> None:
            for f, p, n in zip(first.tolist(), pos.tolist(), length.tolist()):
                self._rt.memcpyAsync(base + f * page, int(data.ctypes.data) + p * page, n * page,
                                     MEMCPY_HOST_TO_DEVICE, s.ptr)

        self._device_op(frames.device, "writing frames", op)

    def zero_frames(self, frames: Any, idx: np.ndarray) -> None:
        """Zero the frames at ``idx`` (synchronous; one memset per run)."""
        if isinstance(frames, np.ndarray):
            frames[idx] = 0
            return
        page = frames.shape[1]
        first, _pos, length = run_spans(idx)
        base = frames_ptr(frames)

        def op(s: Any) -> None:
            for f, n in zip(first.tolist(), length.tolist()):
                self._rt.memsetAsync(base + f * page, 0, n * page, s.ptr)

        self._device_op(frames.device, "zeroing frames", op)

    def access_frames(self, frames: Any, idx: np.ndarray, data: np.ndarray | None = None) -> np.ndarray | None:
        """A device's own access to whole frames, by the ``page_access`` kernels on that device.

        A read (``data`` None) gathers the frames at ``idx`` into a device buffer with ``page_access_read``
        and returns its host copy; a write stages ``data`` in a device buffer and scatters it with
        ``page_access_write``. Host frames, pages whose size is not a multiple of 16, and kernels that cannot
        be built fall back to :meth:`read_frames` / :meth:`write_frames`. Synchronous.
        """
        idx = np.asarray(idx, dtype=np.int64)
        page = int(frames.shape[1])
        read = data is None
        if isinstance(frames, np.ndarray) or idx.size == 0:
            if read:
                return self.read_frames(frames, idx)
            self.write_frames(frames, idx, data)
            return None
        dev = max(device_of(frames), 0)
        func = "page_access_read" if read else "page_access_write"
        kernel = None if page % 16 else self.kernel(dev, "page_access.cu", func)
        if kernel is None:
            if read:
                return self.read_frames(frames, idx)
            self.write_frames(frames, idx, data)
            return None
        addrs = (frames_ptr(frames) + idx * page).astype(np.uint64)
        nbytes = idx.size * page
        host = np.empty((idx.size, page), dtype=np.uint8) if read else \
            np.ascontiguousarray(data, dtype=np.uint8).reshape(idx.size, page)
        # The dense page buffer starts 256-byte aligned after the address list (uint4 accesses need 16).
        offset = -(-addrs.nbytes // 256) * 256
        rt = self._rt

        def op(s: Any) -> np.ndarray | None:
            buf = self._sync_buffer(dev, offset + nbytes)
            rt.memcpyAsync(buf, int(addrs.ctypes.data), addrs.nbytes, MEMCPY_HOST_TO_DEVICE, s.ptr)
            if not read:
                rt.memcpyAsync(buf + offset, int(host.ctypes.data), nbytes, MEMCPY_HOST_TO_DEVICE, s.ptr)
            launch(kernel, s, idx.size,
                   (np.uint64(buf), np.uint64(buf + offset), np.uint64(idx.size), np.uint64(page)))
            if read:
                rt.memcpyAsync(int(host.ctypes.data), buf + offset, nbytes, MEMCPY_DEVICE_TO_HOST, s.ptr)
                return host
            return None

        return self._device_op(dev, "device access to frames", op)

    def checksum_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Per-page checksums with the ``page_checksum`` kernel (pinned host pages are read through UVA).

        Pages whose size is not a multiple of 16, and every page when the kernel cannot be built, are read back
        and summed on the host with the numpy reference.
        """
        idx = np.asarray(idx, dtype=np.int64)
        page = int(frames.shape[1])
        if idx.size == 0:
            return np.empty(0, dtype=np.uint64)
        dev = max(device_of(frames), 0)
        kernel = None if page % 16 else self.kernel(dev, "page_checksum.cu", "page_checksum")
        if kernel is None:
            return page_checksums(self.read_frames(frames, idx))
        addrs = (frames_ptr(frames) + idx * page).astype(np.uint64)
        out = np.empty(idx.size, dtype=np.uint64)
        rt = self._rt

        def op(s: Any) -> np.ndarray:
            buf = self._sync_buffer(dev, 2 * addrs.nbytes)
            rt.memcpyAsync(buf, int(addrs.ctypes.data), addrs.nbytes, MEMCPY_HOST_TO_DEVICE, s.ptr)
            launch(kernel, s, idx.size,
                   (np.uint64(buf), np.uint64(buf + addrs.nbytes), np.uint64(idx.size), np.uint64(page)))
            rt.memcpyAsync(int(out.ctypes.data), buf + addrs.nbytes, out.nbytes, MEMCPY_DEVICE_TO_HOST, s.ptr)
            return out

        return self._device_op(dev, "checksumming frames", op)

    # -- copy mode: the migrating thread's folio copies ------------------------------------------------------

    def copy_folios(self, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                    nr_pages: np.ndarray, staged: bool = False) -> None:
        """Copy folio by folio on the calling thread: one ``cudaMemcpyAsync`` per folio (``cudaMemcpyPeerAsync``
        between devices) on the device's synchronous-operations stream, and one wait at the end of the batch.
        ``staged`` (two GPUs without peer access): through a pinned bounce buffer, into it on the source's stream,
        then out of it on the destination's (``_stage_folios`` below).

        The calls and their host time are counted in :attr:`copy_stats`: on a GPU this faithful per-folio copy
        costs one driver call per folio, which is what copy mode measures. Between two host arrays (host nodes,
        and a device node's frames under ``Machine(device_frames="host-mapped")``: the ``cpu`` copy baseline) the
        calling thread copies with ``memcpy``, as the CPU backend does, and no driver call is made or counted.
        """
        src_idx = np.asarray(src_idx, dtype=np.int64)
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        nr_pages = np.asarray(nr_pages, dtype=np.int64)
        if not (src_idx.shape == dst_idx.shape == nr_pages.shape) or src_idx.ndim != 1:
            raise InvalidArgument("copy_folios: src_idx, dst_idx and nr_pages must be 1-D of one length")
        copy_loops.check_runs(src, dst, src_idx, dst_idx, nr_pages)
        if isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
            copy_loops.copy_runs_cached(src, dst, src_idx, dst_idx, nr_pages)
            return
        sdev, ddev = device_of(src), device_of(dst)
        if staged and sdev >= 0 and ddev >= 0 and sdev != ddev:
            t0 = time.perf_counter()
            _stage_folios(self, src, src_idx, dst, dst_idx, nr_pages)
            with self._lock:
                self._copy_calls += int(src_idx.size)
                self._copy_seconds += time.perf_counter() - t0
            return
        page = int(src.shape[1])
        sp, dp = frames_ptr(src), frames_ptr(dst)
        rt = self._rt
        peer = sdev >= 0 and ddev >= 0 and sdev != ddev

        def op(s: Any) -> None:
            for a, b, n in zip(src_idx.tolist(), dst_idx.tolist(), nr_pages.tolist()):
                if peer:
                    rt.memcpyPeerAsync(dp + b * page, ddev, sp + a * page, sdev, n * page, s.ptr)
                else:
                    rt.memcpyAsync(dp + b * page, sp + a * page, n * page, MEMCPY_DEFAULT, s.ptr)

        t0 = time.perf_counter()
        self._device_op(ddev if ddev >= 0 else sdev, "copying folios", op)
        with self._lock:
            self._copy_calls += int(src_idx.size)
            self._copy_seconds += time.perf_counter() - t0

    @property
    def copy_stats(self) -> dict[str, float]:
        """Copy-mode cost: ``calls`` (one per folio copied by :meth:`copy_folios`), ``seconds`` (host time of
        those batches, waits included) and ``us_per_call``."""
        with self._lock:
            calls, secs = self._copy_calls, self._copy_seconds
        return {"calls": calls, "seconds": secs, "us_per_call": (secs / calls * 1e6) if calls else 0.0}

    # -- copy ceilings (ceilings.py) ------------------------------------------------------------------------------
    def copy_ceiling(self, direction: str, nbytes: int, repeat: int = 3) -> float:
        """Best seconds of one ``cudaMemcpyAsync`` of ``nbytes`` contiguous bytes (``"h2d"``, ``"d2h"`` or
        ``"d2d"``), timed with CUDA events; see :func:`~dmamig.backends.cuda.ceilings.cuda_copy_ceiling`.

        Raises
        ------
        InvalidArgument
            ``direction`` is not one of the three.
        OutOfMemory, DmaError
            The buffers could not be allocated, or a copy failed.
        """
        self._check_open()
        return cuda_copy_ceiling(self._cp, self._ndev, direction, int(nbytes), repeat, self.free_device)

    def pair_ceiling(self, src_dev: int, dst_dev: int, nbytes: int, repeat: int = 3,
                     staged: bool | None = None) -> float:
        """Best seconds of one contiguous copy of ``nbytes`` from device ``src_dev`` to ``dst_dev`` (-1: pinned
        host memory), timed with CUDA events: direct where the pair has peer access, else staged as the DMA
        channels stage it (``staged`` defaults to what :attr:`topology` says); see
        :func:`~dmamig.backends.cuda.ceilings.cuda_pair_ceiling`.

        Raises
        ------
        InvalidArgument
            A device that does not exist, ``staged`` for a pair that is not two devices, ``nbytes`` or
            ``repeat`` below 1.
        OutOfMemory, DmaError
            The buffers could not be allocated, or a copy failed.
        """
        src_dev, dst_dev, nbytes, repeat = check_pair_args(src_dev, dst_dev, nbytes, repeat, staged)
        self._check_open()
        if max(src_dev, dst_dev) >= self._ndev:
            raise InvalidArgument(f"device {max(src_dev, dst_dev)} does not exist; devices 0..{self._ndev - 1} "
                                  f"are visible")
        if staged is None:
            staged = topology_staged(self.topology or self.runtime_topology(), src_dev, dst_dev)
        return cuda_pair_ceiling(self._cp, src_dev, dst_dev, nbytes, repeat, bool(staged), self.free_device)

    def close(self) -> None:
        """Release everything: wait for the synchronous streams, free every device frame buffer and scratch
        buffer, drop cached kernels. Idempotent, and never raises (after a sticky CUDA error too).

        Pinned host frames are freed when the last reference to them goes.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._sync_streams.values())
            self._sync_streams.clear()
            self._functions.clear()
            frames, self._device_frames = self._device_frames, []
            scratch = list(self._sync_scratch.items())
            self._sync_scratch.clear()
            pools = self._retired_pools + ([self._pinned_pool] if self._pinned_pool is not None else [])
            self._pinned_pool, self._retired_pools = None, []
            lanes, self._lanes = self._lanes, []
        calls: list[Callable[[], Any]] = [lane.close for lane in lanes]  # idempotent: the engine closed most
        calls += [s.synchronize for s in streams]
        calls += [lambda d=d, p=p: self.free_device(d, p) for d, (p, _) in scratch]
        calls += [pool.close for pool in pools]  # the streams that read them have finished
        for ref in frames:
            f = ref()
            if f is not None:
                calls.append(f.release)
        collect_first_error(calls)


# -- the migrating thread's staged copy (copy mode between GPUs without peer access) -----------------------------

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


def _copies(rt: Any, page: int, from_ptr: int, a: np.ndarray, to_ptr: int, b: np.ndarray,
             n: np.ndarray) -> Callable[[Any], None]:
    """An operation for ``_device_op``: one ``cudaMemcpyAsync`` per run on the stream it is given."""
    def op(s: Any) -> None:
        for x, y, c in zip(a.tolist(), b.tolist(), n.tolist()):
            rt.memcpyAsync(to_ptr + y * page, from_ptr + x * page, c * page, MEMCPY_DEFAULT, s.ptr)
    return op


def _stage_folios(backend: CudaBackend, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                  nr_pages: np.ndarray) -> None:
    """The migrating thread's copy between two GPUs without peer access: per chunk, one ``cudaMemcpyAsync`` per
    folio piece into a pinned bounce buffer on the source device's stream, a wait, then out of it on the
    destination's. The buffer goes back to the pool only after a copy that finished: after a failure, copies
    already queued may still use it."""
    page = int(src.shape[1])
    cap = stage_capacity(page)
    pool = backend._staging_pool(cap * page)
    buf = pool.take()
    rt = backend._rt
    sp, dp = frames_ptr(src), frames_ptr(dst)
    pieces = stage_chunks(src_idx, dst_idx, nr_pages, cap)
    for k in range(pieces.nr_chunks):
        s0, d0, n, b0 = pieces.chunk(k)
        # A hop that fails may leave copies it queued still reading or writing ``buf``: the buffer is then kept
        # out of the pool (the backend frees it when it closes) rather than handed to the next staged copy.
        backend._device_op(src.device, "staging folios into host memory", _copies(rt, page, sp, s0, buf, b0, n))
        backend._device_op(dst.device, "staging folios out of host memory", _copies(rt, page, buf, b0, dp, d0, n))
    pool.give(buf)
