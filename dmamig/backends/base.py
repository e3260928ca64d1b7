"""The Backend protocol: where frames live and how they are copied.

A backend owns the frame buffers of every node (a 2-D ``(nr_pages, page_size)`` uint8 array each) and the
synchronous copies the migrating thread performs. The DMA engine's asynchronous channels also come from the
backend (see :mod:`dmamig.dma.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "ChannelWork", "Completion", "DeviceInfo", "DmaChannel"]


class DeviceInfo(dict):
    """A description of one accelerator: ``name``, ``memory_bytes``, ``peers`` (device ids with peer access),
    ``compute_capability`` (``(major, minor)``)."""


@dataclass(frozen=True)
class ChannelWork:
    """One homogeneous piece of a channel's work: runs of one method between two nodes' frame buffers.

    Attributes
    ----------
    src_frames, dst_frames : Any
        The backend frame buffers (``node.frames``) of the source and destination nodes.
    src_kind, dst_kind : str
        ``"host"`` or ``"device"``.
    src_device, dst_device : int
        Accelerator index of each side (-1 for host RAM).
    method : int
        ``dmamig.dma.plan.METHOD_*``.
    src_start, dst_start, npages : numpy.ndarray
        int64 run descriptors in frame units, validated by the engine.
    """

    src_frames: Any
    dst_frames: Any
    src_kind: str
    dst_kind: str
    src_device: int
    dst_device: int
    method: int
    src_start: np.ndarray
    dst_start: np.ndarray
    npages: np.ndarray


@runtime_checkable
class Completion(Protocol):
    """Completion of one channel's share of a submission."""

    error: BaseException | None

    def done(self) -> bool:
        """Whether the work has finished (successfully or not); never blocks."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished or ``timeout`` seconds passed; ``True`` when finished. Never busy-spins."""


@runtime_checkable
class DmaChannel(Protocol):
    """One asynchronous copy queue: a worker thread on the CPU backend, a CUDA stream per device on CUDA.

    Work submitted to one channel runs in submission order; different channels run concurrently.
    """

    index: int

    def submit(self, work: list[ChannelWork]) -> Completion:
        """Queue ``work`` (executed in order) and return at once with its completion."""

    @property
    def busy_seconds(self) -> float:
        """Seconds this channel has spent copying (completed work only)."""

    @property
    def counters(self) -> dict[str, int]:
        """``kernel_launches``, ``memcpy_calls`` and ``batch_calls`` issued so far."""

    def close(self) -> None:
        """Finish queued work and release the channel. Idempotent."""


@runtime_checkable
class Backend(Protocol):
    """What the machine and the migration core need from a backend."""

    name: str

    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> Any:
        """Allocate one node's frame buffer, zero-filled: host frames (pinned where it matters) or device."""

    def read_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Return a host copy, shape ``(len(idx), page_size)``, of the frames at ``idx``."""

    def write_frames(self, frames: Any, idx: np.ndarray, data: np.ndarray) -> None:
        """Store ``data`` (``(len(idx), page_size)`` uint8 on the host) into the frames at ``idx``."""

    def zero_frames(self, frames: Any, idx: np.ndarray) -> None:
        """Zero the frames at ``idx`` (a fresh page must not show a previous owner's bytes)."""

    def copy_folios(self, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                    nr_pages: np.ndarray) -> None:
        """Copy folio ``i`` (``nr_pages[i]`` contiguous frames) from ``src[src_idx[i]:]`` to ``dst[dst_idx[i]:]``.

        Runs synchronously on the calling (migrating) thread, one folio after another: the kernel's CPU copy.
        """

    def devices(self) -> list[DeviceInfo]:
        """Describe the accelerators this backend drives (empty on the CPU backend)."""

    def open_channels(self, count: int) -> list[DmaChannel]:
        """Create ``count`` DMA channels for a :class:`dmamig.dma.DmaEngine`."""

    def checksum_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Per-page checksums (uint64, :func:`dmamig.dma.checksum.page_checksums`) of the frames at ``idx``."""

    @property
    def batch_copy_available(self) -> bool:
        """Whether channels can run ``METHOD_BATCH`` (a batched copy call such as cuMemcpyBatchAsync)."""

    def close(self) -> None:
        """Release everything the backend holds."""
