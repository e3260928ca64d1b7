"""The CUDA backend object: devices and peer access, the kernel cache, channels, device information, and
close.

:class:`CudaBackend` takes its frame operations from :class:`~dmamig.backends.cuda.frameops.FrameOpsMixin`,
copy mode from :class:`~dmamig.backends.cuda.copies.FolioCopyMixin` and the copy ceilings from
:class:`~dmamig.backends.cuda.ceilings.CeilingMixin`; the state they share is made here.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ...dma.channel import DEFAULT_POLL_US, ChannelWork
from ...dma.ring import RING_AVAILABLE
from ...errors import BackendUnavailable
from ..base import DeviceInfo
from . import runtime
from .batch import BATCH_COPY_ENV, _batch_copy_requested, _BatchCopy
from .ceilings import CeilingMixin
from .channels import CudaChannel
from .codes import CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, collect_first_error, map_cuda_error
from .copies import FolioCopyMixin
from .frameops import FrameOpsMixin
from .kernels import kernel_source
from .memory import DeviceFrames
from .ring_lane import MAX_RING_CHANNELS, CudaRingLane
from .topology import read_runtime_topology

__all__ = ["CudaBackend"]


class CudaBackend(FrameOpsMixin, FolioCopyMixin, CeilingMixin):
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

    Raises
    ------
    BackendUnavailable
        cupy is missing or no CUDA device is usable.
    """

    name = "cuda"
    #: Microseconds a waiter polls a channel's CUDA events before sleeping in ``eventSynchronize`` (set by
    #: :class:`~dmamig.machine.Machine`); 0: waits sleep at once.
    poll_us: float = DEFAULT_POLL_US

    @property
    def polling(self) -> bool:
        """Whether waits on new channels poll first (``poll_us > 0``)."""
        return self.poll_us > 0

    def __init__(self, batch_copy: bool | None = None, cupy: Any = None, rings: bool = True) -> None:
        cp = cupy if cupy is not None else runtime._cupy()
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
        self._lanes: list[CudaRingLane] = []
        self.kernel_error: str | None = None
        self._sync_streams: dict[int, Any] = {}
        self._sync_locks = [threading.Lock() for _ in range(self._ndev)]
        self._sync_scratch: dict[int, tuple[int, int]] = {}
        self._device_frames: list[weakref.ref] = []
        self._copy_calls = 0
        self._copy_seconds = 0.0
        self._pinned_pool: Any = None  # bounce buffers of staged folio copies (staging._PinnedPool)
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
        if _batch_copy_requested(batch_copy):
            self._batch, self.batch_copy_reason = _BatchCopy.probe(driver)
        else:
            self._batch = None
            self.batch_copy_reason = (f"off by default (set {BATCH_COPY_ENV}=1 or batch_copy=True): no "
                                      f"calibration shows it faster than per-run copies yet")

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

    def _disable_batch(self, exc: BaseException) -> None:
        """Stop using cuMemcpyBatchAsync after it failed, and record why (shown by ``batch_copy_reason``)."""
        self._batch = None
        self.batch_copy_reason = (f"switched off after a failure: {type(exc).__name__}: {exc}; runs go as "
                                  f"cudaMemcpyAsync calls")
        warnings.warn(f"dmamig: {self.batch_copy_reason}", RuntimeWarning, stacklevel=4)

    def _free_device(self, device: int, ptr: int) -> None:
        with self._cp.cuda.Device(device):
            self._rt.free(ptr)

    # -- DMA -------------------------------------------------------------------------------------------------
    def open_channels(self, count: int, device: int = 0) -> list[CudaChannel]:
        """Create ``count`` channels of ``device``: over one ring lane (:mod:`~dmamig.backends.cuda.ring_lane`,
        one ``ring_copy`` launch per submission) where the kernel builds and ``count`` is at most
        :data:`~dmamig.backends.cuda.ring_lane.MAX_RING_CHANNELS`, with a stream each for the work that takes
        the general path (made per device on first use)."""
        self._check_open()
        lane = None
        if self.rings and int(count) <= MAX_RING_CHANNELS and RING_AVAILABLE:
            kernel = self.kernel(device, "ring_copy.cu", "ring_copy")
            if kernel is not None:
                lane = CudaRingLane(self._cp, device, int(count), kernel, self.poll_us)
                with self._lock:
                    self._lanes.append(lane)
        return [CudaChannel(i, self, device, lane) for i in range(int(count))]

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
        calls += [lambda d=d, p=p: self._free_device(d, p) for d, (p, _) in scratch]
        calls += [pool.close for pool in pools]  # the streams that read them have finished
        for ref in frames:
            f = ref()
            if f is not None:
                calls.append(lambda f=f: self._release_frames(f))
        collect_first_error(calls)

    def _release_frames(self, frames: DeviceFrames) -> None:
        frames.ptr = 0  # released first: any later use raises instead of touching freed memory
        fin = frames._finalizer
        if fin is not None:
            fin()  # frees once; collecting the frames later does nothing
