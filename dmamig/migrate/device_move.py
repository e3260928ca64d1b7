"""The copy and move steps of a MigrateVma behind its public ones: destinations and the copy
(``alloc_and_copy``, the driver's part), splitting compound entries for base-page destinations
(``migrate_vma_split_unmapped_folio``, for ``pages()``), and mapping new pages into holes
(``migrate_vma_insert_page``, for ``finalize()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import DmaError
from ..flags import EAGAIN, EIO, ENOMEM, MIGRATE_PFN_SHIFT, PageFlag
from ..vma import NO_PFN, map_pages
from .device_collect import HPAGE_PMD_NR, PFN_COMPOUND, PFN_FLAG_BITS, PFN_MIGRATE, PFN_VALID, PFN_WRITE
from .entries import HPAGE_PMD_ORDER

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..mm import AddressSpace
    from ..vma import Vma

__all__ = ["VmaMove"]


class VmaMove:
    """The copy and move helpers of :class:`~dmamig.MigrateVma` (a mixin: ``MigrateVma.__init__`` sets the
    state; the entry helpers ``_pfns`` and ``_cover`` come from :class:`~.device_collect.VmaCollect`)."""

    mm: AddressSpace
    start: int
    node: int
    src: np.ndarray
    dst: np.ndarray
    status: np.ndarray
    _compound: bool

    def _moving(self) -> np.ndarray:
        """Entries with a page that is still selected and has a destination."""
        return ((self.src & PFN_MIGRATE) != 0) & ((self.src & PFN_VALID) != 0) & ((self.dst & PFN_VALID) != 0)

    def _alloc_and_copy(self, engine: DmaEngine | None) -> None:
        sel = np.flatnonzero(self.src & PFN_MIGRATE)
        comp = (self.src[sel] & PFN_COMPOUND) != 0
        if comp.any():
            self._alloc_and_copy_compound(engine, sel, comp)
            return
        m = self.mm.machine
        with m.lock:
            got = m.frames.alloc_folios(self.node, sel.size, 0)
            self.src[sel[got.size:]] &= ~PFN_MIGRATE
            self.status[sel[got.size:]] = ENOMEM
            sel = sel[: got.size]
            m.pages.set(got, PageFlag.LOCKED)
            writable = (self.src[sel] & PFN_WRITE) != 0
            self.dst[sel] = (got << MIGRATE_PFN_SHIFT) | PFN_VALID | np.where(writable, PFN_WRITE, 0)
        valid = (self.src[sel] & PFN_VALID) != 0
        src_p, dst_p = self._pfns(self.src[sel[valid]]), got[valid]
        m.frames.zero_pfns(got[~valid])
        self._copy(engine, src_p, dst_p, None, None, sel[valid])

    def _copy(self, engine: DmaEngine | None, src_p: np.ndarray, dst_p: np.ndarray, src_heads: np.ndarray | None,
              dst_heads: np.ndarray | None, entries: np.ndarray) -> None:
        """Copy base pages ``src_p`` to ``dst_p`` (whole folios ``src_heads`` to ``dst_heads`` among them, for
        the CPU copy); a failed DMA copy fails ``entries``, whose pages stay where they are."""
        m = self.mm.machine
        if src_p.size == 0:
            return
        if engine is None:
            if src_heads is None:
                m.frames.copy_pages(src_p, dst_p)
            else:
                m.frames.copy_folios(src_heads, dst_heads)
                nr = int(m.pages.nr_pages(src_heads).sum()) if src_heads.size else 0
                m.frames.copy_pages(src_p[nr:], dst_p[nr:])
            return
        try:
            engine.copy(src_p, dst_p).wait()
        except DmaError:
            self.status[self._cover(entries)] = EIO
            self.src[entries] &= ~PFN_MIGRATE

    def _alloc_and_copy_compound(self, engine: DmaEngine | None, sel: np.ndarray, comp: np.ndarray) -> None:
        m = self.mm.machine
        pages = m.pages
        with m.lock:
            csel = sel[comp]
            big = m.frames.alloc_folios(self.node, csel.size, HPAGE_PMD_ORDER) if csel.size else np.empty(0, np.int64)
            whole, short = csel[: big.size], csel[big.size:]
            # A compound entry without a PMD-sized destination is driven in base pages, one per slot, each
            # slot's entry owned by the compound entry (its write bit, its source page head + j).
            fb_slots = (short[:, None] + np.arange(HPAGE_PMD_NR)).ravel()
            fb_owner = np.repeat(short, HPAGE_PMD_NR)
            want = np.concatenate([sel[~comp], fb_slots])
            owner = np.concatenate([sel[~comp], fb_owner])
            got = m.frames.alloc_folios(self.node, want.size, 0)
            lacking, lack_owner = want[got.size:], owner[got.size:]
            lost = np.unique(lack_owner[lacking == lack_owner])  # entries whose first slot found no frame
            self.status[self._cover(lost)] = ENOMEM
            self.status[lacking] = ENOMEM
            self.src[lost] &= ~PFN_MIGRATE
            want, owner = want[: got.size], owner[: got.size]
            pages.set(np.concatenate([big, got]), PageFlag.LOCKED)
            self.dst[whole] = (big << MIGRATE_PFN_SHIFT) | PFN_VALID | PFN_COMPOUND \
                | np.where((self.src[whole] & PFN_WRITE) != 0, PFN_WRITE, 0)
            self.dst[want] = (got << MIGRATE_PFN_SHIFT) | PFN_VALID \
                | np.where((self.src[owner] & PFN_WRITE) != 0, PFN_WRITE, 0)
        # What to copy, base page by base page: whole folios, base pages, and the slots of folios driven in
        # base pages (source page head + j of their compound entry). Holes get zero-filled pages instead.
        wv = (self.src[whole] & PFN_VALID) != 0
        bv = (self.src[owner] & PFN_VALID) != 0
        offset = want - owner
        src_heads = self._pfns(self.src[whole[wv]])
        src_p = np.concatenate([pages.expand(src_heads), self._pfns(self.src[owner[bv]]) + offset[bv]])
        dst_p = np.concatenate([pages.expand(big[wv]), got[bv]])
        m.frames.zero_pfns(np.concatenate([pages.expand(big[~wv]), got[~bv]]))
        self._copy(engine, src_p, dst_p, src_heads, big[wv], np.unique(np.concatenate([whole[wv], owner[bv]])))

    def _split_for_base_destinations(self) -> None:
        """Split compound entries whose destination is not compound into one entry per page (lock held)."""
        if not self._compound:
            return
        m = self.mm.machine
        pages = m.pages
        comp = np.flatnonzero(((self.src & PFN_COMPOUND) != 0) & ((self.src & PFN_MIGRATE) != 0)
                              & ((self.dst & PFN_COMPOUND) == 0))
        for i in comp.tolist():
            span = slice(i, i + HPAGE_PMD_NR)
            if not ((self.dst[span] & PFN_VALID) != 0).any():
                continue  # no destination at all: restored whole by finalize()
            flags = self.src[i] & PFN_FLAG_BITS & ~PFN_COMPOUND
            if not self.src[i] & PFN_VALID:
                self.src[span] = flags  # a hole: one hole entry per page
                continue
            head = int(self._pfns(self.src[i]))
            pfns = head + np.arange(HPAGE_PMD_NR)
            if pages.refcount[head] != 1:  # a reference taken since setup(): split_folio refuses the folio
                self.src[i] &= ~PFN_MIGRATE
                self.status[span] = EAGAIN
                continue
            pages.split(head)
            pages.refcount[pfns[1:]] += 1  # the isolation reference stayed on the head; each piece gets one
            self.src[span] = (pfns << MIGRATE_PFN_SHIFT) | flags
            m.count_event("thp_migration_split")

    def _fill_holes(self, holes: np.ndarray) -> None:
        """Map the new zero-filled pages of holes, unless a racing fault filled the slot first."""
        if holes.size == 0:
            return
        ps = self.mm.machine.page_size
        addrs = self.start + holes * ps
        # Look the VMAs up again: a munmap elsewhere in the mapping may have split it since setup(), and a
        # hole that was munmapped meanwhile has nowhere to go (its new page is freed as unused).
        for vma in self.mm.vmas:
            inside = (addrs >= vma.start) & (addrs < vma.end)
            if inside.any():
                self._fill_vma_holes(vma, holes[inside], (addrs[inside] - vma.start) // ps)

    def _fill_vma_holes(self, vma: Vma, holes: np.ndarray, slots: np.ndarray) -> None:
        pages = self.mm.machine.pages
        comp = (self.dst[holes] & PFN_COMPOUND) != 0
        if comp.any():
            # A PMD-sized hole is filled whole or not at all: every slot must still be empty and in this VMA
            # (migrate_vma_insert_huge_pmd_page needs pmd_none).
            first, heads = slots[comp], self._pfns(self.dst[holes[comp]])
            members = first[:, None] + np.arange(HPAGE_PMD_NR)
            fits = (first + HPAGE_PMD_NR <= vma.npages)
            fits[fits] = (vma.pte_pfn[members[fits]] == NO_PFN).all(axis=1)
            self._map_new(vma, members[fits].ravel(), heads[fits], pages.expand(heads[fits]))
            self.status[self._cover(holes[comp][fits])] = 0
            holes, slots = holes[~comp], slots[~comp]
        free = vma.pte_pfn[slots] < 0
        holes, slots = holes[free], slots[free]
        new = self._pfns(self.dst[holes])
        self._map_new(vma, slots, new, new)
        self.status[holes] = 0

    def _map_new(self, vma: Vma, slots: np.ndarray, heads: np.ndarray, pfns: np.ndarray) -> None:
        """Make new folios ``heads`` (base pages ``pfns``) anonymous pages of ``slots`` and map them."""
        if heads.size == 0:
            return
        pages = self.mm.machine.pages
        pages.clear(heads, PageFlag.LOCKED)
        pages.set(heads, PageFlag.UPTODATE | PageFlag.LRU | PageFlag.SWAPBACKED)
        pages.mapping[pfns] = vma.obj.id
        pages.index[pfns] = vma.pgoff + slots
        pages.refcount[heads] -= 1  # the allocation reference: the PTEs take their own below
        vma.obj.pfns[vma.pgoff + slots] = pfns
        map_pages(self.mm.machine, vma, slots, pfns)
