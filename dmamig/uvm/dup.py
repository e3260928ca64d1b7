"""Read duplication: a device keeps read-only copies of pages that stay where they are.

UVM's read-mostly memory: a device read fault on a page resident elsewhere copies it into a device frame
and leaves the original mapped, so the CPU and every device read their own copy. Any write collapses the
copies: the address space's notifier (:meth:`~dmamig.AddressSpace.register_notifier`) drops them before the
CPU writes, unmaps or closes, and a device write drops them before it faults the page in for itself.

The copies are frames the driver owns (no mapping, off the LRU), so page migration never touches them;
they are kept in two sorted arrays (virtual page address, device pfn), never an object per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import DmaError

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..machine import Machine

__all__ = ["ReadDuplicates"]


class ReadDuplicates:
    """Read-only device copies of one address space's pages on one device node."""

    def __init__(self, m: Machine, node: int):
        self.m, self.node = m, node
        self.addrs = np.empty(0, dtype=np.int64)
        self.pfns = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.addrs.size)

    def lookup(self, addrs: np.ndarray) -> np.ndarray:
        """The copy's device pfn of each page address, ``-1`` where there is none (lock held)."""
        out = np.full(addrs.size, -1, dtype=np.int64)
        if self.addrs.size:
            pos = np.minimum(np.searchsorted(self.addrs, addrs), self.addrs.size - 1)
            hit = self.addrs[pos] == addrs
            out[hit] = self.pfns[pos[hit]]
        return out

    def add(self, addrs: np.ndarray, src: np.ndarray, engine: DmaEngine | None) -> int:
        """Copy pages ``src`` (mapped at ``addrs``, none duplicated yet) into new device frames.

        Caller holds the lock for the whole copy, so no CPU write can slip between the copy and the
        record of it. Returns how many copies were made (fewer when the device is short of frames).
        """
        m = self.m
        got = m.frames.alloc_folios(self.node, addrs.size, 0)
        n = got.size
        if n == 0:
            return 0
        addrs, src = addrs[:n], src[:n]
        copied = False
        if engine is not None:
            try:
                engine.copy(src, got).wait()
                copied = True
            except DmaError:
                pass  # a failed DMA copy falls back to the CPU, as migration does
        if not copied:
            m.frames.copy_pages(src, got)
        m.pages.note_written(got)
        a = np.concatenate([self.addrs, addrs])
        p = np.concatenate([self.pfns, got])
        order = np.argsort(a, kind="stable")
        self.addrs, self.pfns = a[order], p[order]
        return n

    def drop(self, start: int, end: int) -> int:
        """Free the copies of every page that ``[start, end)`` touches (lock held); return how many went."""
        ps = self.m.page_size
        lo, hi = np.searchsorted(self.addrs, [start - start % ps, end])
        return self._free(np.arange(lo, hi))

    def drop_some(self, count: int) -> int:
        """Free up to ``count`` copies to make room on the device (lock held); return how many went."""
        return self._free(np.arange(min(count, self.addrs.size)))

    def _free(self, idx: np.ndarray) -> int:
        if idx.size == 0:
            return 0
        self.m.frames.free_folios(self.pfns[idx])
        keep = np.ones(self.addrs.size, dtype=bool)
        keep[idx] = False
        self.addrs, self.pfns = self.addrs[keep], self.pfns[keep]
        return int(idx.size)
