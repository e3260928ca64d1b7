"""The CUDA backend's synchronous operations on frames, each run on its device's synchronous stream and waited
for: allocation, reads, writes and zeroing (one copy or memset per run of consecutive frames), a device's own
access through the ``page_access`` kernels, and per-page checksums with the ``page_checksum`` kernel.

:class:`FrameOpsMixin` is part of :class:`~dmamig.backends.cuda.CudaBackend`; it uses the backend's runtime
(``_rt``, ``_cp``), its lock and per-device synchronous-stream state, and its kernel cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ...dma.checksum import page_checksums
from ...errors import DmamigError, InvalidArgument
from .codes import _MEMCPY_DEVICE_TO_HOST, _MEMCPY_HOST_TO_DEVICE, collect_first_error, map_cuda_error
from .kernels import launch
from .memory import DeviceFrames, _device_of, _free_device_memory, _ptr, pinned_frames, run_spans

__all__ = ["FrameOpsMixin"]


class FrameOpsMixin:
    """Frames and the synchronous operations on them, for :class:`~dmamig.backends.cuda.CudaBackend`."""

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
                return pinned_frames(self._rt, nbytes).reshape(nr_pages, page_size)
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
            launch(kernel, s, idx.size,
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
            launch(kernel, s, idx.size,
                   (np.uint64(buf), np.uint64(buf + addrs.nbytes), np.uint64(idx.size), np.uint64(page)))
            rt.memcpyAsync(int(out.ctypes.data), buf + addrs.nbytes, out.nbytes, _MEMCPY_DEVICE_TO_HOST, s.ptr)
            return out

        return self._device_op(dev, "checksumming frames", op)
