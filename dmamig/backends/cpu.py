"""The CPU backend: every node's frames are a numpy buffer; DMA channels are worker threads.

Each channel is one long-lived thread fed by a queue. It runs the compiled GIL-free copy kernel of
:mod:`dmamig.backends.cpu_kernels`, so a copy truly overlaps the thread that submitted it (the migrating thread
keeps unmapping the next batch while the channels copy). Completions are ``threading.Event`` objects: waiting
sleeps in the kernel, it never spins.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from ..dma.checksum import page_checksums
from ..dma.plan import METHOD_GATHER
from ..errors import DmaError, InvalidArgument
from . import cpu_kernels
from .base import ChannelWork, DeviceInfo

__all__ = ["CpuBackend", "CpuChannel"]



class _ThreadCompletion:
    """Completion of one channel job: an event plus the error the job raised, if any."""

    __slots__ = ("_event", "error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def _finish(self, error: BaseException | None) -> None:
        self.error = error
        self._event.set()


class CpuChannel:
    """One DMA channel of the CPU backend: a worker thread executing queued work in order.

    Parameters
    ----------
    index : int
        Channel number (names the thread, ``dmamig-dma<index>``).
    """

    def __init__(self, index: int):
        self.index = int(index)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0.0
        self._counters = {"kernel_launches": 0, "memcpy_calls": 0, "batch_calls": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"dmamig-dma{self.index}", daemon=True)
        self._thread.start()

    @property
    def busy_seconds(self) -> float:
        """Seconds the worker has spent inside copy kernels."""
        with self._lock:
            return self._busy

    @property
    def counters(self) -> dict[str, int]:
        """Kernel calls issued so far: ``kernel_launches`` (gather segments), ``memcpy_calls`` (long runs)."""
        with self._lock:
            return dict(self._counters)

    def submit(self, work: list[ChannelWork]) -> _ThreadCompletion:
        """Queue ``work`` for the worker and return its completion immediately."""
        if self._closed:
            raise DmaError(f"DMA channel {self.index} is closed; open a new engine to copy")
        completion = _ThreadCompletion()
        self._queue.put((work, completion))
        return completion

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, completion = item
            error: BaseException | None = None
            start = time.perf_counter()
            try:
                self._execute(work)
            except BaseException as exc:  # reported through the fence, never lost in the worker
                error = exc
            elapsed = time.perf_counter() - start
            with self._lock:
                self._busy += elapsed
            completion._finish(error)

    def _execute(self, work: list[ChannelWork]) -> None:
        """Run one job on the worker thread (GIL released inside the kernels)."""
        for w in work:
            cpu_kernels.copy_runs_stream(w.src_frames, w.dst_frames, w.src_start, w.dst_start, w.npages)
            # Bookkeeping mirrors what a GPU channel issues: one call per long run, one launch per segment of
            # short runs. The CPU kernel copies both kinds in the same loop.
            with self._lock:
                if w.method == METHOD_GATHER:
                    self._counters["kernel_launches"] += 1
                else:
                    self._counters["memcpy_calls"] += int(w.npages.size)

    def close(self) -> None:
        """Let queued work finish, then stop the worker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


class CpuBackend:
    """Frames in numpy buffers; "device memory" is a separate numpy buffer per device node.

    Frame buffers are page-aligned (as physical frames are), which lets the DMA channels use the streaming
    copy kernel.
    """

    name = "cpu"

    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> np.ndarray:
        """Allocate a zero-filled, page-aligned ``(nr_pages, page_size)`` uint8 buffer."""
        return cpu_kernels.aligned_zeros(int(nr_pages), int(page_size))

    def read_frames(self, frames: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return frames[idx]

    def write_frames(self, frames: np.ndarray, idx: np.ndarray, data: np.ndarray) -> None:
        frames[idx] = data

    def zero_frames(self, frames: np.ndarray, idx: np.ndarray) -> None:
        frames[idx] = 0

    def copy_folios(self, src: np.ndarray, src_idx: np.ndarray, dst: np.ndarray, dst_idx: np.ndarray,
                    nr_pages: np.ndarray) -> None:
        """Copy folio ``i`` (``nr_pages[i]`` frames) from ``src[src_idx[i]:]`` to ``dst[dst_idx[i]:]``.

        Runs on the calling (migrating) thread, one folio after another with an ordinary cached ``memcpy``,
        as the kernel's ``folio_copy()`` does; one compiled call covers the whole batch of folios.
        """
        src_idx = np.asarray(src_idx, dtype=np.int64)
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        nr_pages = np.asarray(nr_pages, dtype=np.int64)
        if not (src_idx.shape == dst_idx.shape == nr_pages.shape) or src_idx.ndim != 1:
            raise InvalidArgument(f"copy_folios: src_idx, dst_idx and nr_pages must be 1-D of one length, got "
                                  f"{src_idx.shape}, {dst_idx.shape}, {nr_pages.shape}")
        cpu_kernels.check_runs(src, dst, src_idx, dst_idx, nr_pages)
        cpu_kernels.copy_runs_cached(src, dst, src_idx, dst_idx, nr_pages)

    def devices(self) -> list[DeviceInfo]:
        return []

    def open_channels(self, count: int) -> list[CpuChannel]:
        """Start ``count`` worker-thread channels (compiling the copy kernels first, if not cached yet)."""
        cpu_kernels.warm_up()
        return [CpuChannel(i) for i in range(int(count))]

    def checksum_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Checksums of the frames at ``idx`` with the numpy reference."""
        return page_checksums(frames[np.asarray(idx, dtype=np.int64)])

    @property
    def batch_copy_available(self) -> bool:
        """The CPU backend has no batched copy call; the planner never picks ``METHOD_BATCH`` here."""
        return False

    def close(self) -> None:
        pass
