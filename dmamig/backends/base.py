"""The Backend protocol: where frames live and how they are copied.

A backend owns the frame buffers of every node (a 2-D ``(nr_pages, page_size)`` uint8 array each) and the
synchronous copies the migrating thread performs. The DMA engine's asynchronous channels also come from the
backend: they implement the channel protocol of :mod:`dmamig.dma.channel`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..dma.channel import DmaChannel
from ..errors import InvalidArgument

__all__ = ["DMA_ENGINES", "Backend", "DeviceInfo", "check_choice", "check_dma_engine"]

#: What consumes a device's DMA rings (``Machine(dma_engine=)``): ``"launch"``, one kernel launch per submission
#: (the default), or ``"persistent"``, a consumer kernel that stays resident until its rings go idle (an experiment
#: setting, CUDA only: the CPU backend's polling channels already are persistent consumers).
DMA_ENGINES = ("launch", "persistent")


def check_dma_engine(value: object) -> str:
    """``value`` when it is one of :data:`DMA_ENGINES`.

    Raises
    ------
    InvalidArgument
        Anything else; the message names the setting and the allowed values.
    """
    return check_choice("dma_engine", value, DMA_ENGINES)


def check_choice(setting: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` when it is one of ``allowed``, the values of the string setting named ``setting``.

    Raises
    ------
    InvalidArgument
        Anything else; the message names the setting and the allowed values.
    """
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgument(f"{setting} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


class DeviceInfo(dict):
    """A description of one accelerator: ``name``, ``memory_bytes``, ``peers`` (device ids with peer access),
    ``compute_capability`` (``(major, minor)``)."""


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
                    nr_pages: np.ndarray, staged: bool = False) -> None:
        """Copy folio ``i`` (``nr_pages[i]`` contiguous frames) from ``src[src_idx[i]:]`` to ``dst[dst_idx[i]:]``.

        Runs synchronously on the calling (migrating) thread, one folio after another: the kernel's CPU copy.
        ``staged``: the two devices have no peer access, so each folio goes through a host bounce buffer.
        """

    def devices(self) -> list[DeviceInfo]:
        """Describe the accelerators this backend drives (empty on the CPU backend)."""

    def open_channels(self, count: int, device: int = 0) -> list[DmaChannel]:
        """Create ``count`` DMA channels of ``device`` for a :class:`dmamig.dma.DmaEngine` (one set per device)."""

    def pair_ceiling(self, src_dev: int, dst_dev: int, nbytes: int, repeat: int = 3,
                     staged: bool | None = None) -> float:
        """Best seconds of one contiguous copy of ``nbytes`` from device ``src_dev`` to ``dst_dev`` (-1: host),
        direct where the devices have peer access, staged through host memory where not."""

    def checksum_frames(self, frames: Any, idx: np.ndarray) -> np.ndarray:
        """Per-page checksums (uint64, :func:`dmamig.dma.checksum.page_checksums`) of the frames at ``idx``."""

    @property
    def batch_copy_available(self) -> bool:
        """Whether channels can run ``METHOD_BATCH`` (a batched copy call such as cuMemcpyBatchAsync)."""

    def close(self) -> None:
        """Release everything the backend holds."""
