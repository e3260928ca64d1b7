"""Staged device-to-device copies: the shared plan both backends execute where two devices lack peer access.

Without peer access a copy from device A to device B goes through host memory: device A to a pinned host bounce
buffer, then the bounce buffer to device B, the second copy ordered after the first. Each DMA channel owns one
bounce buffer of :data:`STAGE_BYTES` per slot; a segment's runs are cut into *chunks* that fit one slot, and
each chunk is copied in (hop 1) and out (hop 2) before its slot is reused. The CPU backend runs the two hops one
after the other on the channel's worker; the CUDA backend runs hop 1 on the source device's stream and hop 2 on
the destination's, ordered by an event, with two slots so that chunk k + 1 comes in while chunk k goes out.

:func:`stage_chunks` is the vectorized cut both use: no Python loop over runs or pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument

__all__ = ["STAGE_BYTES", "StagedPieces", "stage_capacity", "stage_chunks"]

#: Bytes of one bounce-buffer slot per channel. Big enough that a copy-engine call moves a few MiB at a time
#: (its 2-7 us submission cost vanishes), small enough to stay in the last-level cache on the CPU backend.
STAGE_BYTES = 4 << 20


def stage_capacity(page_size: int, stage_bytes: int | None = None) -> int:
    """Pages per bounce-buffer slot of ``stage_bytes`` (default :data:`STAGE_BYTES`), at least one page."""
    return max(1, int(STAGE_BYTES if stage_bytes is None else stage_bytes) // int(page_size))


@dataclass(frozen=True)
class StagedPieces:
    """Runs cut to fit bounce-buffer slots, in source order.

    Attributes
    ----------
    src_start, dst_start, npages : numpy.ndarray
        int64 pieces of the original runs (a run crossing a slot boundary becomes two pieces).
    bounce_start : numpy.ndarray
        int64 first page of each piece within its slot.
    chunk_start, chunk_end : numpy.ndarray
        int64 bounds of each chunk's pieces: chunk ``k`` is ``pieces[chunk_start[k]:chunk_end[k]]`` and fills
        pages ``0..`` of a slot contiguously.
    """

    src_start: np.ndarray
    dst_start: np.ndarray
    npages: np.ndarray
    bounce_start: np.ndarray
    chunk_start: np.ndarray
    chunk_end: np.ndarray

    @property
    def nr_chunks(self) -> int:
        """Number of chunks (slot fills)."""
        return int(self.chunk_start.size)

    def chunk(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(src_start, dst_start, npages, bounce_start)`` of chunk ``k``."""
        s = slice(int(self.chunk_start[k]), int(self.chunk_end[k]))
        return self.src_start[s], self.dst_start[s], self.npages[s], self.bounce_start[s]

    def chunk_pages(self, k: int) -> int:
        """Pages in chunk ``k``."""
        return int(self.npages[int(self.chunk_start[k]):int(self.chunk_end[k])].sum())


def stage_chunks(src_start: np.ndarray, dst_start: np.ndarray, npages: np.ndarray, capacity: int) -> StagedPieces:
    """Cut runs into pieces that pack, in order, into bounce-buffer slots of ``capacity`` pages.

    Parameters
    ----------
    src_start, dst_start, npages : numpy.ndarray
        int64 runs (frame units), as in a :class:`~dmamig.dma.channel.ChannelWork`.
    capacity : int
        Pages per slot (:func:`stage_capacity`).

    Returns
    -------
    StagedPieces
    """
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise InvalidArgument(f"capacity must be an integer >= 1, got {capacity!r}")
    src_start = np.asarray(src_start, dtype=np.int64)
    dst_start = np.asarray(dst_start, dtype=np.int64)
    npages = np.asarray(npages, dtype=np.int64)
    keep = npages > 0
    if not keep.all():
        src_start, dst_start, npages = src_start[keep], dst_start[keep], npages[keep]
    if npages.size == 0:
        e = np.empty(0, dtype=np.int64)
        return StagedPieces(e, e, e, e, e, e)
    # Lay the runs end to end; cut at every run start and at every slot boundary, then read each piece back.
    run_at = np.cumsum(npages) - npages
    total = int(run_at[-1] + npages[-1])
    cuts = np.union1d(run_at, np.arange(0, total, capacity, dtype=np.int64))
    length = np.diff(np.append(cuts, total))
    run = np.searchsorted(run_at, cuts, side="right") - 1
    offset = cuts - run_at[run]
    chunk = cuts // capacity
    brk = np.flatnonzero(np.diff(chunk)) + 1
    return StagedPieces(src_start[run] + offset, dst_start[run] + offset, length, cuts - chunk * capacity,
                        np.concatenate(([0], brk)).astype(np.int64), np.append(brk, cuts.size).astype(np.int64))
