"""The CPU backend: every node's frames are a numpy buffer; DMA channels are worker threads."""

from __future__ import annotations

import numpy as np

from .base import DeviceInfo

__all__ = ["CpuBackend"]


class CpuBackend:
    """Frames in numpy buffers; "device memory" is a separate numpy buffer per device node."""

    name = "cpu"

    def alloc_frames(self, kind: str, device: int, nr_pages: int, page_size: int) -> np.ndarray:
        return np.zeros((nr_pages, page_size), dtype=np.uint8)

    def read_frames(self, frames: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return frames[idx]

    def write_frames(self, frames: np.ndarray, idx: np.ndarray, data: np.ndarray) -> None:
        frames[idx] = data

    def zero_frames(self, frames: np.ndarray, idx: np.ndarray) -> None:
        frames[idx] = 0

    def copy_folios(self, src: np.ndarray, src_idx: np.ndarray, dst: np.ndarray, dst_idx: np.ndarray,
                    nr_pages: np.ndarray) -> None:
        # One folio at a time, as the kernel's folio_copy() does on the migrating thread.
        for s, d, n in zip(src_idx.tolist(), dst_idx.tolist(), nr_pages.tolist()):
            dst[d:d + n] = src[s:s + n]

    def devices(self) -> list[DeviceInfo]:
        return []

    def close(self) -> None:
        pass
