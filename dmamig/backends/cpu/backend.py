"""The CPU backend: every node's frames are a numpy buffer; DMA channels are worker threads.

Each channel is one long-lived thread running the compiled GIL-free copy kernels of
:mod:`dmamig.backends.cpu.copy_loops`, so a copy truly overlaps the thread that submitted it. By default a channel
polls (:mod:`dmamig.backends.cpu.polling_channel`): its worker watches a doorbell ring in compiled code, as a copy
engine does, and waiters poll the completion word, as the kernel's ``dma_sync_wait()`` does, each for at most
``poll_us`` before sleeping. With ``poll_us = 0`` channels sleep between jobs (:mod:`dmamig.backends.cpu.channel`):
every submission then costs the host's thread wake-ups. This module holds :class:`CpuBackend`: frame buffers, the
migrating thread's own folio copies, channels, checksums and copy ceilings.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ...dma.channel import DEFAULT_POLL_US
from ...dma.checksum import page_checksums
from ...dma.ring import RingSet
from ...dma.staging import STAGE_BYTES, stage_capacity
from ...errors import InvalidArgument
from ..base import DeviceInfo, check_dma_engine
from ..ceiling import check_pair_args, topology_staged
from . import copy_loops, ring_consumer
from .channel import CpuChannel
from .polling_channel import PollingCpuChannel

__all__ = ["CpuBackend", "numpy_pair_ceiling"]


class CpuBackend:
    """Frames in numpy buffers; "device memory" is a separate numpy buffer per device node.

    Frame buffers are page-aligned (as physical frames are), which lets the DMA channels use the streaming
    copy kernel.
    """

    name = "cpu"
    #: Microseconds a DMA channel's worker polls its doorbell, and a waiter its completion, before sleeping
    #: (set by :class:`~dmamig.machine.Machine`); 0: channels sleep between jobs. Where the polling loop cannot
    #: run (no numba, or an OS without ``sched_yield``) channels sleep whatever this says.
    poll_us: float = DEFAULT_POLL_US
    #: The machine's topology (set by :class:`~dmamig.machine.Machine`); ``None``: every pair has peer access.
    topology: Any = None
    # Per migrating thread, its bounce buffer for staged folio copies (used synchronously by that thread only).
    _local = threading.local()

    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> np.ndarray:
        """Allocate a zero-filled, page-aligned ``(nr_pages, page_size)`` uint8 buffer."""
        return copy_loops.aligned_zeros(int(nr_pages), int(page_size))

    def read_frames(self, frames: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return frames[idx]

    def write_frames(self, frames: np.ndarray, idx: np.ndarray, data: np.ndarray) -> None:
        frames[idx] = data

    def zero_frames(self, frames: np.ndarray, idx: np.ndarray) -> None:
        frames[idx] = 0

    def access_frames(self, frames: np.ndarray, idx: np.ndarray, data: np.ndarray | None = None) -> np.ndarray | None:
        """A device's own access to whole frames: read them (``data`` None) or store ``data`` into them.

        The numpy reference of the CUDA backend's ``page_access`` kernels (``kernels/page_access.cu``):
        a read gathers ``frames[idx]`` into a host array, a write scatters ``data`` rows to ``frames[idx]``.
        """
        idx = np.asarray(idx, dtype=np.int64)
        if data is None:
            return frames[idx]
        frames[idx] = data
        return None

    def copy_folios(self, src: np.ndarray, src_idx: np.ndarray, dst: np.ndarray, dst_idx: np.ndarray,
                    nr_pages: np.ndarray, staged: bool = False) -> None:
        """Copy folio ``i`` (``nr_pages[i]`` frames) from ``src[src_idx[i]:]`` to ``dst[dst_idx[i]:]``.

        Runs on the calling (migrating) thread, one folio after another with an ordinary cached ``memcpy``,
        as the kernel's ``folio_copy()`` does; one compiled call covers the whole batch of folios. ``staged``
        (two devices without peer access): through the calling thread's host bounce buffer, two copies each.
        """
        src_idx = np.asarray(src_idx, dtype=np.int64)
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        nr_pages = np.asarray(nr_pages, dtype=np.int64)
        if not (src_idx.shape == dst_idx.shape == nr_pages.shape) or src_idx.ndim != 1:
            raise InvalidArgument(f"copy_folios: src_idx, dst_idx and nr_pages must be 1-D of one length, got "
                                  f"{src_idx.shape}, {dst_idx.shape}, {nr_pages.shape}")
        copy_loops.check_runs(src, dst, src_idx, dst_idx, nr_pages)
        if staged:
            copy_loops.copy_runs_staged(src, dst, self._thread_bounce(int(src.shape[1])), src_idx, dst_idx,
                                         nr_pages, stream=False)
        else:
            copy_loops.copy_runs_cached(src, dst, src_idx, dst_idx, nr_pages)

    def _thread_bounce(self, page: int) -> np.ndarray:
        b = getattr(self._local, "bounce", None)
        if b is None or b.shape != (stage_capacity(page), page):
            b = self._local.bounce = copy_loops.aligned_zeros(stage_capacity(page), page)
        return b

    def devices(self) -> list[DeviceInfo]:
        return []

    def frames_address(self, frames: Any) -> tuple[int, int] | None:
        """Where a node's frames are, for the DMA rings: ``(address, bytes)`` of a C-contiguous buffer."""
        if isinstance(frames, np.ndarray) and frames.flags.c_contiguous:
            return int(frames.ctypes.data), int(frames.nbytes)
        return None

    def set_dma_engine(self, dma_engine: str) -> None:
        """``Machine(dma_engine=)``: only the default, ``"launch"``, is taken here (it changes nothing).

        ``"persistent"`` names the CUDA backend's resident consumer kernel. The CPU backend has no per-submission
        launch to replace: its polling channels already are persistent consumers (a worker watches its ring's
        tail and sleeps after an idle window of ``dma_poll_us``), so asking for the experiment here is refused
        rather than recorded as if it had run.

        Raises
        ------
        InvalidArgument
            ``"persistent"``, or a value that is neither.
        """
        if check_dma_engine(dma_engine) == "persistent":
            raise InvalidArgument("dma_engine='persistent' is a CUDA backend setting: the CPU backend's polling "
                                  "channels already are persistent consumers (their idle window is dma_poll_us); "
                                  "use dma_engine='launch' (the default) on the CPU backend")

    @property
    def polling(self) -> bool:
        """Whether new DMA channels poll (``poll_us > 0`` and the polling loop can run here)."""
        return self.poll_us > 0 and ring_consumer.RING_AVAILABLE

    def open_channels(self, count: int, device: int = 0) -> list[CpuChannel]:
        """Start ``count`` worker-thread channels of ``device`` (compiling the copy kernels first, if needed):
        polling channels over one :class:`~dmamig.dma.ring.RingSet` while :attr:`polling`, else channels that
        sleep between jobs."""
        copy_loops.warm_up()
        if self.polling:
            ring_consumer.warm_up()
            rings = RingSet(int(count))
            return [PollingCpuChannel(i, device, self.poll_us, rings.rings[i]) for i in range(int(count))]
        return [CpuChannel(i, device) for i in range(int(count))]

    def pair_ceiling(self, src_dev: int, dst_dev: int, nbytes: int, repeat: int = 3,
                     staged: bool | None = None) -> float:
        """Best seconds of one ``np.copyto`` of ``nbytes`` from device ``src_dev`` to ``dst_dev`` (-1: host).

        Where the pair has no peer access (``staged``; by default as :attr:`topology` says) the copy goes in
        :data:`~dmamig.dma.staging.STAGE_BYTES` chunks through a host bounce buffer, two ``np.copyto`` each, as
        a staged DMA copy does. One untimed copy warms up first; the best of ``repeat`` is returned.

        Raises
        ------
        InvalidArgument
            A device id below -1, a pair outside the topology, ``staged`` for a pair that is not two devices,
            ``nbytes`` or ``repeat`` below 1.
        """
        src_dev, dst_dev, nbytes, repeat = check_pair_args(src_dev, dst_dev, nbytes, repeat, staged)
        if staged is None:
            staged = topology_staged(self.topology, src_dev, dst_dev)
        return numpy_pair_ceiling(nbytes, repeat, bool(staged))

    def touch_frames(self, frames: np.ndarray, idx: np.ndarray) -> int:
        """A device's read of every byte of the frames at ``idx``, with nothing copied out (a compiled pass).

        Returns the XOR of the pages' 64-bit words. The CUDA backend reads with its checksum kernel instead.
        """
        return copy_loops.xor_pages(frames, idx)

    def checksum_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Checksums of the frames at ``idx`` with the numpy reference."""
        return page_checksums(frames[np.asarray(idx, dtype=np.int64)])

    @property
    def batch_copy_available(self) -> bool:
        """The CPU backend has no batched copy call; the planner never picks ``METHOD_BATCH`` here."""
        return False

    def close(self) -> None:
        pass


def numpy_pair_ceiling(nbytes: int, repeat: int, staged: bool) -> float:
    """Best seconds of ``np.copyto`` of ``nbytes`` between two page-aligned buffers, ``staged`` through a host
    bounce buffer in :data:`~dmamig.dma.staging.STAGE_BYTES` chunks (two copies each, as a staged DMA copy)."""
    src = copy_loops.aligned_zeros(1, nbytes)[0]
    dst = copy_loops.aligned_zeros(1, nbytes)[0]
    src.fill(1)  # touched, so that the timed copies do not pay first-touch page faults
    dst.fill(0)
    step = min(nbytes, STAGE_BYTES)
    bounce = copy_loops.aligned_zeros(1, step)[0] if staged else None
    best = float("inf")
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        if bounce is None:
            np.copyto(dst, src)
        else:
            for a in range(0, nbytes, step):
                n = min(step, nbytes - a)
                np.copyto(bounce[:n], src[a:a + n])  # hop 1: into host memory
                np.copyto(dst[a:a + n], bounce[:n])  # hop 2: out of it, after hop 1
        if i:  # the first copy is the warm-up
            best = min(best, time.perf_counter() - t0)
    return best
