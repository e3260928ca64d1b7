"""The CUDA backend (CuPy): pinned host frames, device frames, stream channels and RawModule kernels.

``cupy`` is imported here only, and only when a backend object is made or a kernel is built, so importing this
module (and :mod:`dmamig`) works on machines without cupy or without a GPU. A backend may also be handed any
object that provides the few CuPy names it uses (``cupy=``); the test suite drives the real channel and backend
code through a small numpy implementation of them.

Memory: host RAM frames are pinned (``cudaHostAlloc``, portable and mapped): copies from them are truly
asynchronous and, under unified virtual addressing, the host pointer is also a device pointer, so the
gather/scatter kernel reads and writes host pages directly. Device frames are plain ``cudaMalloc``
allocations (:class:`DeviceFrames`), outside CuPy's memory pools, so :meth:`CudaBackend.close` gives every byte
back to the driver instead of leaving it cached in a pool.

Channels: each DMA channel owns one non-blocking stream per device (so it never serialises with the legacy
default stream). Per run the plan's method picks ``cudaMemcpyAsync`` (``cudaMemcpyPeerAsync`` between devices),
the batched ``page_gather_copy`` kernel from ``kernels/page_copy.cu``, or ``cuMemcpyBatchAsync`` when it was
switched on. Completions are CUDA events recorded after the work. Their state is read with ``cudaEventQuery``
directly: ``cudaSuccess`` is done, ``cudaErrorNotReady`` pending, and any other code is a CUDA error, turned
into a :class:`~dmamig.errors.DmaError` that names it (CuPy's ``Event.done`` would report such an event as
forever pending).

Kernels are compiled with NVRTC. When NVRTC (or the build) is unavailable the backend warns once and keeps
working: gather runs become one ``cudaMemcpyAsync`` per run and checksums are computed on the host.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.resources
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ...dma.checksum import page_checksums
from ...dma.plan import METHOD_BATCH, METHOD_GATHER
from ...errors import BackendUnavailable, DmaError, DmamigError, InvalidArgument, OutOfMemory
from .. import cpu_kernels
from ..base import CHANNEL_COUNTERS, ChannelWork, DeviceInfo, route_counts

__all__ = [
    "BATCH_COPY_ENV",
    "KERNEL_FILES",
    "CudaBackend",
    "CudaChannel",
    "DeviceFrames",
    "PendingRing",
    "collect_first_error",
    "compile_kernel_nvrtc",
    "cuda_error_kind",
    "cuda_error_text",
    "cuda_environment",
    "event_finished",
    "kernel_build_status",
    "kernel_source",
    "map_cuda_error",
    "nvrtc_check",
    "nvrtc_status",
    "preload_nvrtc",
]

#: The CUDA sources shipped in ``dmamig.kernels`` and the ``extern "C"`` kernels each must provide.
KERNEL_FILES: dict[str, tuple[str, ...]] = {
    "page_copy.cu": ("page_gather_copy",),
    "page_checksum.cu": ("page_checksum",),
    "page_access.cu": ("page_access_read", "page_access_write"),
}
#: Threads per block of both kernels (a multiple of 32, as the checksum's warp reduction requires).
BLOCK_THREADS = 256
#: Upper bound on the grid; both kernels stride over pages, so larger submissions still work.
MAX_GRID = 1 << 16
#: Completions per channel whose timing events may wait to be read; the oldest is folded in beyond that.
TIMING_RING = 64
#: Environment variable that switches ``cuMemcpyBatchAsync`` on (``1``) for channels of new backends.
BATCH_COPY_ENV = "DMAMIG_CUDA_BATCH_COPY"

# CUDA runtime codes the backend interprets (cudaError_t values, stable across CUDA 11-13).
CUDA_SUCCESS = 0
CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
# Codes that mean "no usable CUDA here" rather than a failed operation: initialization error, insufficient
# driver, devices unavailable, no device, invalid device, system not ready, driver mismatch, compat unsupported.
_UNAVAILABLE_CODES = frozenset({3, 35, 46, 100, 101, 802, 803, 804})

# cudaHostAllocPortable | cudaHostAllocMapped: pinned for every device, and device-addressable.
_HOST_ALLOC_PORTABLE = 1
_HOST_ALLOC_MAPPED = 2
_MEMCPY_HOST_TO_DEVICE = 1
_MEMCPY_DEVICE_TO_HOST = 2
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the driver infers the direction from the pointers (UVA)
_EVENT_BLOCKING_SYNC = 1  # a waiting thread sleeps in the driver instead of spinning
_EVENT_DISABLE_TIMING = 2

# NVRTC wheels on the package index, per CUDA major version: (distribution, library file name).
_NVRTC_WHEELS = {12: ("nvidia-cuda-nvrtc-cu12", "libnvrtc.so.12"), 13: ("nvidia-cuda-nvrtc", "libnvrtc.so.13")}


# -- pure helpers: CUDA status codes and errors ----------------------------------------------------------------

def cuda_error_text(code: int, runtime: Any = None) -> str:
    """Name and meaning of a ``cudaError_t`` code, e.g. ``"cudaErrorIllegalAddress: an illegal memory ..."``.

    Parameters
    ----------
    code : int
        The CUDA runtime status code.
    runtime : module, optional
        ``cupy.cuda.runtime`` (or an object with a ``CUDARuntimeError`` class); its error class knows the names.
        Without it only the number is given.
    """
    err_cls = getattr(runtime, "CUDARuntimeError", None)
    if err_cls is not None:
        try:
            return f"{err_cls(int(code))} (code {int(code)})"
        except Exception:  # an unknown code: fall back to the number
            pass
    return f"CUDA error code {int(code)}"


def event_finished(code: int, runtime: Any = None, what: str = "a DMA completion event") -> bool:
    """Interpret one ``cudaEventQuery`` result.

    Parameters
    ----------
    code : int
        What ``cudaEventQuery`` returned.
    runtime : module, optional
        ``cupy.cuda.runtime``, used to name an error.
    what : str
        What the event marks, for the error message.

    Returns
    -------
    bool
        ``True`` for ``cudaSuccess`` (the work before the event finished), ``False`` for ``cudaErrorNotReady``.

    Raises
    ------
    DmaError
        Any other code: the work failed (e.g. an illegal address); the message names the CUDA error.
    """
    code = int(code)
    if code == CUDA_SUCCESS:
        return True
    if code == CUDA_ERROR_NOT_READY:
        return False
    err = DmaError(f"{what} reported {cuda_error_text(code, runtime)}; the copies before it did not complete")
    err.cuda_status = code
    raise err


def collect_first_error(calls: Iterable[Callable[[], Any]]) -> BaseException | None:
    """Call every callable, even after one raised; return the first exception (``None`` when none raised).

    Used where stopping early would be unsafe: every stream of a failed submission must have stopped before
    its destination frames may be freed, so each event is synchronized whatever the others reported.
    """
    first: BaseException | None = None
    for call in calls:
        try:
            call()
        except Exception as exc:
            if first is None:
                first = exc
    return first


def cuda_error_kind(exc: BaseException) -> str:
    """Classify an exception raised by a CuPy call: ``"oom"``, ``"unavailable"`` or ``"error"``.

    ``MemoryError`` (CuPy's ``OutOfMemoryError``) and ``cudaErrorMemoryAllocation`` are ``"oom"``; status codes
    meaning that CUDA cannot run here (insufficient driver, no device, initialization errors) are
    ``"unavailable"``; anything else is ``"error"``.
    """
    if isinstance(exc, DmamigError):
        return "error"
    status = getattr(exc, "status", None)
    if isinstance(exc, MemoryError) or status == CUDA_ERROR_MEMORY_ALLOCATION:
        return "oom"
    if isinstance(status, int) and status in _UNAVAILABLE_CODES:
        return "unavailable"
    return "error"


def map_cuda_error(exc: BaseException, what: str) -> DmamigError:
    """The project's exception for a CuPy/CUDA exception raised while doing ``what``.

    Returns :class:`~dmamig.errors.OutOfMemory`, :class:`~dmamig.errors.BackendUnavailable` or
    :class:`~dmamig.errors.DmaError` (see :func:`cuda_error_kind`); one of the project's own errors is returned
    unchanged. The caller raises the result ``from exc``.
    """
    if isinstance(exc, DmamigError):
        return exc
    kind = cuda_error_kind(exc)
    detail = f"{type(exc).__name__}: {exc}"
    if kind == "oom":
        return OutOfMemory(f"{what}: the CUDA allocation failed ({detail}); use fewer pages per node or free "
                           f"GPU memory held by other processes")
    if kind == "unavailable":
        return BackendUnavailable(f"{what}: CUDA is not usable ({detail})")
    return DmaError(f"{what} failed: {detail}")


class PendingRing:
    """A bounded first-in first-out list of items still to be settled (the channels' timing events).

    Parameters
    ----------
    capacity : int
        Most items held; :meth:`push` hands back the oldest ones beyond it for the caller to settle now.
    """

    def __init__(self, capacity: int):
        if int(capacity) < 1:
            raise InvalidArgument(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self._items: deque[Any] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Any) -> list[Any]:
        """Add ``item``; return the oldest items that no longer fit (settle them before going on)."""
        self._items.append(item)
        over = []
        while len(self._items) > self.capacity:
            over.append(self._items.popleft())
        return over

    def pop_ready(self, ready: Callable[[Any], bool]) -> list[Any]:
        """Remove and return every item for which ``ready(item)`` is true, keeping the others in order."""
        done, keep = [], deque()
        for item in self._items:
            (done if ready(item) else keep).append(item)
        self._items = keep
        return done

    def drain(self) -> list[Any]:
        """Remove and return every item."""
        items = list(self._items)
        self._items.clear()
        return items


def run_spans(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split frame indices into runs of consecutive frames: ``(first frame, position in idx, length)``."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        z = np.empty(0, dtype=np.int64)
        return z, z, z
    heads = np.flatnonzero(np.diff(idx) != 1) + 1
    pos = np.concatenate(([0], heads)).astype(np.int64)
    lengths = np.diff(np.concatenate((pos, [idx.size]))).astype(np.int64)
    return idx[pos], pos, lengths


# -- cupy, NVRTC and the kernels ---------------------------------------------------------------------------------

def _cupy() -> Any:
    try:
        import cupy
    except Exception as exc:
        raise BackendUnavailable(f"the CUDA backend needs cupy, which failed to import: {exc}; install "
                                 f"dmamig[cuda12] or dmamig[cuda13]") from exc
    preload_nvrtc(cupy)
    return cupy


def _nvrtc_wheel_library(major: int) -> Path | None:
    """Path of ``libnvrtc.so.<major>`` inside the installed NVRTC wheel, if that wheel is installed."""
    dist_name, lib = _NVRTC_WHEELS.get(int(major), (None, None))
    if dist_name is None:
        return None
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if Path(str(f)).name == lib:
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


_preloaded: dict[int, str] = {}


def preload_nvrtc(cp: Any) -> str | None:
    """Load the NVRTC wheel's library before CuPy needs it, where CuPy would not find it by itself.

    CuPy 14 finds NVRTC wheels on its own (through ``cuda-pathfinder``). CuPy 13 only asks the dynamic loader
    for ``libnvrtc.so.<major>``, which does not search ``site-packages``; loading the wheel's copy first (with
    its builtins library, globally) makes that lookup succeed. Does nothing on CuPy 14+, without the wheel, or
    when the library is already loaded.

    Returns
    -------
    str or None
        The library path that was loaded, or ``None``.
    """
    try:
        major = int(str(getattr(cp, "__version__", "0")).split(".")[0])
        cuda_major = int(cp.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        return None
    if major >= 14 or cuda_major in _preloaded:
        return _preloaded.get(cuda_major)
    path = _nvrtc_wheel_library(cuda_major)
    if path is None:
        return None
    try:
        # libnvrtc opens its builtins library by name at compile time: load that (globally) first.
        for builtins in sorted(path.parent.glob(f"libnvrtc-builtins.so.{cuda_major}*")):
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
                break
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _preloaded[cuda_major] = str(path)
    return str(path)


def nvrtc_status(cp: Any = None) -> dict[str, Any]:
    """Whether NVRTC (the runtime compiler the kernels need) can be loaded; needs no GPU.

    Returns
    -------
    dict
        ``found`` (bool), ``version`` (``"13.0"`` or ``None``) and ``detail`` (where it came from, or why not).
    """
    try:
        cp = cp if cp is not None else _cupy()
    except BackendUnavailable as exc:
        return {"found": False, "version": None, "detail": str(exc)}
    try:
        major, minor = cp.cuda.nvrtc.getVersion()
    except Exception as exc:
        try:
            cuda_major = int(cp.cuda.runtime.runtimeGetVersion()) // 1000
        except Exception:
            cuda_major = 0
        wheel = _NVRTC_WHEELS.get(cuda_major, ("nvidia-cuda-nvrtc", ""))[0]
        return {"found": False, "version": None,
                "detail": f"{type(exc).__name__}: {exc}; install dmamig[cuda{cuda_major or 13}] (it brings the "
                          f"{wheel} wheel) or a CUDA toolkit"}
    loaded = _preloaded.get(int(major))
    if loaded is None:
        try:
            # CuPy 14 loads NVRTC through cuda-pathfinder; asking it again only reports where from.
            from cuda import pathfinder

            loaded = str(pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path)
        except Exception:
            loaded = None
    return {"found": True, "version": f"{major}.{minor}",
            "detail": f"loaded from {loaded}" if loaded else "loaded by cupy"}


def kernel_source(name: str) -> str:
    """Text of a CUDA source file shipped in ``dmamig.kernels`` (works from a wheel or a source tree).

    Parameters
    ----------
    name : str
        File name, one of :data:`KERNEL_FILES`.
    """
    try:
        return importlib.resources.files("dmamig.kernels").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Running from a source checkout on sys.path (not installed): kernels/ sits beside the package.
        return (Path(__file__).resolve().parents[3] / "kernels" / name).read_text(encoding="utf-8")


def compile_kernel_nvrtc(fname: str, arch: int, cp: Any = None) -> bytes:
    """Compile one kernel file with NVRTC for ``sm_<arch>``, as CuPy does, and return the cubin; needs no GPU.

    Parameters
    ----------
    fname : str
        A key of :data:`KERNEL_FILES`.
    arch : int
        Compute capability as an integer, e.g. ``90`` for sm_90.
    cp : module, optional
        The cupy module (imported when omitted).

    Raises
    ------
    InvalidArgument
        ``fname`` is not a shipped kernel file.
    DmaError
        NVRTC rejected the source; the message carries NVRTC's log.
    """
    if fname not in KERNEL_FILES:
        raise InvalidArgument(f"fname must be one of {sorted(KERNEL_FILES)}, got {fname!r}")
    cp = cp if cp is not None else _cupy()
    nvrtc = cp.cuda.nvrtc
    prog = nvrtc.createProgram(kernel_source(fname), fname, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, (f"-arch=sm_{int(arch)}", "-std=c++14"))
        except Exception as exc:
            raise DmaError(f"NVRTC could not compile {fname} for sm_{arch}: {exc}\n"
                           f"{nvrtc.getProgramLog(prog)}") from exc
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


def kernel_build_status() -> dict[str, str]:
    """Build every kernel now and report, per ``.cu`` file, ``"compiled OK"``, ``"error: ..."``, or, without a
    usable GPU, whether NVRTC compiles it for sm_90 (for ``dmamig info``)."""
    from .. import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    status: dict[str, str] = {}
    for fname, funcs in KERNEL_FILES.items():
        try:
            code = kernel_source(fname)
        except Exception as exc:
            status[fname] = f"error: cannot read the source: {exc}"
            continue
        if reason is not None:
            nv = nvrtc_status()
            if not nv["found"]:
                status[fname] = f"not built: CUDA is not usable here ({reason})"
                continue
            try:
                compile_kernel_nvrtc(fname, 90)
                status[fname] = f"NVRTC {nv['version']} compiles it for sm_90; not loaded: {reason}"
            except Exception as exc:
                status[fname] = f"error: NVRTC {nv['version']} cannot compile it: {type(exc).__name__}: {exc}"
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


def _version_text(v: int) -> str:
    """``13020`` -> ``"13.2"`` (CUDA's ``1000 * major + 10 * minor`` encoding); ``0`` -> ``"none"``."""
    v = int(v)
    return "none" if v <= 0 else f"{v // 1000}.{(v % 1000) // 10}"


def cuda_environment(cp: Any = None) -> dict[str, Any]:
    """What ``dmamig info`` shows about CUDA: driver, CuPy's CUDA, NVRTC; works without a GPU.

    Returns
    -------
    dict
        ``cuda_driver`` (the CUDA version the driver supports, ``"none"`` without a driver),
        ``cuda_runtime`` (the CUDA version CuPy was built for), ``nvrtc`` (version, or why it is missing) and
        ``batch_copy`` (whether channels use ``cuMemcpyBatchAsync``). Only ``cupy`` when cupy is missing.
    """
    try:
        cp = cp if cp is not None else _cupy()
    except BackendUnavailable as exc:
        return {"cupy": f"not usable: {exc}"}
    rt = cp.cuda.runtime
    out: dict[str, Any] = {"cupy": str(getattr(cp, "__version__", "?"))}
    for key, fn in (("cuda_driver", "driverGetVersion"), ("cuda_runtime", "runtimeGetVersion")):
        try:
            out[key] = _version_text(getattr(rt, fn)())
        except Exception as exc:
            out[key] = f"unknown ({type(exc).__name__}: {exc})"
    nv = nvrtc_status(cp)
    out["nvrtc"] = f"{nv['version']} ({nv['detail']})" if nv["found"] else f"not found: {nv['detail']}"
    out["batch_copy"] = ("on (DMAMIG_CUDA_BATCH_COPY=1)" if _batch_copy_requested(None)
                         else f"off: not used unless {BATCH_COPY_ENV}=1 (no calibration shows it faster yet)")
    return out


def _batch_copy_requested(option: bool | None) -> bool:
    if option is not None:
        return bool(option)
    return os.environ.get(BATCH_COPY_ENV, "").strip() in ("1", "true", "yes", "on")


# -- frames ---------------------------------------------------------------------------------------------------------

class DeviceFrames:
    """One device node's frames: a ``cudaMalloc`` allocation seen as ``(nr_pages, page_size)`` bytes.

    Outside CuPy's pools, so releasing it gives the memory back to the driver at once. It exposes
    ``__cuda_array_interface__`` (``cupy.asarray(frames)`` is a zero-copy view) while it is alive.

    Attributes
    ----------
    ptr : int
        Device address of frame 0 (0 once released).
    device : int
        CUDA device id.
    shape : tuple of int
        ``(nr_pages, page_size)``.
    """

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __init__(self, ptr: int, device: int, nr_pages: int, page_size: int):
        self.ptr = int(ptr)
        self.device = int(device)
        self.shape = (int(nr_pages), int(page_size))
        self._finalizer: weakref.finalize | None = None  # frees the memory once, at release or collection

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.shape[0] * self.shape[1]

    @property
    def released(self) -> bool:
        """Whether the memory was given back (the backend was closed)."""
        return self.ptr == 0

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if self.released:
            raise DmaError("these device frames were released when their backend closed")
        return {"shape": self.shape, "typestr": "|u1", "data": (self.ptr, False), "version": 3, "strides": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        state = "released" if self.released else f"ptr=0x{self.ptr:x}"
        return f"DeviceFrames(device={self.device}, shape={self.shape}, {state})"


def _ptr(frames: Any) -> int:
    """Base address of a frame buffer: numpy (pinned host) or :class:`DeviceFrames`."""
    if isinstance(frames, np.ndarray):
        return int(frames.ctypes.data)
    if isinstance(frames, DeviceFrames):
        if frames.released:
            raise DmaError(f"{frames!r}: its backend was closed; create a new Machine")
        return frames.ptr
    raise InvalidArgument(f"frames must be a numpy array or DeviceFrames, got {type(frames).__name__}")


def _device_of(frames: Any) -> int:
    """Device id of a frame buffer, -1 for host memory."""
    return frames.device if isinstance(frames, DeviceFrames) else -1


def _nvtx(cp: Any) -> Any:
    return getattr(cp.cuda, "nvtx", None)


# -- batched copies -------------------------------------------------------------------------------------------------

class _BatchCopy:
    """``cuMemcpyBatchAsync`` through the CUDA Python driver bindings (``cuda.bindings``), when installed."""

    #: The first driver with cuMemcpyBatchAsync (CUDA 12.8, as cuDriverGetVersion encodes it).
    MIN_DRIVER = 12080

    def __init__(self, driver: Any):
        self._driver = driver
        attrs = driver.CUmemcpyAttributes()
        # Stream order for the sources: the copies may start once prior work on the stream finished.
        attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        self._attrs = attrs

    @classmethod
    def probe(cls, driver_version: int) -> tuple[_BatchCopy | None, str]:
        """The batch copier, or ``None`` with the reason it is unavailable.

        Parameters
        ----------
        driver_version : int
            ``cudaDriverGetVersion()``: the bindings may offer the call on a driver that lacks it.
        """
        if int(driver_version) < cls.MIN_DRIVER:
            return None, (f"the driver supports CUDA {_version_text(driver_version)}; cuMemcpyBatchAsync needs "
                          f"{_version_text(cls.MIN_DRIVER)} or newer")
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
            raise DmaError(f"cuMemcpyBatchAsync failed: {err}")


# -- completions and channels ---------------------------------------------------------------------------------------

class _CudaCompletion:
    """Completion of one channel job: an end event per device it used, plus that device's timing start event.

    The events are queried with ``cudaEventQuery`` (0 done, ``cudaErrorNotReady`` pending, anything else an
    error). Once every event has finished, the job's GPU time is folded into the channel's busy time (not for a
    failed job) and the events are destroyed, so finished jobs hold no CUDA resources.
    """

    def __init__(self, channel: CudaChannel, ends: list[Any], starts: list[Any], error: BaseException | None):
        self._channel = channel
        self._rt = channel._rt
        self._pending = list(ends)  # end events not yet seen finished
        self._ends = list(ends)
        self._starts = list(starts)
        self._lock = threading.Lock()
        self._waiters = 0  # threads inside eventSynchronize: events are destroyed only after they return
        self._settled = False
        self.error = error

    def _note(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc if isinstance(exc, DmaError) else map_cuda_error(exc, "waiting for a DMA channel")

    def _poll(self) -> bool:
        """Query every pending event (never blocks); ``True`` once none is pending."""
        with self._lock:
            still = []
            for ev in self._pending:
                try:
                    if not event_finished(self._rt.eventQuery(ev), self._rt):
                        still.append(ev)
                except Exception as exc:  # this event's work failed: it has stopped, keep the first error
                    self._note(exc)
            self._pending = still
            return not still

    def done(self) -> bool:
        """Whether every stream of the job has finished (successfully or not). Never blocks."""
        if self._settled:
            return True
        finished = self._poll()
        if finished:
            self._settle()
        return finished

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every stream of the job has stopped; ``True`` when they have, ``False`` on timeout.

        Errors never stop the wait early: each device's event is waited for, the first error is kept in
        ``error``, so a caller may free the destination frames once this returns ``True``.
        """
        if self._settled:
            return True
        if timeout is None:
            err: BaseException | None = None
            with self._lock:
                pending = list(self._pending)
                self._waiters += 1
            try:
                # Every event, even after one failed: other devices may still be writing destination frames.
                err = collect_first_error([lambda ev=ev: self._rt.eventSynchronize(ev) for ev in pending])
            finally:
                with self._lock:
                    self._waiters -= 1
                    if err is not None:
                        self._note(err)
                    self._pending = []
            self._settle()
            return True
        deadline = time.monotonic() + max(0.0, float(timeout))
        delay = 50e-6
        while not self._poll():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))  # sleeping back-off, never a busy spin
            delay = min(delay * 2, 2e-3)
        self._settle()
        return True

    def _settle(self) -> None:
        """Fold the job's GPU time into the channel (successful jobs only) and destroy its events, once."""
        with self._lock:
            if self._settled or self._pending or self._waiters:
                return
            self._settled = True
            ends, starts = self._ends, self._starts
            self._ends, self._starts = [], []
        seconds = 0.0
        if self.error is None:
            try:
                seconds = sum(self._rt.eventElapsedTime(s, e) for s, e in zip(starts, ends)) / 1e3
            except Exception:  # timing is best effort; the copy itself succeeded
                seconds = 0.0
        for ev in starts + ends:
            try:
                self._rt.eventDestroy(ev)
            except Exception:  # a sticky context error: the driver reclaims it with the context
                pass
        self._channel._add_busy(seconds)


class CudaChannel:
    """One DMA channel: a non-blocking stream per device, with per-method copy issue.

    The engine gives each device its own channels; a channel's work runs on its stream of the device that
    drives the copy, and a staged copy (two GPUs without peer access) on its streams of both devices through
    its pinned bounce buffer (:class:`~dmamig.backends.cuda.staging.ChannelStaging`).

    Parameters
    ----------
    index : int
        Channel number within its device.
    backend : CudaBackend
        The backend owning the kernels and peer-access table.
    device : int
        The device whose channel this is.
    """

    def __init__(self, index: int, backend: CudaBackend, device: int = 0):
        self.index = int(index)
        self.device = int(device)
        self._backend = backend
        self._staging: Any = None  # ChannelStaging, made on the first staged copy
        self._retired_staging: list[Any] = []  # outgrown ones, freed at close (queued work may still use them)
        self._cp = backend._cp
        self._rt = backend._rt
        self._streams: dict[int, Any] = {}
        self._scratch: dict[int, tuple[int, int]] = {}  # device -> (descriptor buffer, bytes)
        self._retired: list[tuple[int, int]] = []  # outgrown descriptor buffers, freed at close
        self._lock = threading.Lock()  # counters, busy time, the timing ring
        self._submit_lock = threading.Lock()  # one submission at a time owns the descriptor buffers
        self._counters = dict.fromkeys(CHANNEL_COUNTERS, 0)
        self._busy = 0.0
        self._ring = PendingRing(TIMING_RING)
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
        """GPU time spent on this channel's completed work (CUDA event timing; failed jobs do not count)."""
        with self._lock:
            ready = self._ring.pop_ready(lambda c: c._settled or c._poll())
        for c in ready:
            c._settle()
        with self._lock:
            return self._busy

    def _add_busy(self, seconds: float) -> None:
        with self._lock:
            self._busy += seconds

    @property
    def counters(self) -> dict[str, int]:
        """``kernel_launches``, ``memcpy_calls`` and ``batch_calls`` issued so far, and the device-to-device runs
        and bytes copied directly (``peer_*``) or through host memory (``staged_*``)."""
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
                by_device.setdefault(self._exec_device(w), []).append(w)
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
                try:
                    for dev, items in by_device.items():
                        with cp.cuda.Device(dev):
                            s = self.stream(dev)
                            # Host-side descriptor work first, so the timed span covers the GPU's work only.
                            prepared = [(w, self._prepare(dev, w)) for w in items]
                            begin(dev)
                            for w, desc in prepared:
                                self._issue(dev, s, w, desc)
                    if staged:
                        from .staging import ChannelStaging

                        for w in staged:
                            ChannelStaging.of(self, w).issue(w, begin)
                finally:
                    # Recorded even after a failed issue, so a wait covers what did get queued.
                    for dev in timed:
                        with cp.cuda.Device(dev):
                            end = rt.eventCreateWithFlags(_EVENT_BLOCKING_SYNC)
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
        completion = _CudaCompletion(self, ends, starts, error)
        with self._lock:
            over = self._ring.push(completion)
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
        desc[0] = _ptr(w.src_frames) + (np.repeat(w.src_start, n) + off) * page
        desc[1] = _ptr(w.dst_frames) + (np.repeat(w.dst_start, n) + off) * page
        return desc

    def _issue(self, dev: int, s: Any, w: ChannelWork, desc: np.ndarray | None) -> None:
        b = self._backend
        page = int(w.src_frames.shape[1])
        for key, n in route_counts(w).items():
            self._count(key, n)
        if desc is not None:
            self._gather(dev, s, desc, page)
            return
        if w.method == METHOD_BATCH and b._batch is not None:
            sp, dp = _ptr(w.src_frames), _ptr(w.dst_frames)
            try:
                b._batch.copy((dp + w.dst_start * page).tolist(), (sp + w.src_start * page).tolist(),
                              (w.npages * page).tolist(), s.ptr)
                self._count("batch_calls", 1)
                return
            except Exception as exc:
                b._disable_batch(exc)
        self._memcpy_runs(s, w, page)

    def _memcpy_runs(self, s: Any, w: ChannelWork, page: int) -> None:
        rt = self._rt
        sp, dp = _ptr(w.src_frames), _ptr(w.dst_frames)
        sdev, ddev = _device_of(w.src_frames), _device_of(w.dst_frames)
        # Between two devices cudaMemcpyPeerAsync is always valid: direct over the peer link when peer access
        # is enabled, staged through host memory by the driver when it is not.
        peer = sdev >= 0 and ddev >= 0 and sdev != ddev
        for s0, d0, n in zip(w.src_start.tolist(), w.dst_start.tolist(), w.npages.tolist()):
            if peer:
                rt.memcpyPeerAsync(dp + d0 * page, ddev, sp + s0 * page, sdev, n * page, s.ptr)
            else:
                rt.memcpyAsync(dp + d0 * page, sp + s0 * page, n * page, _MEMCPY_DEFAULT, s.ptr)
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
        self._rt.memcpyAsync(buf, int(desc.ctypes.data), desc.nbytes, _MEMCPY_HOST_TO_DEVICE, s.ptr)
        with s:
            kernel((min(total, MAX_GRID),), (BLOCK_THREADS,),
                   (np.uint64(buf), np.uint64(buf + 8 * total), np.uint64(total), np.uint64(page)))
        self._count("kernel_launches", 1)

    def close(self) -> None:
        """Wait for this channel's work, then release its streams, events and buffers. Idempotent.

        Never raises: after a sticky CUDA error every release is still attempted.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pending = self._ring.drain()
        for c in pending:
            c.wait(None)
        with self._submit_lock:
            streams = list(self._streams.items())
            self._streams.clear()
            buffers = [(d, p) for d, (p, _) in self._scratch.items()] + self._retired
            self._scratch.clear()
            self._retired = []
            staging = self._retired_staging + ([self._staging] if self._staging is not None else [])
            self._staging, self._retired_staging = None, []
        collect_first_error([lambda s=s: s.synchronize() for _, s in streams])
        collect_first_error([lambda d=d, p=p: self._backend._free_device(d, p) for d, p in buffers])
        for st in staging:  # after every stream finished: nothing reads the bounce buffers any more
            st.close()


class CudaBackend:
    """Frames in pinned host memory and on CUDA devices; DMA channels on CUDA streams.

    Parameters
    ----------
    batch_copy : bool, optional
        Let channels use ``cuMemcpyBatchAsync`` for ``METHOD_BATCH`` runs where the driver and ``cuda.bindings``
        offer it. Default: off, unless the environment variable ``DMAMIG_CUDA_BATCH_COPY=1``.
    cupy : module, optional
        The cupy module to drive (imported when omitted). Any object offering the same names works.

    Raises
    ------
    BackendUnavailable
        cupy is missing or no CUDA device is usable.
    """

    name = "cuda"

    def __init__(self, batch_copy: bool | None = None, cupy: Any = None) -> None:
        cp = cupy if cupy is not None else _cupy()
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

    # -- setup -----------------------------------------------------------------------------------------------
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
        enabled; links from ``cudaDeviceGetP2PAttribute``, see :mod:`dmamig.backends.cuda.staging`)."""
        if self._runtime_topology is None:
            from .staging import read_runtime_topology

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
                nv = nvrtc_status(self._cp)
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

    def sync_stream(self, device: int) -> Any:
        """The stream of the synchronous operations (reads, writes, folio copies) on ``device``."""
        with self._lock:
            s = self._sync_streams.get(device)
            if s is None:
                with self._cp.cuda.Device(device):
                    s = self._cp.cuda.Stream(non_blocking=True)
                self._sync_streams[device] = s
            return s

    def _free_device(self, device: int, ptr: int) -> None:
        with self._cp.cuda.Device(device):
            self._rt.free(ptr)

    # -- frames ------------------------------------------------------------------------------------------------
    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> Any:
        """Zero-filled frames: pinned host memory (a numpy array) for ``"host"``, :class:`DeviceFrames` for
        ``"device"``.

        Raises
        ------
        InvalidArgument
            ``kind`` is not ``"host"``/``"device"`` or ``device`` does not exist.
        OutOfMemory
            The allocation failed.
        BackendUnavailable
            The backend is closed, or CUDA failed in a way that makes it unusable.
        """
        self._check_open()
        nr_pages, page_size = int(nr_pages), int(page_size)
        nbytes = nr_pages * page_size
        if kind == "host":
            if nbytes == 0:
                return np.zeros((nr_pages, page_size), dtype=np.uint8)
            try:
                return self._alloc_pinned(nbytes).reshape(nr_pages, page_size)
            except Exception as exc:
                raise map_cuda_error(exc, f"allocating {nbytes} bytes of pinned host frames") from exc
        if kind != "device":
            raise InvalidArgument(f"frame kind must be 'host' or 'device', got {kind!r}")
        if not 0 <= int(device) < self._ndev:
            raise InvalidArgument(f"device {device} does not exist; devices 0..{self._ndev - 1} are visible")
        device = int(device)
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
                collect_first_error([lambda: self._free_device(device, ptr)])
            raise map_cuda_error(exc, f"allocating {nbytes} bytes of frames on device {device}") from exc
        # A machine dropped without close() still gives its device memory back, when the frames are collected.
        frames._finalizer = weakref.finalize(frames, _free_device_memory, self._cp, device, ptr)
        frames._finalizer.atexit = False
        with self._lock:
            self._device_frames.append(weakref.ref(frames))
        return frames

    def _alloc_pinned(self, nbytes: int) -> np.ndarray:
        rt = self._rt
        flags = getattr(rt, "hostAllocPortable", _HOST_ALLOC_PORTABLE) | getattr(rt, "hostAllocMapped",
                                                                                 _HOST_ALLOC_MAPPED)
        ptr = rt.hostAlloc(nbytes, flags)
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
        frames = np.frombuffer(buf, dtype=np.uint8)
        # Freed when the last view of the frames goes (numpy arrays keep their base, and ``buf``, alive).
        # Host frames may outlive the backend in user code, so close() cannot free them under a live view.
        fin = weakref.finalize(buf, _free_host, rt, ptr)
        fin.atexit = False  # at exit the process gives it back; freeing then could pull it from under a view
        frames.fill(0)
        return frames

    def _device_op(self, dev: int, what: str, op: Callable[[Any], Any]) -> Any:
        """Run ``op(stream)`` on device ``dev``'s synchronous stream, wait, and map CUDA errors."""
        self._check_open()
        try:
            with self._sync_locks[dev], self._cp.cuda.Device(dev):
                s = self.sync_stream(dev)
                out = op(s)
                s.synchronize()
            return out
        except DmamigError:
            raise
        except Exception as exc:
            raise map_cuda_error(exc, f"{what} on device {dev}") from exc

    def read_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Host copy of the frames at ``idx`` (synchronous; one copy per run of consecutive frames)."""
        if isinstance(frames, np.ndarray):
            return frames[idx]
        idx = np.asarray(idx, dtype=np.int64)
        page = frames.shape[1]
        out = np.empty((idx.size, page), dtype=np.uint8)
        first, pos, length = run_spans(idx)
        base = _ptr(frames)

        def op(s: Any) -> np.ndarray:
            for f, p, n in zip(first.tolist(), pos.tolist(), length.tolist()):
                self._rt.memcpyAsync(int(out.ctypes.data) + p * page, base + f * page, n * page,
                                     _MEMCPY_DEVICE_TO_HOST, s.ptr)
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
        base = _ptr(frames)

        def op(s: Any) -> None:
            for f, p, n in zip(first.tolist(), pos.tolist(), length.tolist()):
                self._rt.memcpyAsync(base + f * page, int(data.ctypes.data) + p * page, n * page,
                                     _MEMCPY_HOST_TO_DEVICE, s.ptr)

        self._device_op(frames.device, "writing frames", op)

    def zero_frames(self, frames: Any, idx: np.ndarray) -> None:
        """Zero the frames at ``idx`` (synchronous; one memset per run)."""
        if isinstance(frames, np.ndarray):
            frames[idx] = 0
            return
        page = frames.shape[1]
        first, _pos, length = run_spans(idx)
        base = _ptr(frames)

        def op(s: Any) -> None:
            for f, n in zip(first.tolist(), length.tolist()):
                self._rt.memsetAsync(base + f * page, 0, n * page, s.ptr)

        self._device_op(frames.device, "zeroing frames", op)

    def copy_folios(self, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                    nr_pages: np.ndarray, staged: bool = False) -> None:
        """Copy folio by folio on the calling thread: one ``cudaMemcpyAsync`` per folio (``cudaMemcpyPeerAsync``
        between devices) on the device's synchronous-operations stream, and one wait at the end of the batch.
        ``staged`` (two GPUs without peer access): through a pinned bounce buffer, into it on the source's stream,
        then out of it on the destination's (:func:`~dmamig.backends.cuda.staging.stage_folios`).

        The calls and their host time are counted in :attr:`copy_stats`: on a GPU this faithful per-folio copy
        costs one driver call per folio, which is what copy mode measures.
        """
        src_idx = np.asarray(src_idx, dtype=np.int64)
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        nr_pages = np.asarray(nr_pages, dtype=np.int64)
        if not (src_idx.shape == dst_idx.shape == nr_pages.shape) or src_idx.ndim != 1:
            raise InvalidArgument("copy_folios: src_idx, dst_idx and nr_pages must be 1-D of one length")
        cpu_kernels.check_runs(src, dst, src_idx, dst_idx, nr_pages)
        if isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
            cpu_kernels.copy_runs_cached(src, dst, src_idx, dst_idx, nr_pages)
            return
        sdev, ddev = _device_of(src), _device_of(dst)
        if staged and sdev >= 0 and ddev >= 0 and sdev != ddev:
            from .staging import stage_folios

            t0 = time.perf_counter()
            stage_folios(self, src, src_idx, dst, dst_idx, nr_pages)
            with self._lock:
                self._copy_calls += int(src_idx.size)
                self._copy_seconds += time.perf_counter() - t0
            return
        page = int(src.shape[1])
        sp, dp = _ptr(src), _ptr(dst)
        rt = self._rt
        peer = sdev >= 0 and ddev >= 0 and sdev != ddev

        def op(s: Any) -> None:
            for a, b, n in zip(src_idx.tolist(), dst_idx.tolist(), nr_pages.tolist()):
                if peer:
                    rt.memcpyPeerAsync(dp + b * page, ddev, sp + a * page, sdev, n * page, s.ptr)
                else:
                    rt.memcpyAsync(dp + b * page, sp + a * page, n * page, _MEMCPY_DEFAULT, s.ptr)

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

    # -- DMA -------------------------------------------------------------------------------------------------
    def open_channels(self, count: int, device: int = 0) -> list[CudaChannel]:
        """Create ``count`` stream channels of ``device`` (streams are made per device on first use)."""
        self._check_open()
        return [CudaChannel(i, self, device) for i in range(int(count))]

    def pair_ceiling(self, src_dev: int, dst_dev: int, nbytes: int, repeat: int = 3,
                     staged: bool | None = None) -> float:
        """Best seconds of one contiguous copy of ``nbytes`` from device ``src_dev`` to ``dst_dev`` (-1: pinned
        host memory), timed with CUDA events: direct where the pair has peer access, else staged as the DMA
        channels stage it (``staged`` defaults to what :attr:`topology` says); see
        :func:`~dmamig.backends.cuda.staging.cuda_pair_ceiling`.

        Raises
        ------
        InvalidArgument
            A device that does not exist, ``staged`` for a pair that is not two devices, ``nbytes`` or
            ``repeat`` below 1.
        OutOfMemory, DmaError
            The buffers could not be allocated, or a copy failed.
        """
        from ..ceiling import check_pair_args, topology_staged
        from .staging import cuda_pair_ceiling

        src_dev, dst_dev, nbytes, repeat = check_pair_args(src_dev, dst_dev, nbytes, repeat, staged)
        self._check_open()
        if max(src_dev, dst_dev) >= self._ndev:
            raise InvalidArgument(f"device {max(src_dev, dst_dev)} does not exist; devices 0..{self._ndev - 1} "
                                  f"are visible")
        if staged is None:
            staged = topology_staged(self.topology or self.runtime_topology(), src_dev, dst_dev)
        return cuda_pair_ceiling(self, src_dev, dst_dev, nbytes, repeat, bool(staged))

    @property
    def batch_copy_available(self) -> bool:
        """Whether channels use ``cuMemcpyBatchAsync`` (see ``batch_copy_reason`` when not)."""
        return self._batch is not None

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
        dev = max(_device_of(frames), 0)
        func = "page_access_read" if read else "page_access_write"
        kernel = None if page % 16 else self.kernel(dev, "page_access.cu", func)
        if kernel is None:
            if read:
                return self.read_frames(frames, idx)
            self.write_frames(frames, idx, data)
            return None
        addrs = (_ptr(frames) + idx * page).astype(np.uint64)
        nbytes = idx.size * page
        host = np.empty((idx.size, page), dtype=np.uint8) if read else \
            np.ascontiguousarray(data, dtype=np.uint8).reshape(idx.size, page)
        # The dense page buffer starts 256-byte aligned after the address list (uint4 accesses need 16).
        offset = -(-addrs.nbytes // 256) * 256
        rt = self._rt

        def op(s: Any) -> np.ndarray | None:
            buf = self._sync_buffer(dev, offset + nbytes)
            rt.memcpyAsync(buf, int(addrs.ctypes.data), addrs.nbytes, _MEMCPY_HOST_TO_DEVICE, s.ptr)
            if not read:
                rt.memcpyAsync(buf + offset, int(host.ctypes.data), nbytes, _MEMCPY_HOST_TO_DEVICE, s.ptr)
            with s:
                kernel((min(idx.size, MAX_GRID),), (BLOCK_THREADS,),
                       (np.uint64(buf), np.uint64(buf + offset), np.uint64(idx.size), np.uint64(page)))
            if read:
                rt.memcpyAsync(int(host.ctypes.data), buf + offset, nbytes, _MEMCPY_DEVICE_TO_HOST, s.ptr)
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
        dev = max(_device_of(frames), 0)
        kernel = None if page % 16 else self.kernel(dev, "page_checksum.cu", "page_checksum")
        if kernel is None:
            return page_checksums(self.read_frames(frames, idx))
        addrs = (_ptr(frames) + idx * page).astype(np.uint64)
        out = np.empty(idx.size, dtype=np.uint64)
        rt = self._rt

        def op(s: Any) -> np.ndarray:
            buf = self._sync_buffer(dev, 2 * addrs.nbytes)
            rt.memcpyAsync(buf, int(addrs.ctypes.data), addrs.nbytes, _MEMCPY_HOST_TO_DEVICE, s.ptr)
            with s:
                kernel((min(idx.size, MAX_GRID),), (BLOCK_THREADS,),
                       (np.uint64(buf), np.uint64(buf + addrs.nbytes), np.uint64(idx.size), np.uint64(page)))
            rt.memcpyAsync(int(out.ctypes.data), buf + addrs.nbytes, out.nbytes, _MEMCPY_DEVICE_TO_HOST, s.ptr)
            return out

        return self._device_op(dev, "checksumming frames", op)

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

    def copy_ceiling(self, direction: str, nbytes: int, repeat: int = 3) -> float:
        """Best seconds of one ``cudaMemcpyAsync`` of ``nbytes`` contiguous bytes, timed with CUDA events.

        ``"h2d"`` copies pinned host memory to device 0, ``"d2h"`` the reverse, ``"d2d"`` device 0 to device 1
        where two devices exist (a peer copy when peer access is enabled), else within device 0. One untimed
        copy warms up first; the best of ``repeat`` timed copies is returned: the ceiling the migration
        throughput of the same run is compared against. Its buffers are allocated outside CuPy's pools and
        freed before returning.

        Raises
        ------
        InvalidArgument
            ``direction`` is not one of the three.
        OutOfMemory, DmaError
            The buffers could not be allocated, or a copy failed.
        """
        if direction not in ("h2d", "d2h", "d2d"):
            raise InvalidArgument(f"direction must be 'h2d', 'd2h' or 'd2d', got {direction!r}")
        self._check_open()
        cp, rt = self._cp, self._rt
        nbytes = int(nbytes)
        frees: list[Callable[[], Any]] = []
        events: list[int] = []
        try:
            with cp.cuda.Device(0):
                stream = cp.cuda.Stream(non_blocking=True)
                dev0 = rt.malloc(nbytes)
                frees.append(lambda: self._free_device(0, dev0))
                if direction == "d2d":
                    other_dev = 1 if self._ndev > 1 else 0
                    with cp.cuda.Device(other_dev):
                        other = rt.malloc(nbytes)
                    frees.append(lambda: self._free_device(other_dev, other))
                    src, dst = dev0, other
                else:
                    host = rt.hostAlloc(nbytes, _HOST_ALLOC_PORTABLE)
                    frees.append(lambda: rt.freeHost(host))
                    src, dst = (host, dev0) if direction == "h2d" else (dev0, host)
                start, end = rt.eventCreateWithFlags(0), rt.eventCreateWithFlags(_EVENT_BLOCKING_SYNC)
                events += [start, end]
                best = float("inf")
                for i in range(max(1, int(repeat)) + 1):
                    rt.eventRecord(start, stream.ptr)
                    rt.memcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream.ptr)
                    rt.eventRecord(end, stream.ptr)
                    rt.eventSynchronize(end)
                    if i:  # the first copy is the warm-up
                        best = min(best, rt.eventElapsedTime(start, end) / 1e3)
                stream.synchronize()
        except Exception as exc:
            raise map_cuda_error(exc, f"measuring the {direction} copy ceiling") from exc
        finally:
            collect_first_error([lambda e=e: rt.eventDestroy(e) for e in events] + frees)
        return best

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
        calls: list[Callable[[], Any]] = [s.synchronize for s in streams]
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


def _free_device_memory(cp: Any, device: int, ptr: int) -> None:
    try:
        with cp.cuda.Device(device):
            cp.cuda.runtime.free(ptr)
    except Exception:  # a sticky context error: the driver reclaims it with the context
        pass


def _free_host(rt: Any, ptr: int) -> None:
    try:
        rt.freeHost(ptr)
    except Exception:  # at interpreter exit the driver may already be gone
        pass


def nvrtc_check(archs: Iterable[int] = (80, 90)) -> int:
    """Compile every kernel through NVRTC for each ``sm_<arch>`` and print one line each (no GPU needed).

    For CI beside the ``nvcc`` check: ``python -m dmamig.backends.cuda``. Returns the exit code: 0 when all
    compiled, 1 when one failed, 0 with a note when cupy or NVRTC is not installed (nothing to check).
    """
    st = nvrtc_status()
    if not st["found"]:
        print(f"NVRTC compile check skipped: {st['detail']}")
        return 0
    failed = 0
    for fname in KERNEL_FILES:
        for arch in archs:
            try:
                cubin = compile_kernel_nvrtc(fname, arch)
                print(f"nvrtc {st['version']} sm_{arch} {fname}: OK ({len(cubin)} bytes of cubin)")
            except Exception as exc:
                failed += 1
                print(f"nvrtc {st['version']} sm_{arch} {fname}: FAILED: {exc}")
    return 1 if failed else 0

