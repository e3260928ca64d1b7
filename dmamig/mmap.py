"""Mapping and unmapping, after the kernel's ``mm/mmap.c`` and ``mm/vma.c``: address ranges and teardown.

Page tables are dense per-VMA arrays (nine bytes per page), so a mapping's size is bounded by what its page
table may take, not only by the user address space; both limits are checked before anything is allocated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidArgument
from .flags import PteFlag
from .nodes import MAX_ORDER
from .vma import NO_PFN, forget_anon_slots, free_swap_cache

if TYPE_CHECKING:
    from .mm_struct import MmStruct
    from .vma import Vma

__all__ = ["MAX_MAP_PAGES", "TASK_SIZE", "check_mmap", "get_unmapped_area", "unmap_range", "unmap_slots"]

_MIGRATION = np.uint8(PteFlag.MIGRATION)

#: Size of the user address space (x86-64 with 4-level page tables: 128 TiB).
TASK_SIZE = 1 << 47
#: Most pages one mapping may have: its dense page table then takes 2.25 GiB.
MAX_MAP_PAGES = 1 << 28


def check_mmap(mm: MmStruct, length: Any, shared: Any, order: Any) -> tuple[int, bool, int]:
    """Validate mmap's arguments; return ``(npages, shared, order)``."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
        raise InvalidArgument(f"length must be a positive integer, got {length!r}")
    if not isinstance(shared, (bool, np.bool_)):
        raise InvalidArgument(f"shared must be True or False, got {shared!r}")
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 0 <= order <= MAX_ORDER:
        raise InvalidArgument(f"order must be an integer in 0..{MAX_ORDER}, got {order!r}")
    ps = mm.machine.page_size
    npages = -(-int(length) // ps)
    if int(length) > TASK_SIZE - mm.highest_vm_end:
        raise InvalidArgument(f"length {int(length):#x} does not fit in the user address space "
                              f"(128 TiB; {TASK_SIZE - mm.highest_vm_end:#x} bytes left above the last mapping)")
    if npages > MAX_MAP_PAGES:
        raise InvalidArgument(f"length {int(length):#x} is {npages} pages; one mapping may have at most "
                              f"{MAX_MAP_PAGES} (its page table is a dense array)")
    return npages, bool(shared), int(order)


def get_unmapped_area(mm: MmStruct, npages: int, order: int) -> int:
    """A fresh, folio-aligned range of ``npages`` pages, followed by a guard page (caller holds the lock)."""
    ps = mm.machine.page_size
    align = ps << order
    start = -(-mm.highest_vm_end // align) * align
    mm.highest_vm_end = start + npages * ps + ps
    return start


def unmap_range(mm: MmStruct, addr: int, end: int, wait: bool = True) -> None:
    """munmap's body (caller holds ``machine.changed``): drops every PTE of ``[addr, end)`` and splits the VMAs
    it cuts.

    With ``wait`` it first waits for the migration entries in the range to go. Without, it drops them as the
    kernel's ``zap_pte_range`` does: an entry holds no mapcount or reference, so the migration finds no PTE to
    restore there, and a new page that nothing maps any more is freed when the migration lets it go.
    """
    m = mm.machine
    ps = m.page_size
    while True:
        hit = [v for v in mm.vmas if v.start < end and v.end > addr]
        spans = [(v, max(0, (addr - v.start) // ps), min(v.npages, (end - v.start) // ps)) for v in hit]
        if not wait or not any(v.has_migration_entries(s0, s1) for v, s0, s1 in spans):
            break
        m.changed.wait()
    for v, s0, s1 in spans:
        unmap_slots(mm, v, np.arange(s0, s1))
        mm.replace(v, ([v.slice(0, s0)] if s0 > 0 else []) + ([v.slice(s1, v.npages)] if s1 < v.npages else []))


def unmap_slots(mm: MmStruct, vma: Vma, slots: np.ndarray) -> None:
    """Drop the PTEs of ``slots``: mapcount and the PTE's reference; free what nobody holds."""
    m = mm.machine
    pfns = vma.pte_pfn[slots]
    entry = (vma.pte_flags[slots] & _MIGRATION) != 0
    if entry.any():
        # Migration entries hold no mapcount and no reference. A private page's object slot is forgotten, so
        # the migration does not hand it to a new page that nothing maps.
        if not vma.shared:
            forget_anon_slots(m, pfns[entry])
        pfns = pfns[~entry]
    pfns = pfns[pfns >= 0]  # the zero page holds no mapcount and no reference
    if pfns.size:
        np.subtract.at(m.pages.mapcount, pfns, 1)
        heads = m.pages.head[pfns]
        if not vma.shared:
            forget_anon_slots(m, pfns)
            free_swap_cache(m, heads)  # free_pages_and_swap_cache: the last unmap takes it out
        m.frames.put_folios(heads)
    vma.pte_pfn[slots] = NO_PFN
    vma.pte_flags[slots] = 0
