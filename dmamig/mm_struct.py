"""MmStruct: one process's memory state, the kernel's ``mm_struct``, for every floor that works on it.

It owns what the page faults, gup, fork, mprotect, mremap, munmap and the migration code share about one
address space: the VMAs in address order (each with its page table), the address where the next mapping
goes, the pins (``pin_user_pages``), the notifiers (``mmu_notifier``), the device migrations in flight and
whether the address space is closed. It also owns the checks and lookups every entry point starts with: an
open address space, a well-formed range, the VMAs and slots a range covers, and the wait for migration
entries to leave it. :class:`~dmamig.mm.AddressSpace` is the public facade over it.

The VMA list and the pins change only under ``machine.lock``; the lookups expect their caller to hold it
(:meth:`wait_migrations` and :meth:`lookup_settled` wait on ``machine.changed``). :meth:`check_open` and
:meth:`check_range` look at no shared state.
"""

from __future__ import annotations

import bisect
import operator
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import page_loops
from .errors import AddressFault, InvalidArgument, MigrationStalled
from .flags import PteFlag

if TYPE_CHECKING:
    from .machine import Machine
    from .vma import Vma

__all__ = ["MMAP_BASE", "MmStruct", "segment_pfns"]

#: First virtual address handed out by mmap (like a process's mmap base, away from 0).
MMAP_BASE = 0x10_0000_0000
_MIGRATION = np.uint8(PteFlag.MIGRATION)


#: The key the VMA list is kept sorted by (an attrgetter: bisect calls it with no Python frame).
_vma_start = operator.attrgetter("start")


class MmStruct:
    """The memory state of one address space (the kernel's ``mm_struct``).

    Parameters
    ----------
    machine : Machine
        The machine whose frames the page tables map.

    Attributes
    ----------
    machine : Machine
        The machine.
    highest_vm_end : int
        Where the next mapping may start: past the last mapping handed out and its guard page (the kernel's
        ``highest_vm_end``; mmap and mremap move it up, never down).
    pins : dict of int to int
        Pins per base pfn (``pin_user_pages``); each pin holds one folio reference.
    notifiers : list of callable
        ``fn(start, end)`` called before the CPU changes what a range holds or maps (``mmu_notifier``).
    device_migrations : list
        :class:`~dmamig.MigrateVma` objects between ``setup()`` and ``finalize()``; a close aborts them.
    closed : bool
        True once the address space is closed.
    stalls, stall_ns : int
        Accesses that met a migration entry and waited for it, and the nanoseconds they waited in all.
    """

    def __init__(self, machine: Machine):
        self.machine = machine
        self._page_size = machine.page_size  # asked on every range check and lookup
        self._vmas: list[Vma] = []  # address order; changed only through insert, remove, replace, relocate
        self.highest_vm_end = MMAP_BASE
        self.pins: dict[int, int] = {}
        self.notifiers: list[Callable[[int, int], None]] = []
        self.device_migrations: list[Any] = []
        self.closed = False
        self.stalls = 0
        self.stall_ns = 0

    # -- the VMA list ------------------------------------------------------------------------------------------
    @property
    def vmas(self) -> tuple[Vma, ...]:
        """The VMAs in address order."""
        return tuple(self._vmas)

    def insert(self, vma: Vma) -> None:
        """Add ``vma`` in address order and link it to the objects of its anon_vma chain."""
        bisect.insort(self._vmas, vma, key=_vma_start)
        for obj in vma.chain:
            obj.vmas.append(vma)

    def remove(self, vma: Vma) -> None:
        """Take ``vma`` out of the list and unlink it from its objects (its page table is left as it is)."""
        self._vmas.remove(vma)
        for obj in vma.chain:
            obj.vmas.remove(vma)

    def replace(self, vma: Vma, pieces: list[Vma]) -> None:
        """Put ``pieces`` in the place of ``vma``; release the objects no VMA is linked to any more."""
        self.remove(vma)
        for piece in pieces:
            self.insert(piece)
        for obj in vma.chain:
            if not obj.vmas:
                obj.release()

    def relocate(self, vma: Vma, start: int) -> None:
        """Move ``vma`` to ``start``, page table and all (mremap): it stays linked to its objects, so the rmap
        still finds its pages and the migration entries in it."""
        self._vmas.remove(vma)
        vma.start = start
        bisect.insort(self._vmas, vma, key=_vma_start)

    # -- checks and lookups ------------------------------------------------------------------------------------
    def check_open(self) -> None:
        """Raise InvalidArgument once the address space is closed."""
        if self.closed:
            raise InvalidArgument("this address space is closed")

    def check_range(self, addr: Any, length: Any, aligned: bool) -> tuple[int, int]:
        """Validate an ``(addr, length)`` argument pair: integers, ``addr >= 0``, ``length > 0`` and, with
        ``aligned``, a page-aligned ``addr``. Returns them as ints."""
        if type(addr) is int and type(length) is int and addr >= 0 and length > 0 \
                and not (aligned and addr % self._page_size):
            return addr, length  # the common case, in one test (bool is not int's type)
        for name, v in (("addr", addr), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgument(f"{name} must be an integer, got {type(v).__name__}")
        if addr < 0:
            raise InvalidArgument(f"addr must be >= 0, got {addr}")
        if length <= 0:
            raise InvalidArgument(f"length must be > 0, got {length}")
        ps = self._page_size
        if aligned and addr % ps:
            raise InvalidArgument(f"addr {addr:#x} must be aligned to the page size ({ps} bytes)")
        return int(addr), int(length)

    def segments(self, addr: int, length: int) -> list[tuple[Vma, int, int]]:
        """``[(vma, first_slot, end_slot), ...]`` covering ``[addr, addr + length)``; AddressFault on a hole."""
        ps = self._page_size
        end = addr + length
        out = []
        cur = addr
        vmas = self._vmas
        i = bisect.bisect_right(vmas, cur, key=_vma_start) - 1
        while cur < end:
            v = vmas[i] if 0 <= i < len(vmas) else None
            v_start, v_end = (v.start, v.end) if v is not None else (0, 0)
            if not v_start <= cur < v_end:
                raise AddressFault(f"address {cur:#x} is not mapped (access {addr:#x}+{length:#x})")
            out.append((v, (cur - v_start) // ps, -(-(min(end, v_end) - v_start) // ps)))
            cur = v_end
            i += 1
        return out

    def wait_migrations(self, addr: int, length: int,
                        timeout: float | None = None) -> list[tuple[Vma, int, int]]:
        """Segments of the range once no migration entry is left in it (caller holds ``machine.changed``).

        With ``timeout`` (seconds), a wait that has not ended by then raises MigrationStalled.
        """
        t0 = 0
        while True:
            segs = self.segments(addr, length)
            if not any(v.has_migration_entries(s0, s1) for v, s0, s1 in segs):
                if t0:
                    self.stall_ns += time.perf_counter_ns() - t0
                return segs
            if not t0:
                t0 = time.perf_counter_ns()
                self.stalls += 1
            if timeout is None:
                self.machine.changed.wait()
                continue
            left = timeout - (time.perf_counter_ns() - t0) / 1e9
            if left <= 0:
                self.stall_ns += time.perf_counter_ns() - t0
                raise MigrationStalled(f"range {addr:#x}+{length:#x} stayed under migration entries for "
                                       f"{timeout:g} s: a migration of it has not finished (a MigrateVma that "
                                       f"was set up but never finalized?)")
            self.machine.changed.wait(left)

    def lookup(self, addrs: np.ndarray) -> tuple[np.ndarray, list[tuple[Vma, np.ndarray, np.ndarray]]]:
        """The pfn of each of ``addrs`` (``-1`` where unmapped too) and, per VMA hit, ``(vma, positions, slots)``
        (caller holds the lock)."""
        ps = self._page_size
        vmas = self._vmas
        if vmas and addrs.size and page_loops.HAVE_NUMBA and addrs.dtype == np.int64:
            # The usual lookup: every address in the VMA of the first, found in one compiled pass.
            i = bisect.bisect_right(vmas, int(addrs[0]), key=_vma_start) - 1
            if i >= 0:
                v = vmas[i]
                slots = np.empty(addrs.size, dtype=np.int64)
                pfns = np.empty(addrs.size, dtype=np.int64)
                if page_loops.slots_within(addrs, v.start, v.end, ps, v.pte_pfn, slots, pfns):
                    return pfns, [(v, np.arange(addrs.size), slots)]
        pfns = np.full(addrs.size, -1, dtype=np.int64)
        hits: list[tuple[Vma, np.ndarray, np.ndarray]] = []
        if not vmas:
            return pfns, hits
        starts = np.array([v.start for v in vmas], dtype=np.int64)
        ends = np.array([v.end for v in vmas], dtype=np.int64)
        i = np.searchsorted(starts, addrs, side="right") - 1
        inside = (i >= 0) & (addrs < ends[np.maximum(i, 0)])
        for k in np.unique(i[inside]).tolist():
            pos = np.flatnonzero(inside & (i == k))
            slots = (addrs[pos] - vmas[k].start) // ps
            pfns[pos] = vmas[k].pte_pfn[slots]
            hits.append((vmas[k], pos, slots))
        return pfns, hits

    def lookup_settled(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pfns, mapped)`` of ``addrs`` once none of their slots holds a migration entry (caller holds
        ``machine.changed``)."""
        while True:
            pfns, hits = self.lookup(addrs)
            if not any((v.pte_flags[slots] & _MIGRATION).any() for v, _p, slots in hits):
                mapped = np.zeros(addrs.size, dtype=bool)
                for _v, pos, _s in hits:
                    mapped[pos] = True
                return pfns, mapped
            self.machine.changed.wait()

    # -- notifiers ---------------------------------------------------------------------------------------------
    def notify(self, start: int, end: int) -> None:
        """Call every notifier on ``[start, end)`` (caller holds the lock)."""
        for fn in list(self.notifiers):
            fn(start, end)


def segment_pfns(segments: list[tuple[Vma, int, int]]) -> np.ndarray:
    """The pfns the page tables of ``segments`` (:meth:`MmStruct.segments`) hold, in address order: a copy, since
    the tables change once the lock is dropped (caller holds it)."""
    if len(segments) == 1:  # the usual range, inside one VMA: one slice copied, no list to join
        v, s0, s1 = segments[0]
        return v.pte_pfn[s0:s1].copy()
    return np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segments])
