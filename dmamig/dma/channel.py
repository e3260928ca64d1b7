"""The channel protocol the DMA engine owns: a piece of channel work, its completion, and a channel.

A backend implements :class:`DmaChannel` (the CPU backend's worker threads, the CUDA backend's streams and ring
lanes); the engine (:mod:`dmamig.dma.engine`) hands each channel its :class:`ChannelWork` and waits on the
:class:`Completion` it returns. Copies between two nodes that a lane's rings take go through
:mod:`dmamig.dma.ring` instead, the descriptor ring the channels consume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["CHANNEL_COUNTERS", "DEFAULT_POLL_US", "ChannelWork", "Completion", "DmaChannel", "exec_device",
           "route_counts"]


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
        ``dmamig.dma.copy_plan.METHOD_*``.
    src_start, dst_start, npages : numpy.ndarray
        int64 run descriptors in frame units, validated by the engine.
    staged : bool
        A copy between two devices without peer access: the channel stages it through its pinned host bounce
        buffer (two copies, see :mod:`dmamig.dma.staging`) instead of copying directly.
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
    staged: bool = False

    @property
    def between_devices(self) -> bool:
        """Whether this work copies between two different devices (a peer or a staged copy)."""
        return self.src_kind == self.dst_kind == "device" and self.src_device != self.dst_device

    @property
    def exec_device(self) -> int:
        """The device whose channels run this work (see :func:`exec_device`)."""
        return exec_device(self.src_kind, self.src_device, self.dst_kind, self.dst_device)


def exec_device(src_kind: str, src_device: int, dst_kind: str, dst_device: int) -> int:
    """The device whose channels run a copy: the destination's GPU where there is one (a DMA engine pushes
    writes), else the source's; copies between host nodes go to device 0's channels."""
    if dst_kind == "device":
        return int(dst_device)
    if src_kind == "device":
        return int(src_device)
    return 0


#: Microseconds a waiter polls a DMA completion before it sleeps (and, on the CPU backend, a channel's worker its
#: doorbell after its last job), as the kernel's ``dma_sync_wait()`` polls a copy engine: longer than the state
#: work between two faithful batches (~70-100 us per 512 pages), short enough that an idle engine soon stops.
DEFAULT_POLL_US = 1000.0

#: Counters every channel keeps (``DmaChannel.counters``): calls issued, and device-to-device copies by route
#: (``peer_*`` direct, ``staged_*`` through host memory; runs as planned, bytes copied between the devices).
CHANNEL_COUNTERS = ("kernel_launches", "memcpy_calls", "batch_calls", "peer_runs", "peer_bytes", "staged_runs",
                    "staged_bytes")


def route_counts(w: ChannelWork) -> dict[str, int]:
    """The ``peer_*`` or ``staged_*`` counter increments of one piece of work (empty when not device to device)."""
    if not w.between_devices:
        return {}
    key = "staged" if w.staged else "peer"
    return {f"{key}_runs": int(w.npages.size), f"{key}_bytes": int(w.npages.sum()) * int(w.src_frames.shape[1])}


@runtime_checkable
class Completion(Protocol):
    """Completion of one channel's share of a submission."""

    error: BaseException | None

    def done(self) -> bool:
        """Whether the work has finished (successfully or not); never blocks."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished or ``timeout`` seconds passed; ``True`` when finished. Polls for at most a
        bounded window (a polling CPU channel's ``poll_us``), then sleeps."""


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
        """The :data:`CHANNEL_COUNTERS` so far: calls issued, peer and staged device-to-device runs and bytes."""

    def close(self) -> None:
        """Finish queued work and release the channel. Idempotent."""
