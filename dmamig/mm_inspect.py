"""What an address space maps, and who is told when that changes: the inspection calls and the notifiers.

A mixin of :class:`~dmamig.mm.AddressSpace` (the lookups and the notifier list are its
:class:`~dmamig.mm_struct.MmStruct`'s): the pfn, node and PTE bits behind an address, vectorized over a range, and ``mmu_interval_notifier``-like
callbacks that a device keeping copies of the pages registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .flags import PteFlag

if TYPE_CHECKING:
    from .machine import Machine
    from .mm_struct import MmStruct

__all__ = ["AddressInspection"]


class AddressInspection:
    """The inspection calls and notifiers of :class:`~dmamig.mm.AddressSpace` (a mixin: the address space
    provides ``machine`` and ``mm_struct``)."""

    machine: Machine
    mm_struct: MmStruct

    def _pte_pfn(self, addr: Any) -> int:
        mms = self.mm_struct
        mms.check_open()
        addr, _ = mms.check_range(addr, 1, aligned=False)
        with self.machine.changed:
            ((v, s0, _s1),) = mms.wait_migrations(addr, 1)
            return int(v.pte_pfn[s0])

    def pfn_of(self, addr: int) -> int:
        """The pfn backing the page at ``addr``: ``-1`` if not populated, ``ZERO_PFN`` (-2) for the zero page."""
        return self._pte_pfn(addr)

    def node_of(self, addr: int) -> int:
        """The node backing the page at ``addr``; ``-1`` if not populated or mapped to the zero page (no frame)."""
        pfn = self._pte_pfn(addr)
        return -1 if pfn < 0 else int(self.machine.nodemap.node_of(np.array([pfn]))[0])

    def pte_flags(self, addr: int) -> PteFlag:
        """The PTE bits of the page at ``addr`` (0 when not populated; ``SPECIAL`` marks the zero page).

        On a machine with device-private memory, a device page's entry is not present to the CPU: it is a
        ``DEVICE_PRIVATE`` entry, without ``PRESENT`` (with its write, young and dirty bits).
        """
        mms = self.mm_struct
        mms.check_open()
        addr, _ = mms.check_range(addr, 1, aligned=False)
        m = self.machine
        with m.lock:
            ((v, s0, _s1),) = mms.segments(addr, 1)
            return PteFlag(int(v.pte_flags[s0]))

    def pfns_of(self, addr: int, length: int) -> np.ndarray:
        """Pfn of every page of ``[addr, addr + length)`` as :meth:`pfn_of` gives it (vectorized)."""
        mms = self.mm_struct
        mms.check_open()
        addr, length = mms.check_range(addr, length, aligned=False)
        with self.machine.changed:
            return np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in mms.wait_migrations(addr, length)])

    def nodes_of(self, addr: int, length: int) -> np.ndarray:
        """Node of every page of ``[addr, addr + length)`` as :meth:`node_of` gives it (vectorized)."""
        pfns = self.pfns_of(addr, length)
        return np.where(pfns >= 0, self.machine.nodemap.node_of(np.maximum(pfns, 0)), -1)

    # -- notifiers --------------------------------------------------------------------------------------------
    def register_notifier(self, fn: Callable[[int, int], None]) -> None:
        """Have ``fn(start, end)`` called before the CPU changes what ``[start, end)`` holds or maps.

        Like an ``mmu_interval_notifier``: a device keeping copies of this address space's pages (read
        duplicates) drops them there. Called with the machine lock held, on :meth:`write`, :meth:`munmap`,
        :meth:`mremap` (the old range) and :meth:`close` (everything). Migration does not notify: it keeps
        every byte.
        """
        self.mm_struct.notifiers.append(fn)

    def unregister_notifier(self, fn: Callable[[int, int], None]) -> None:
        """Stop calling ``fn``; a function never registered is ignored."""
        if fn in self.mm_struct.notifiers:
            self.mm_struct.notifiers.remove(fn)
