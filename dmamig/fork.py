"""Fork, after the kernel's ``dup_mmap`` and ``copy_page_range``: the child's VMAs and page tables.

- A shared mapping is shared: the child maps the parent's pages (mapcount and a reference per PTE).
- A private mapping is shared copy-on-write: the child maps the same pages, every PTE of such a page loses
  its write bit in both processes, and the first write in either copies the page for the writer
  (:func:`dmamig.memory.fault`). The child's VMA is linked into every anonymous object of the parent's chain
  (``anon_vma_clone``), so the rmap finds a page through both processes, and it gets an object of its own
  for the pages it faults from now on (``anon_vma_fork``).
- A private page pinned by the parent is copied at once (``copy_present_page`` for a maybe-DMA-pinned page):
  the pin holder must keep seeing the page the parent maps, so the parent's page never becomes copy-on-write.
- The zero page is mapped in the child as it is.
- A migration entry is copied, not waited for (``copy_nonpresent_pte``): it holds no mapcount and no
  reference, and the migration's ``remove_migration_ptes`` finds the child's copy through the rmap and maps
  the new page there too. In a copy-on-write mapping a writable entry becomes readable in both processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .flags import PteFlag
from .memory import fault
from .vma import NO_PFN, MemObject, Vma

if TYPE_CHECKING:
    from .mm import AddressSpace
    from .mm_struct import MmStruct

__all__ = ["dup_mmap", "fork_mm"]

_NOT_WRITE = np.uint8(~np.uint8(PteFlag.WRITE))
_NOT_YOUNG = np.uint8(~np.uint8(PteFlag.YOUNG))
_MIGRATION = np.uint8(PteFlag.MIGRATION)


def fork_mm(parent: MmStruct) -> AddressSpace:
    """``AddressSpace.fork``: a new address space with a copy of ``parent``'s mappings.

    Waits for nothing: migration entries are copied. Raises OutOfMemory, with the partial child torn down,
    when there are no frames for the pinned pages that must be copied.
    """
    m = parent.machine
    child = m.address_space()
    try:
        with m.changed:
            dup_mmap(parent, child.mm_struct)
    except BaseException:
        child.close()
        raise
    return child


def dup_mmap(parent: MmStruct, child: MmStruct) -> None:
    """Give the empty ``child`` a copy of ``parent``'s mappings (caller holds the lock).

    Raises OutOfMemory when there are no frames for the pinned pages that must be copied; the caller closes
    the partial child.
    """
    child.highest_vm_end = parent.highest_vm_end
    for v in parent.vmas:
        if v.shared:
            _dup_shared(child, v)
        else:
            _dup_private(parent, child, v)


def _dup_shared(child: MmStruct, v: Vma) -> None:
    m = child.machine
    cv = Vma(child, v.start, v.npages, v.obj, v.pgoff, v.pte_pfn.copy(), v.pte_flags.copy(), v.prot, v.chain)
    child.insert(cv)
    pfns = cv.pte_pfn[_present(cv)]
    np.add.at(m.pages.mapcount, pfns, 1)
    np.add.at(m.pages.refcount, m.pages.head[pfns], 1)


def _dup_private(parent: MmStruct, child: MmStruct, v: Vma) -> None:
    m = parent.machine
    pages = m.pages
    obj = MemObject(m, v.obj.pfns.size, False, v.obj.order)
    cv = Vma(child, v.start, v.npages, obj, v.pgoff, v.pte_pfn.copy(), v.pte_flags.copy(), v.prot,
             (obj,) + v.chain)
    pinned = _pinned_slots(parent, v)
    cv.pte_pfn[pinned] = NO_PFN
    cv.pte_flags[pinned] = 0
    child.insert(cv)
    # copy_nonpresent_pte: both processes' migration entries become readable; they hold no mapcount.
    entries = np.flatnonzero((cv.pte_flags & _MIGRATION) != 0)
    v.pte_flags[entries] &= _NOT_WRITE
    cv.pte_flags[entries] &= _NOT_WRITE
    shared = np.flatnonzero(_present(cv))
    if shared.size:
        pfns = cv.pte_pfn[shared]
        np.add.at(pages.mapcount, pfns, 1)
        np.add.at(pages.refcount, pages.head[pfns], 1)
        v.pte_flags[shared] &= _NOT_WRITE
        cv.pte_flags[shared] &= _NOT_WRITE & _NOT_YOUNG
    if pinned.size == 0:
        return
    # Each pinned page is copied on its own node, with the parent's folio order where a block is free.
    src = v.pte_pfn[pinned]
    nodes = m.nodemap.node_of(src)
    for n in np.unique(nodes).tolist():
        sel = pinned[nodes == n]
        cuts = np.flatnonzero(np.diff(sel) != 1) + 1
        for run in np.split(sel, cuts):
            fault(child, cv, int(run[0]), int(run[-1]) + 1, n, write=True)
        m.frames.copy_pages(v.pte_pfn[sel], cv.pte_pfn[sel])
    cv.pte_flags[pinned] = v.pte_flags[pinned]


def _present(v: Vma) -> np.ndarray:
    """Slots of ``v`` that map a page: neither empty, nor the zero page, nor a migration entry."""
    return (v.pte_pfn >= 0) & ((v.pte_flags & _MIGRATION) == 0)


def _pinned_slots(parent: MmStruct, v: Vma) -> np.ndarray:
    """Slots of ``v`` that map a page the parent holds a pin on (``copy_present_page``; an entry is copied)."""
    if not parent.pins:
        return np.empty(0, dtype=np.int64)
    keys = np.fromiter(parent.pins.keys(), dtype=np.int64, count=len(parent.pins))
    return np.flatnonzero(np.isin(v.pte_pfn, keys) & _present(v))
