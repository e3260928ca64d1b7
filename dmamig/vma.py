"""Mappings: memory objects, VMAs with their page tables, and the reverse map (rmap).

A :class:`MemObject` is what ``page.mapping`` points at: an anonymous object (the kernel's anon_vma) for
private mappings or a shared-memory object (an address_space) for shared ones. ``page.index`` is the page's
offset in its object, so the reverse map of a page is: every VMA linked to ``page.mapping`` that covers
``page.index`` and whose page table holds that pfn. Page tables are per-VMA arrays: the pfn of each slot and
its PTE bits.

Fork shares private pages copy-on-write, and the rmap must then find the page in parent and child. As in the
kernel, a VMA is linked to a chain of anonymous objects (its anon_vma chain): its own object, where the pages
it faults from now on go, and the objects of the mappings it was forked from, whose pages it may still map.
The child of a fork is linked into every object of its parent's chain, so a page faulted before the fork is
found through either process's VMA.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from . import page_loops
from .array_ops import add_at, distinct
from .flags import MIGRATION_ENTRY_KEPT, PageFlag, Prot, PteFlag

if TYPE_CHECKING:
    from .machine import Machine
    from .mm_struct import MmStruct

__all__ = ["NO_PFN", "ZERO_PFN", "MemObject", "Vma", "folio_free_swap", "forget_anon_slots", "free_swap_cache",
           "install_migration_entries", "map_pages", "mark_device_private", "new_pte_flags", "remove_migration_entries",
           "rmap_walk"]

#: ``pte_pfn`` of a slot that maps nothing.
NO_PFN = -1
#: ``pte_pfn`` of a slot that maps the shared zero page: no frame, no struct page, reads as zeros. Like every
#: negative pfn it is skipped by the rmap, the page accounting and the migration core.
ZERO_PFN = -2
_PRESENT = np.uint8(PteFlag.PRESENT)
_DEVICE_PRIVATE = np.uint8(PteFlag.DEVICE_PRIVATE)
# A slot that maps a page: a present PTE, or a device-private entry (not present, but it names the page, holds
# its reference and mapcount, and the rmap finds it, as try_to_migrate finds device-private entries).
_MAPPED = np.uint8(PteFlag.PRESENT | PteFlag.DEVICE_PRIVATE)
_MIGRATION = np.uint8(PteFlag.MIGRATION)
# Bits a migration entry keeps from the PTE it replaces (the kernel keeps young, dirty and write).
_KEPT = np.uint8(MIGRATION_ENTRY_KEPT)
# The rights that allow a load, and a store (x86: WRITE implies READ): set lookups, as flag arithmetic on an
# enum costs more and every access asks.
_READABLE = frozenset({Prot.READ, Prot.WRITE, Prot.READ | Prot.WRITE})
_WRITABLE = frozenset({Prot.WRITE, Prot.READ | Prot.WRITE})


class MemObject:
    """An anonymous (private) or shared-memory object: the pages of a mapping, by page index.

    ``pfns[i]`` is the pfn holding page ``i`` of the object or ``-1``. A shared object is a page cache: it
    holds one reference per base page it caches, it is where a fault looks a page up, and it outlives any one
    VMA. An anonymous object holds no references (its pages are held by their PTEs) and is never looked up by
    a fault: after a fork, parent and child may hold different pages at one index (one of them copied it on
    a write), so ``pfns`` records the last page installed at each index for inspection only, and the page
    tables of the linked VMAs (``vmas``) are the truth.
    """

    #: Its folios migrate through a callback of their own (``a_ops->migrate_folio`` of a file, or the
    #: ``movable_ops`` of non-LRU movable pages), not the core's compiled path for anonymous and shared memory.
    migrate_callback = False
    #: Its pages are non-LRU movable pages (a balloon's): isolated and put back by their driver, never on an LRU.
    movable = False

    def __init__(self, machine: Machine, npages: int, shared: bool, order: int):
        self.machine = machine
        self.shared = shared
        self.order = order
        self.pfns = np.full(npages, NO_PFN, dtype=np.int64)
        self.vmas: list[Vma] = []  # every VMA linked to the object (anon_vma_chain), in any address space
        self.id = machine.register_object(self)

    def grow(self, npages: int) -> None:
        """Make room for indices up to ``npages`` (a mapping grown by mremap); caller holds the lock."""
        if npages > self.pfns.size:
            self.pfns = np.concatenate([self.pfns, np.full(npages - self.pfns.size, NO_PFN, np.int64)])

    def release(self) -> None:
        """Drop the object's page-cache references once no VMA maps it (caller holds the lock)."""
        m = self.machine
        present = self.pfns[self.pfns >= 0]
        if self.shared and present.size:
            m.page_cache.shmem_removed(present)
            heads, refs = np.unique(m.pages.head[present], return_counts=True)
            m.pages.mapping[present] = -1  # truncated: a page kept alive by a pin belongs to no object
            m.frames.put_folios(heads, refs)
        elif not self.shared:
            # Anonymous pages still alive (isolated by a migration, pinned) belong to no object from now on:
            # an rmap walk or a migration must not look the released object up.
            m.pages.mapping[np.flatnonzero(m.pages.mapping == self.id)] = -1
        self.pfns[:] = NO_PFN
        m.unregister_object(self.id)


class Vma:
    """A virtual memory area of one address space: ``npages`` pages from ``start``, object pages from
    ``pgoff``, with its page table (``pte_pfn``, ``pte_flags``), its access rights ``prot`` and its
    anon_vma ``chain`` (its own object first, then the objects of the mappings it was forked from)."""

    def __init__(self, mm: MmStruct, start: int, npages: int, obj: MemObject, pgoff: int,
                 pte_pfn: np.ndarray | None = None, pte_flags: np.ndarray | None = None,
                 prot: Prot = Prot.READ | Prot.WRITE, chain: tuple[MemObject, ...] | None = None):
        self.mm = mm
        self._page_size = mm.machine.page_size  # for end, asked on every lookup
        self.start = start
        self.npages = npages
        self.obj = obj
        self.pgoff = pgoff
        self.pte_pfn = np.full(npages, NO_PFN, dtype=np.int64) if pte_pfn is None else pte_pfn
        self.pte_flags = np.zeros(npages, dtype=np.uint8) if pte_flags is None else pte_flags
        self.prot = Prot(prot)
        self.chain = (obj,) if chain is None else chain

    @property
    def readable(self) -> bool:
        return self.prot in _READABLE

    @property
    def writable(self) -> bool:
        return self.prot in _WRITABLE

    def slice(self, s0: int, s1: int) -> Vma:
        """A new VMA for slots ``[s0, s1)`` of this one (same objects, rights and page-table entries)."""
        return Vma(self.mm, self.start + s0 * self.mm.machine.page_size, s1 - s0, self.obj, self.pgoff + s0,
                   self.pte_pfn[s0:s1].copy(), self.pte_flags[s0:s1].copy(), self.prot, self.chain)

    @property
    def end(self) -> int:
        """First address past the VMA."""
        return self.start + self.npages * self._page_size

    @property
    def shared(self) -> bool:
        return self.obj.shared

    def has_migration_entries(self, s0: int = 0, s1: int | None = None) -> bool:
        """Whether any slot in ``[s0, s1)`` holds a migration entry."""
        if USE_LOOPS:  # every migrate call and fault asks: one pass, no temporary
            n = self.pte_flags.size
            if s1 is None or s0 < 0 or s1 < 0 or s1 > n:  # slice rules only where they change something
                s0, s1, _ = slice(s0, s1).indices(n)
            return page_loops.any_bits(self.pte_flags, s0, s1, _MIGRATION)
        return bool((self.pte_flags[s0:s1] & _MIGRATION).any())

    def __repr__(self) -> str:
        return f"Vma({self.start:#x}-{self.end:#x}, obj={self.obj.id}, pgoff={self.pgoff}, prot={self.prot!r})"


def new_pte_flags(vma: Vma) -> np.uint8:
    """Bits of a PTE that maps a page this VMA owns alone: present, young, writable if the VMA is."""
    return np.uint8(PteFlag.PRESENT | PteFlag.YOUNG | (PteFlag.WRITE if vma.writable else 0))


def map_pages(m: Machine, vma: Vma, slots: np.ndarray, pfns: np.ndarray) -> None:
    """Point ``slots`` (empty or zero-page) at ``pfns``: each PTE takes a mapcount and a folio reference
    (caller holds the lock)."""
    pages = m.pages
    vma.pte_pfn[slots] = pfns
    vma.pte_flags[slots] = new_pte_flags(vma)
    if m.device_private:
        dev = _device_private(m, pfns)
        if dev.any():
            s = slots[dev]
            vma.pte_flags[s] = (vma.pte_flags[s] & ~_PRESENT) | _DEVICE_PRIVATE
    np.add.at(pages.mapcount, pfns, 1)
    np.add.at(pages.refcount, pages.head[pfns], 1)


def _device_private(m: Machine, pfns: np.ndarray) -> np.ndarray:
    """Which of ``pfns`` (real frames) are device-private pages: on a device node of a machine whose device
    memory is device-private."""
    return m.device_node_mask[m.nodemap.node_of(pfns)]


def mark_device_private(m: Machine, pfns: np.ndarray) -> None:
    """Make the present PTEs that map device-private pages among ``pfns`` device-private entries.

    Device-private memory is not addressable by the CPU, so a PTE never maps it present: it holds a
    non-present device-private (swap-style) entry that keeps the page's write, young and dirty bits, as
    ``remove_migrate_pte`` makes one (``make_writable_device_private_entry``) for a device-private folio.
    Caller holds the lock; nothing happens on a machine with device-coherent memory.
    """
    if not m.device_private or pfns.size == 0:
        return
    dev = pfns[_device_private(m, pfns)]
    if dev.size == 0:
        return
    for vma, slots, _pos in rmap_walk(m, dev, PteFlag.PRESENT):
        vma.pte_flags[slots] = (vma.pte_flags[slots] & ~_PRESENT) | _DEVICE_PRIVATE


def forget_anon_slots(m: Machine, pfns: np.ndarray) -> None:
    """Clear the anonymous-object records of ``pfns`` that no PTE maps any more (caller holds the lock)."""
    pages = m.pages
    gone = pfns[pages.mapcount[pfns] == 0]
    mapping = pages.mapping[gone]
    for oid in distinct(mapping[mapping >= 0]):
        obj = m.object_or_none(oid)
        if obj is None or obj.shared:
            continue  # released: nothing to forget; shared: the page cache keeps its pages mapped or not
        p = gone[mapping == oid]
        idx = pages.index[p]
        inside = idx < obj.pfns.size
        p, idx = p[inside], idx[inside]
        hit = obj.pfns[idx] == p
        obj.pfns[idx[hit]] = NO_PFN


def free_swap_cache(m: Machine, heads: np.ndarray) -> None:
    """``free_swap_cache``: folios of ``heads`` in the swap cache that no PTE maps any more leave it, dropping
    its references (caller holds the lock); a locked folio (a migration's) stays.

    ``folio_free_swap`` only frees a folio no swap entry refers to; nothing is ever swapped out here, so that
    is every one.
    """
    pages = m.pages
    heads = heads[pages.test(heads, PageFlag.SWAPCACHE)]
    if heads.size == 0:
        return
    heads = np.unique(heads)
    nr = pages.nr_pages(heads)
    mapped = np.add.reduceat(pages.mapcount[pages.expand(heads)].astype(np.int64),
                             np.concatenate(([0], np.cumsum(nr)[:-1])))
    folio_free_swap(m, heads[mapped == 0])


def folio_free_swap(m: Machine, heads: np.ndarray, locked: bool = False) -> None:
    """Take the folios ``heads`` out of the swap cache, dropping its references (caller holds the lock).

    A folio not in the swap cache stays as it is; so does a locked one (``folio_trylock`` fails), unless the
    caller holds those folio locks itself (``locked``).
    """
    pages = m.pages
    heads = heads[pages.test(heads, PageFlag.SWAPCACHE) & (locked | ~pages.test(heads, PageFlag.LOCKED))]
    if heads.size:
        heads = np.unique(heads)
        pages.clear(heads, PageFlag.SWAPCACHE)
        m.frames.put_folios(heads, pages.nr_pages(heads), unique=True)


def rmap_walk(m: Machine, pfns: np.ndarray, want: int) -> Iterator[tuple[Vma, np.ndarray, np.ndarray]]:
    """Yield ``(vma, slots, positions)``: the PTE slots that map ``pfns[positions]`` with a ``want`` bit set.

    ``want`` is ``PteFlag.PRESENT`` for present mappings, ``PteFlag.PRESENT | PteFlag.DEVICE_PRIVATE`` for every
    live mapping (device-private entries too) or ``PteFlag.MIGRATION`` for migration entries. The walk is
    vectorized per (object, VMA) pair, never per page.
    """
    mapping = m.pages.mapping[pfns]
    index = m.pages.index[pfns]
    for oid in distinct(mapping[mapping >= 0]):
        pos = np.flatnonzero(mapping == oid)
        idx = index[pos]
        for vma in m.object(oid).vmas:
            inside = (idx >= vma.pgoff) & (idx < vma.pgoff + vma.npages)
            if not inside.any():
                continue
            p = pos[inside]
            slots = idx[inside] - vma.pgoff
            hit = (vma.pte_pfn[slots] == pfns[p]) & ((vma.pte_flags[slots] & np.uint8(want)) != 0)
            if hit.any():
                yield vma, slots[hit], p[hit]


def _vmas_mapping(m: Machine, pfns: np.ndarray) -> Iterator[tuple[int, Vma]]:
    """Every (object id, VMA) through which some of ``pfns`` may be mapped."""
    for oid in distinct(m.pages.mapping[pfns]):
        if oid >= 0:
            for vma in m.object(oid).vmas:
                yield oid, vma


#: Use the compiled loops of ``page_loops`` (numba); the numpy code is the reference and the fallback.
USE_LOOPS = page_loops.HAVE_NUMBA


def install_migration_entries(m: Machine, pfns: np.ndarray) -> None:
    """``try_to_migrate``: replace every PTE mapping ``pfns`` with a migration entry (caller holds the lock).

    Present PTEs and device-private entries alike (``try_to_migrate_one`` makes a device-private entry a
    migration entry too). Each PTE's reference and mapcount are dropped; a dirty PTE marks its folio dirty, as
    the kernel does.
    """
    pages = m.pages
    if USE_LOOPS:
        for oid, vma in _vmas_mapping(m, pfns):
            page_loops.install_entries(pfns, pages.mapping, pages.index, pages.head, pages.mapcount,
                                     pages.refcount, pages.flags, oid, vma.pgoff, vma.npages, vma.pte_pfn,
                                     vma.pte_flags)
        return
    for vma, slots, pos in rmap_walk(m, pfns, _MAPPED):
        flags = vma.pte_flags[slots]
        vma.pte_flags[slots] = (flags & _KEPT) | _MIGRATION
        p = pfns[pos]
        heads = pages.head[p]
        dirty = (flags & np.uint8(PteFlag.DIRTY)) != 0
        if dirty.any():
            pages.set(heads[dirty], PageFlag.DIRTY)
        # A pfn has at most one PTE per VMA; heads repeat only for large folios.
        pages.mapcount[p] -= 1
        add_at(pages.refcount, heads, -1, unique=np.array_equal(heads, p))


def remove_migration_entries(m: Machine, old: np.ndarray, new: np.ndarray) -> None:
    """``remove_migration_ptes``: point the migration entries of ``old`` at ``new`` and make them present.

    ``new`` equal to ``old`` restores the original mapping (undo). Each PTE takes a reference and a mapcount
    on the page it now maps. An entry that now names a device-private page is a device-private entry, not a
    present PTE (:func:`mark_device_private`).
    """
    pages = m.pages
    if USE_LOOPS:
        for oid, vma in _vmas_mapping(m, old):
            page_loops.remove_entries(old, new, pages.mapping, pages.index, pages.head, pages.mapcount,
                                    pages.refcount, oid, vma.pgoff, vma.npages, vma.pte_pfn, vma.pte_flags)
        mark_device_private(m, new)
        return
    for vma, slots, pos in rmap_walk(m, old, PteFlag.MIGRATION):
        q = new[pos]
        vma.pte_pfn[slots] = q
        vma.pte_flags[slots] = (vma.pte_flags[slots] & _KEPT) | _PRESENT
        heads = pages.head[q]
        pages.mapcount[q] += 1
        add_at(pages.refcount, heads, 1, unique=np.array_equal(heads, q))
    mark_device_private(m, new)
