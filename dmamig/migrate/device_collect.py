"""Collection of a MigrateVma's range into ``src``: the kernel's ``migrate_vma_collect`` (its
``migrate_vma_collect_hole`` and ``migrate_vma_collect_pmd``) and ``migrate_vma_unmap``.

:func:`check_select` validates ``flags`` and ``pgmap_owner``; :class:`VmaCollect` selects the pages they name
(the rules are in :mod:`dmamig.migrate.device`), makes compound entries of PMD-sized folios and holes the range
covers whole, splits other large folios, and isolates, locks and unmaps what it collects. The entry bits and
:data:`HPAGE_PMD_NR` defined here serve :mod:`.device_move` and :mod:`.device` too.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgument
from ..flags import MIGRATE_PFN_SHIFT, MigratePfn, MigrateVmaSelect, PageFlag, PteFlag
from ..nodes import check_owner
from ..vma import NO_PFN, install_migration_entries
from .entries import HPAGE_PMD_ORDER
from .isolate import isolate_folios

if TYPE_CHECKING:
    from ..mm import AddressSpace
    from ..vma import Vma

__all__ = ["HPAGE_PMD_NR", "LEGACY_SELECT", "PFN_COMPOUND", "PFN_FLAG_BITS", "PFN_MIGRATE", "PFN_VALID", "PFN_WRITE",
           "VmaCollect", "check_select"]

# The MigratePfn bits of src[] and dst[] entries as int64, and the mask of every flag bit below the pfn.
PFN_VALID = np.int64(MigratePfn.VALID)
PFN_MIGRATE = np.int64(MigratePfn.MIGRATE)
PFN_WRITE = np.int64(MigratePfn.WRITE)
PFN_COMPOUND = np.int64(MigratePfn.COMPOUND)
PFN_FLAG_BITS = np.int64((1 << MIGRATE_PFN_SHIFT) - 1)
#: Base pages of a compound entry (a PMD-sized folio, ``HPAGE_PMD_NR``).
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
_DEVICE = MigrateVmaSelect.DEVICE_PRIVATE | MigrateVmaSelect.DEVICE_COHERENT
#: What ``flags=None`` selects: every page, as MigrateVma did before it took flags (large folios are split).
LEGACY_SELECT = MigrateVmaSelect.SYSTEM | _DEVICE
_ALL_SELECT = LEGACY_SELECT | MigrateVmaSelect.COMPOUND


def check_select(flags: Any, pgmap_owner: Any) -> tuple[MigrateVmaSelect, Hashable | None]:
    """Validate ``MigrateVma``'s ``flags`` and ``pgmap_owner``; return them (``None`` flags: LEGACY_SELECT)."""
    owner = None if pgmap_owner is None else check_owner("pgmap_owner", pgmap_owner)
    if flags is None:
        return LEGACY_SELECT, owner
    if isinstance(flags, bool) or not isinstance(flags, (int, np.integer)) \
            or (isinstance(flags, enum.Enum) and not isinstance(flags, MigrateVmaSelect)):
        raise InvalidArgument(f"flags must be MigrateVmaSelect flags (SYSTEM, DEVICE_PRIVATE, DEVICE_COHERENT, "
                              f"COMPOUND, or-ed together) or None for every page, got {flags!r}")
    unknown = int(flags) & ~int(_ALL_SELECT)
    if int(flags) < 0 or unknown:
        raise InvalidArgument(f"flags {int(flags):#x} has bits MigrateVmaSelect does not define "
                              f"({unknown if int(flags) >= 0 else int(flags):#x}); allowed are SYSTEM (0x1), "
                              f"DEVICE_PRIVATE (0x2), DEVICE_COHERENT (0x4) and COMPOUND (0x8)")
    sel = MigrateVmaSelect(int(flags))
    if sel & _DEVICE and owner is None:
        # Device memory always has an owner (memremap_pages refuses a device pgmap without one), so a missing
        # pgmap_owner could never select a device page: it is a mistake, not a request.
        raise InvalidArgument(f"flags {sel!r} select device pages, which need pgmap_owner: the owner token of "
                              f"the device node whose pages to collect (Node.owner, by default the node's id)")
    return sel, owner


class VmaCollect:
    """The collection steps of :class:`~dmamig.MigrateVma` (a mixin: ``MigrateVma.__init__`` sets the state)."""

    mm: AddressSpace
    start: int
    node: int
    npages: int
    flags: MigrateVmaSelect
    pgmap_owner: Hashable | None
    _any_owner: bool
    src: np.ndarray
    cpages: int
    _collected: int
    _compound: bool
    fault_page: int

    @staticmethod
    def _pfns(entries: np.ndarray) -> np.ndarray:
        return entries >> MIGRATE_PFN_SHIFT

    def _cover(self, idx: np.ndarray) -> np.ndarray:
        """The page slots of entries ``idx``: a compound entry covers HPAGE_PMD_NR slots, others one."""
        idx = np.asarray(idx, dtype=np.int64)
        if not self._compound:
            return idx
        nr = np.where((self.src[idx] & PFN_COMPOUND) != 0, HPAGE_PMD_NR, 1)
        if (nr == 1).all():
            return idx
        return np.repeat(idx, nr) + np.arange(int(nr.sum())) - np.repeat(np.cumsum(nr) - nr, nr)

    def _selected_nodes(self) -> np.ndarray:
        """Per node: whether ``flags`` and ``pgmap_owner`` select its pages (``migrate_vma_collect_pmd``)."""
        m = self.mm.machine
        sel = int(self.flags)  # plain ints: flag arithmetic on enum members is slow
        dev_flag = int(MigrateVmaSelect.DEVICE_PRIVATE if m.device_private else MigrateVmaSelect.DEVICE_COHERENT)
        out = np.zeros(len(m.nodes), dtype=bool)
        for nd in m.nodes:
            if nd.kind != "device":
                out[nd.id] = bool(sel & int(MigrateVmaSelect.SYSTEM))
            else:
                mine = self._any_owner or bool(nd.owner == self.pgmap_owner)
                out[nd.id] = bool(sel & dev_flag) and mine
        return out

    def _collect(self, vma: Vma, s0: int, s1: int) -> None:
        """Collect slots ``s0:s1`` of ``vma`` into ``src``: select, isolate, lock and unmap (lock held).

        ``migrate_vma_collect`` (``migrate_vma_collect_hole``, ``migrate_vma_collect_pmd``) and
        ``migrate_vma_unmap`` for :meth:`~dmamig.MigrateVma.setup`, which has checked the range; sets
        ``cpages`` and the base pages behind the collected entries.
        """
        m = self.mm.machine
        pages = m.pages
        pfns = vma.pte_pfn[s0:s1]
        sel = int(self.flags)
        compound = bool(sel & int(MigrateVmaSelect.COMPOUND))
        # Holes are collected whatever the flags (migrate_vma_collect_hole); the zero page only for SYSTEM.
        holes = pfns < 0 if sel & int(MigrateVmaSelect.SYSTEM) else pfns == NO_PFN
        self.src[holes] = PFN_MIGRATE
        if compound:
            self._collect_compound_holes(pfns)
        selected = self._selected_nodes()
        present = np.flatnonzero(pfns >= 0)
        if not selected.all():
            present = present[selected[m.nodemap.node_of(pfns[present])]]
        heads = pages.head[pfns[present]]
        whole: list[tuple[int, int]] = []  # (slot, head) of PMD-sized folios collected whole
        for head in np.unique(heads[pages.order[heads] > 0]).tolist():
            slot = self._pmd_slot(pfns, head) if compound else -1
            if slot >= 0:
                whole.append((slot, head))
            else:
                # Split so that every page is handled on its own (migrate_vma_collect_pmd's fallback).
                self._try_split(head)
        if whole:
            self._collect_whole(vma, s0, whole)
            done = np.zeros(self.npages, dtype=bool)
            for slot, _head in whole:
                done[slot: slot + HPAGE_PMD_NR] = True
            present = present[~done[present]]
        p = pfns[present]
        on_node = m.nodemap.node_of(p) == self.node
        large = pages.order[pages.head[p]] > 0
        # The fault page is locked by its fault handler, which holds one reference on it too.
        faulting = p == self.fault_page
        locked = pages.test(pages.head[p], PageFlag.LOCKED) & ~faulting
        # migrate_vma_check_page: a folio with a mapping (here the swap cache's) has one reference more.
        pinned = pages.refcount[p] - pages.test(p, PageFlag.SWAPCACHE) - faulting != pages.mapcount[p]
        take = ~on_node & ~large & ~locked & ~pinned
        present, p = present[take], p[take]
        rc = isolate_folios(m, p)
        present, p = present[rc == 0], p[rc == 0]
        pages.set(p, PageFlag.LOCKED)
        writable = (vma.pte_flags[s0 + present] & np.uint8(PteFlag.WRITE)) != 0
        install_migration_entries(m, p)
        m.count_event("migrate_tlb_flush")
        self.src[present] = (p << MIGRATE_PFN_SHIFT) | PFN_VALID | PFN_MIGRATE | np.where(writable, PFN_WRITE, 0)
        collected = np.flatnonzero(self.src & PFN_MIGRATE)
        self.cpages = int(collected.size)
        self._compound = bool((self.src[collected] & PFN_COMPOUND).any())
        self._collected = int(self._cover(collected).size)

    def _pmd_slot(self, pfns: np.ndarray, head: int) -> int:
        """Slot of a PMD-sized folio mapped whole, in order, at a PMD-aligned address of the range; else -1.

        That is the kernel's PMD-mapped THP whose PMD the range covers (``IS_ALIGNED(start, HPAGE_PMD_SIZE)``
        and the same for the end): only such a folio is collected whole.
        """
        m = self.mm.machine
        if int(m.pages.order[head]) != HPAGE_PMD_ORDER:
            return -1
        at = np.flatnonzero(pfns == head)
        if at.size != 1:
            return -1
        slot = int(at[0])
        first = self.start // m.page_size + slot
        if first % HPAGE_PMD_NR or slot + HPAGE_PMD_NR > pfns.size:
            return -1
        return slot if np.array_equal(pfns[slot: slot + HPAGE_PMD_NR], head + np.arange(HPAGE_PMD_NR)) else -1

    def _collect_compound_holes(self, pfns: np.ndarray) -> None:
        """PMD-sized, PMD-aligned runs of empty slots become one compound hole entry (the rest 0)."""
        ps = self.mm.machine.page_size
        base = self.start // ps
        first = (-base) % HPAGE_PMD_NR
        n = (pfns.size - first) // HPAGE_PMD_NR
        if n <= 0:
            return
        blocks = (pfns[first: first + n * HPAGE_PMD_NR] == NO_PFN).reshape(n, HPAGE_PMD_NR).all(axis=1)
        for b in np.flatnonzero(blocks).tolist():
            slot = first + b * HPAGE_PMD_NR
            self.src[slot: slot + HPAGE_PMD_NR] = 0
            self.src[slot] = PFN_MIGRATE | PFN_COMPOUND

    def _collect_whole(self, vma: Vma, s0: int, whole: list[tuple[int, int]]) -> None:
        """Isolate, lock and unmap PMD-sized folios whole; busy, pinned or resident ones are left alone."""
        if not whole:
            return
        m = self.mm.machine
        pages = m.pages
        slots = np.array([s for s, _ in whole], dtype=np.int64)
        heads = np.array([h for _, h in whole], dtype=np.int64)
        members = heads[:, None] + np.arange(HPAGE_PMD_NR)
        faulting = heads == self.fault_page  # locked by its fault handler, which holds a reference
        pinned = pages.refcount[heads] - faulting != pages.mapcount[members].sum(axis=1)
        ok = ~pinned & (~pages.test(heads, PageFlag.LOCKED) | faulting) & (m.nodemap.node_of(heads) != self.node)
        slots, heads = slots[ok], heads[ok]
        rc = isolate_folios(m, heads)
        slots, heads = slots[rc == 0], heads[rc == 0]
        if heads.size == 0:
            return
        pages.set(heads, PageFlag.LOCKED)
        ptes = vma.pte_flags[s0 + slots[:, None] + np.arange(HPAGE_PMD_NR)]
        writable = ((ptes & np.uint8(PteFlag.WRITE)) != 0).all(axis=1)  # pmd_write of the whole mapping
        install_migration_entries(m, pages.expand(heads))
        self.src[slots] = (heads << MIGRATE_PFN_SHIFT) | PFN_VALID | PFN_MIGRATE | PFN_COMPOUND \
            | np.where(writable, PFN_WRITE, 0)

    def _try_split(self, head: int) -> None:
        m = self.mm.machine
        pages = m.pages
        nr = 1 << int(pages.order[head])
        pfns = head + np.arange(nr)
        faulting = head == self.fault_page  # locked by its fault handler, which holds a reference
        if pages.refcount[head] - faulting == int(pages.mapcount[pfns].sum()) \
                and (faulting or not pages.test(head, PageFlag.LOCKED)):
            pages.split(head)
            if faulting:
                # The fault handler holds the head page's lock; every other page of the split folio is unlocked
                # (__split_huge_page unlocks the pages but the one its caller holds).
                pages.clear(pfns[1:], PageFlag.LOCKED)
            # Base pages nobody maps any more (a partly unmapped folio) are freed, as __split_huge_page does.
            m.frames.free_folios(pfns[pages.refcount[pfns] <= 0])
            m.count_event("thp_migration_split")
