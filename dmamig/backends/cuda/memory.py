"""Frame memory outside CuPy's pools: device frames (``cudaMalloc``), pinned host memory (``cudaHostAlloc``,
portable and mapped), their addresses, and how each is given back.

Host RAM frames are pinned: copies from them are truly asynchronous and, under unified virtual addressing, the
host pointer is also a device pointer, so the kernels read and write host pages directly. A device node's frames
may live there too (:data:`HOST_MAPPED`, ``Machine(device_frames="host-mapped")``), so that the migrating CPU
copies them: the ``cpu`` copy baseline on CUDA. Device frames are
plain ``cudaMalloc`` allocations (:class:`DeviceFrames`), outside CuPy's memory pools, so closing the backend
gives every byte back to the driver instead of leaving it cached in a pool.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

from ...errors import DmaError, InvalidArgument
from ..base import check_choice
from .codes import HOST_ALLOC_MAPPED, HOST_ALLOC_PORTABLE

__all__ = ["DEVICE_FRAMES", "HOST_MAPPED", "DeviceFrames", "alloc_pinned", "check_device_frames", "device_of",
           "frames_ptr", "free_device_memory", "pinned_frames", "pinned_words", "run_spans"]

#: Device frames in pinned, mapped host memory (``Machine(device_frames="host-mapped")``): what the migrating CPU
#: copies into when it can address device memory, as over a cache-coherent link (Grace Hopper C2C).
HOST_MAPPED = "host-mapped"
#: Where a device node's frames live on CUDA (``Machine(device_frames=)``): ``"device"`` (``cudaMalloc``, the
#: default) or :data:`HOST_MAPPED`, the memory of the copy baseline ``cpu`` (``dmamig bench --copy-baseline cpu``).
DEVICE_FRAMES = ("device", HOST_MAPPED)


def check_device_frames(value: object) -> str:
    """``value`` when it is one of :data:`DEVICE_FRAMES`.

    Raises
    ------
    InvalidArgument
        Anything else; the message names the setting and the allowed values.
    """
    return check_choice("device_frames", value, DEVICE_FRAMES)


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

    def own(self, cp: Any) -> None:
        """Free the memory (with ``cp``'s runtime) once: at :meth:`release`, or when the frames are collected, so
        that a machine dropped without ``close()`` still gives its device memory back."""
        self._finalizer = weakref.finalize(self, free_device_memory, cp, self.device, self.ptr)
        self._finalizer.atexit = False

    def release(self) -> None:
        """Give the memory back now, once; any later use raises instead of touching freed memory."""
        self.ptr = 0
        if self._finalizer is not None:
            self._finalizer()  # frees once; collecting the frames later does nothing

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


def frames_ptr(frames: Any) -> int:
    """Base address of a frame buffer: numpy (pinned host) or :class:`DeviceFrames`."""
    if isinstance(frames, np.ndarray):
        return int(frames.ctypes.data)
    if isinstance(frames, DeviceFrames):
        if frames.released:
            raise DmaError(f"{frames!r}: its backend was closed; create a new Machine")
        return frames.ptr
    raise InvalidArgument(f"frames must be a numpy array or DeviceFrames, got {type(frames).__name__}")


def device_of(frames: Any) -> int:
    """Device id of a frame buffer, -1 for host memory."""
    return frames.device if isinstance(frames, DeviceFrames) else -1


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


def alloc_pinned(rt: Any, nbytes: int) -> int:
    """Address of ``nbytes`` of pinned host memory, portable (pinned for every device) and mapped
    (device-addressable); the caller frees it with ``rt.freeHost``."""
    flags = getattr(rt, "hostAllocPortable", HOST_ALLOC_PORTABLE) | getattr(rt, "hostAllocMapped", HOST_ALLOC_MAPPED)
    return int(rt.hostAlloc(nbytes, flags))


def pinned_words(rt: Any, shape: tuple[int, ...], owned: list[int]) -> np.ndarray:
    """Zero-filled int64 words of ``shape`` in pinned, device-mapped host memory (:func:`alloc_pinned`), for
    rings and flags that host and device both read and write; the address goes to ``owned``, whose owner frees
    it with ``rt.freeHost`` once the device no longer reads it (never a finalizer: a kernel may still run)."""
    n = int(np.prod(shape))
    ptr = alloc_pinned(rt, 8 * n)
    owned.append(ptr)
    arr = np.frombuffer((ctypes.c_int64 * n).from_address(ptr), dtype=np.int64).reshape(shape)
    arr.fill(0)
    return arr


def pinned_frames(rt: Any, nbytes: int) -> np.ndarray:
    """``nbytes`` of zero-filled pinned host memory (:func:`alloc_pinned`) as a flat ``uint8`` array, freed
    when the last view of it goes."""
    ptr = alloc_pinned(rt, nbytes)
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    frames = np.frombuffer(buf, dtype=np.uint8)
    # Freed when the last view of the frames goes (numpy arrays keep their base, and ``buf``, alive).
    # Host frames may outlive the backend in user code, so close() cannot free them under a live view.
    fin = weakref.finalize(buf, _free_host, rt, ptr)
    fin.atexit = False  # at exit the process gives it back; freeing then could pull it from under a view
    frames.fill(0)
    return frames


def free_device_memory(cp: Any, device: int, ptr: int) -> None:
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
