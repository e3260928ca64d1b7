"""MigrateVma: driver-driven device migration of a virtual range (the kernel's ``migrate_device.c``).

``setup()`` collects the range into ``src`` (``pfn << MIGRATE_PFN_SHIFT | flags``), isolates, locks and
unmaps; the driver allocates destinations and copies with its DMA engine (``alloc_and_copy``); ``pages()``
moves page state only; ``finalize()`` remaps every slot to its new page, or restores the old one. A page
fails by losing its ``MIGRATE`` bit, never by aborting the range. ``abort()`` ends a migration the driver
cannot finish: it restores every page whose state has not moved, as ``finalize()`` does for pages that did
not migrate.

This module holds the whole of it, as the kernel's file does: the steps a driver calls and their order, then
the collection of the range (``migrate_vma_collect`` and ``migrate_vma_unmap``), then destinations, copies,
splits and hole filling (the driver's ``alloc_and_copy``, ``migrate_vma_split_unmapped_folio``,
``migrate_vma_insert_page``).

Which pages ``setup()`` collects follows ``struct migrate_vma.flags`` (:class:`~dmamig.MigrateVmaSelect`) and
``pgmap_owner``: system memory with ``SYSTEM``, device pages with ``DEVICE_PRIVATE`` or ``DEVICE_COHERENT``
(as the machine's ``device_memory`` makes them) where the device node's :attr:`~dmamig.Node.owner` is the
caller's ``pgmap_owner``; holes always. With ``COMPOUND`` a PMD-sized folio (a PMD-sized hole) that the range
covers whole is one entry, ``MigratePfn.COMPOUND`` on its first slot and 0 on the others, and migrates to a
PMD-sized destination; a destination given in base pages splits it in ``pages()``, as ``migrate_vma_pages``
splits a source whose destination does not agree on ``COMPOUND``.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import check_node
from ..errors import DmaError, InvalidArgument
from ..flags import (
    EAGAIN,
    EBUSY,
    EIO,
    ENOMEM,
    MIGRATE_PFN_SHIFT,
    MigratePfn,
    MigrateVmaSelect,
    PageFlag,
    PteFlag,
)
from ..mm_struct import MmStruct
from ..nodes import check_owner
from ..vma import NO_PFN, folio_free_swap, install_migration_entries, map_pages, remove_migration_entries
from .entries import HPAGE_PMD_ORDER
from .isolate import isolate_folios
from .state import migrate_folio

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..machine import Machine
    from ..mm import AddressSpace
    from ..vma import Vma

__all__ = ["HPAGE_PMD_NR", "LEGACY_SELECT", "PFN_COMPOUND", "PFN_FLAG_BITS", "PFN_MIGRATE", "PFN_VALID", "PFN_WRITE",
           "MigrateVma", "abort_in_flight", "check_select", "migrate_device_coherent_folio"]


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


class MigrateVma:
    """Migrate ``[start, end)`` of ``mm`` to ``node``, step by step as a device driver does.

    Parameters
    ----------
    mm : AddressSpace
        The address space; ``[start, end)`` must lie inside one of its mappings.
    start, end : int
        Page-aligned addresses, ``end > start``.
    node : int
        The destination node (host or device).
    flags : MigrateVmaSelect or int, optional
        ``struct migrate_vma.flags``: which pages to collect. ``SYSTEM``: system (host) memory and the zero
        page; ``DEVICE_PRIVATE`` / ``DEVICE_COHERENT``: device pages of a machine with device-private /
        device-coherent memory (``Machine(device_memory=...)``) whose node's :attr:`~dmamig.Node.owner` is
        ``pgmap_owner``; ``COMPOUND``: PMD-sized folios the range covers whole are collected whole (else
        they are split). Holes are collected whatever the flags. ``None`` (the default) selects every page
        as MigrateVma did before it took flags: ``SYSTEM | DEVICE_PRIVATE | DEVICE_COHERENT``, device pages
        of any owner unless ``pgmap_owner`` is given, large folios split. The kernel has no such default
        (its drivers always pass flags); an explicit value behaves as the kernel's.
    pgmap_owner : hashable, optional
        The caller's device memory owner token, compared with each device node's ``owner`` (by default the
        node's id). Required when ``flags`` selects device pages.
    fault_page : int, optional
        ``struct migrate_vma.fault_page``: the pfn of the device-private page whose CPU fault runs this
        migration (a ``migrate_to_ram`` handler). The fault handler holds that page locked and holds one
        reference on it, so :meth:`setup` collects it locked, expects that extra reference
        (``migrate_vma_check_page``), and :meth:`finalize` leaves it locked for the handler to unlock.

    Attributes
    ----------
    src, dst : numpy.ndarray
        One int64 entry per page: ``pfn << 6 | MigratePfn`` flags (``src`` from :meth:`setup`, ``dst`` from
        :meth:`alloc_and_copy`). A hole (nothing mapped, or the shared zero page when ``SYSTEM`` is
        selected, as ``migrate_vma_collect_pmd`` selects it) is ``MIGRATE`` without ``VALID``; finalize maps
        a new page. A page not collected is 0. A folio collected whole is ``COMPOUND`` on its first slot and
        0 on the others; so is its destination (or one base page per slot, see :meth:`alloc_and_copy`).
    cpages : int
        Entries collected by :meth:`setup` (``MIGRATE`` set); a compound entry counts once, as in the kernel.
    flags : MigrateVmaSelect
        The selection in force (``None`` given: ``SYSTEM | DEVICE_PRIVATE | DEVICE_COHERENT``).
    pgmap_owner : hashable or None
        The owner given.
    status : numpy.ndarray
        Per page after :meth:`finalize`: ``0`` migrated, or why not (``-EBUSY`` locked/pinned/shared,
        ``-ENOMEM``, ``-EIO``, ``-EAGAIN``).

    Notes
    -----
    Between :meth:`setup` and :meth:`finalize` the range is unmapped behind migration entries and every
    access to it waits. A driver that cannot go on calls :meth:`abort`; used as a context manager, leaving
    the ``with`` block calls it, so an exception raised by the driver restores the range and propagates,
    and a block that did not reach :meth:`finalize` is ended as the kernel's ``migrate_vma_finalize`` ends
    it (pages moved by :meth:`pages` stay moved, every other page is restored)::

        with MigrateVma(mm, start, end, node) as mv:
            mv.setup()
            mv.alloc_and_copy(engine=m.dma)
            mv.pages()
            mv.finalize()

    :meth:`AddressSpace.close` and :meth:`Machine.close` abort a migration still in flight on the address
    space (after the step running on another thread, if any, has returned) instead of waiting for it.

    As ``migrate_device.c``, device migration counts no ``pgmigrate_*`` events: :meth:`finalize` adds the
    pages it migrated (holes included) to vmstat ``migrate_vma_success`` and the collected pages it could not
    migrate to ``migrate_vma_fail``, in base pages (a compound entry counts ``HPAGE_PMD_NR``).

    Pages already on ``node`` are not collected (an emulator rule: the kernel leaves that test to the driver).
    """

    def __init__(self, mm: AddressSpace | MmStruct, start: int, end: int, node: int, *,
                 flags: MigrateVmaSelect | int | None = None, pgmap_owner: Hashable | None = None,
                 fault_page: int | None = None):
        m = mm.machine
        ps = m.page_size
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or v % ps:
                raise InvalidArgument(f"{name} must be a page-aligned address ({ps} bytes), got {v!r}")
        if end <= start:
            raise InvalidArgument(f"end ({end:#x}) must be greater than start ({start:#x})")
        self.mm = mm
        # The page-fault path (floor 6) runs a migrate_vma on the address space's state, not its facade.
        self.mms: MmStruct = mm if isinstance(mm, MmStruct) else mm.mm_struct
        self.fault_page = -1 if fault_page is None else int(fault_page)
        self.start, self.end = int(start), int(end)
        self.node = check_node(m, "node", node)
        self.flags, self.pgmap_owner = check_select(flags, pgmap_owner)
        # flags=None without an owner keeps the old contract: device pages of every owner are collected.
        self._any_owner = flags is None and pgmap_owner is None
        self.npages = (self.end - self.start) // ps
        self.src = np.zeros(self.npages, dtype=np.int64)
        self.dst = np.zeros(self.npages, dtype=np.int64)
        self.status = np.zeros(self.npages, dtype=np.int32)
        self.cpages = 0
        self._collected = 0  # base pages behind the collected entries (a compound entry is HPAGE_PMD_NR)
        self._compound = False  # whether setup() collected a compound entry (else every entry is one page)
        self._state = "new"

    def _step(self, expected: str, nxt: str) -> None:
        if self._state != expected:
            why = " (aborted: abort() or a close of the address space ended it)" if self._state == "aborted" \
                else ""
            raise InvalidArgument(f"MigrateVma steps run in order setup, alloc_and_copy, pages, finalize: "
                                  f"cannot run {nxt} after {self._state}{why}")
        self._state = nxt

    @property
    def in_flight(self) -> bool:
        """True between a successful :meth:`setup` and :meth:`finalize` or :meth:`abort`: the range is
        unmapped and its accessors wait."""
        return self._state in ("setup", "copying", "copied", "pages")

    def __enter__(self) -> MigrateVma:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Restore on any exit: after an exception the driver's own error propagates (abort raises nothing
        # of its own for a migration it can end), and a block that skipped finalize() must not leave the
        # range unmapped behind entries that every accessor would wait on forever.
        self.abort()

    def abort(self) -> None:
        """End the migration now: restore every page whose state has not moved, free unused destinations.

        The old pages are remapped, unlocked and put back on the LRU, and the destinations allocated for
        them are freed, as ``migrate_vma_finalize`` does for pages that did not migrate; their ``status``
        stays ``-EBUSY`` (or the ``-ENOMEM``/``-EIO``/``-EAGAIN`` already recorded). After :meth:`pages` the
        moved pages' state lives on the destinations (the kernel's commit point), so those pages finish
        migrating as in :meth:`finalize`. Nothing happens before :meth:`setup` or after :meth:`finalize`;
        no later step can run. A step running on another thread is waited for first.
        """
        m = self.mm.machine
        with m.changed:
            while self._state == "copying":  # the copy runs outside the lock: let it land first
                m.changed.wait()
            if not self.in_flight:
                if self._state == "new":
                    self._state = "aborted"
                return
            committed = self._state == "pages"
            if not committed:
                self.src &= ~PFN_MIGRATE  # nothing moved yet: every entry is a page that did not migrate
            self._state = "pages"
            self.finalize()
            if not committed:
                self._state = "aborted"

    def setup(self) -> int:
        """Collect, isolate, lock and unmap the range; return ``cpages``.

        Raises InvalidArgument when the range is not inside one mapping (the kernel's ``-EINVAL``). Shared
        mappings, pages ``flags`` and ``pgmap_owner`` do not select, pages already on the target node, locked
        and pinned pages are not collected (their entries are 0). Large folios are split, except a PMD-sized
        folio that the range covers whole when ``flags`` has ``COMPOUND``: its first slot is one compound
        entry. ``cpages`` counts entries, a compound one once, as the kernel counts them.
        """
        mms, m = self.mms, self.mm.machine
        with m.changed:
            mms.check_open()
            self._step("new", "setup")
            try:
                segs = mms.wait_migrations(self.start, self.end - self.start)
            except Exception as exc:
                self._state = "new"
                raise InvalidArgument(f"range {self.start:#x}-{self.end:#x} is not fully mapped: {exc}") from exc
            if len(segs) != 1:
                self._state = "new"
                raise InvalidArgument(f"range {self.start:#x}-{self.end:#x} spans {len(segs)} mappings; "
                                      f"migrate_vma works within one")
            vma, s0, s1 = segs[0]
            self.status[:] = EBUSY
            if vma.shared:
                return 0  # only anonymous private memory migrates to a device (the selftests' -ENOENT)
            self._collect(vma, s0, s1)
            mms.device_migrations.append(self)  # close() aborts it if the driver never finishes
        return self.cpages

    def alloc_and_copy(self, engine: DmaEngine | None = None) -> None:
        """Allocate destinations on the node and copy: with ``engine`` (a DMA copy) or on this thread.

        A hole gets a zero-filled page. A compound entry gets a PMD-sized folio; where the node has no free
        PMD-sized block it gets a base page for each of its slots instead (``dst`` entries without
        ``COMPOUND``), and :meth:`pages` splits the source, as the kernel does when the destination does not
        agree on ``COMPOUND``. Entries that get no frame or whose copy fails lose ``MIGRATE``.
        """
        m = self.mm.machine
        with m.lock:
            # "copying" until the copy has landed: abort() and close() wait for it rather than free
            # destinations a DMA engine may still be writing.
            self._step("setup", "copying")
        try:
            self._alloc_and_copy(engine)
        except BaseException:
            with m.changed:  # a copy that did not finish leaves nothing worth moving: restore those pages
                self.src[(self.dst & PFN_VALID) != 0] &= ~PFN_MIGRATE
                self._state = "copied"
                m.changed.notify_all()
            raise
        with m.changed:
            self._state = "copied"
            m.changed.notify_all()

    def pages(self) -> None:
        """Move page state to the destinations, no copy (``folio_migrate_mapping`` + ``folio_migrate_flags``).

        A compound entry whose destination is base pages is split first, source folio and entry alike (the
        kernel's ``migrate_vma_split_unmapped_folio``; counted in vmstat ``thp_migration_split``).
        """
        m = self.mm.machine
        pages = m.pages
        with m.lock:
            self._step("copied", "pages")
            self._split_for_base_destinations()
            sel = np.flatnonzero(self._moving())
            old, new = self._pfns(self.src[sel]), self._pfns(self.dst[sel])
            if self._compound:
                # A destination of another size than its source cannot take its state (a driver's mistake).
                wrong = pages.order[old] != pages.order[new]
                self.src[sel[wrong]] &= ~PFN_MIGRATE
                sel, old, new = sel[~wrong], old[~wrong], new[~wrong]
            # Only the isolation reference may remain, and the swap cache's for a folio that keeps its mapping.
            # A folio bound for device memory leaves the swap cache first (migrate_vma_pages: folio_free_swap;
            # the folio is locked by this migration).
            device = np.array([nd.kind == "device" for nd in m.nodes], dtype=bool)
            folio_free_swap(m, old[device[m.nodemap.node_of(new)]], locked=True)
            swap = pages.test(old, PageFlag.SWAPCACHE)
            # The fault handler's reference on the fault page is expected too (migrate_vma_check_page).
            busy = pages.refcount[old] != 1 + np.where(swap, pages.nr_pages(old), 0) + (old == self.fault_page)
            self.status[self._cover(sel[busy])] = EAGAIN
            self.src[sel[busy]] &= ~PFN_MIGRATE
            sel, old, new = sel[~busy], old[~busy], new[~busy]
            # The fault handler's reference stays on the old page (it puts that page after the migration); only
            # the migration's own references move to the new one.
            faulting = old[old == self.fault_page]
            pages.refcount[faulting] -= 1
            migrate_folio(m, old, new, pages.nr_pages(old))
            pages.refcount[faulting] += 1

    def finalize(self) -> None:
        """Remap each slot to its new page (or restore the old one), unlock, put back, free the leftovers."""
        m = self.mm.machine
        pages = m.pages
        with m.changed:
            self._step("pages", "done")
            if self in self.mms.device_migrations:
                self.mms.device_migrations.remove(self)
            moved = self._moving()
            kept = ((self.src & PFN_VALID) != 0) & ~moved
            old, new = self._pfns(self.src[moved]), self._pfns(self.dst[moved])
            back = self._pfns(self.src[kept])
            if self._compound:  # migration entries are per base page
                remove_migration_entries(m, pages.expand(old), pages.expand(new))
                remove_migration_entries(m, pages.expand(back), pages.expand(back))
            else:
                remove_migration_entries(m, old, new)
                remove_migration_entries(m, back, back)
            pages.clear(np.concatenate([old, back, new]), PageFlag.ISOLATED)
            # migrate_device_finalize unlocks every source but the fault page: its fault handler unlocks it.
            src = np.concatenate([old, back])
            pages.clear(np.concatenate([src[src != self.fault_page], new]), PageFlag.LOCKED)
            pages.set(np.concatenate([back, new]), PageFlag.LRU)
            m.frames.put_folios(old)  # the migration's reference: a reference taken since pages() keeps it alive
            m.frames.put_folios(np.concatenate([back, new]))
            moved_slots = self._cover(np.flatnonzero(moved))
            self.status[moved_slots] = 0
            holes = np.flatnonzero(((self.src & PFN_MIGRATE) != 0) & ((self.src & PFN_VALID) == 0)
                                   & ((self.dst & PFN_VALID) != 0))
            self._fill_holes(holes)
            unused = ((self.dst & PFN_VALID) != 0) & ~moved
            unused[holes[self.status[holes] == 0]] = False
            m.frames.free_folios(self._pfns(self.dst[unused]))
            # migrate_device.c counts no pgmigrate_* events: device migration has counters of its own, in pages.
            n = moved_slots.size + int((self.status[self._cover(holes)] == 0).sum())
            m.count_event("migrate_vma_success", n)
            m.count_event("migrate_vma_fail", self._collected - n)
            m.changed.notify_all()


    # -- collection: migrate_vma_collect (its hole and PMD walks) and migrate_vma_unmap ---------------------
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

    # -- destinations and copies (the driver's part), splits for base-page destinations, holes filled ----------
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


def abort_in_flight(mm: MmStruct) -> None:
    """Abort every MigrateVma still in flight on ``mm`` (``AddressSpace.close``; caller holds the lock)."""
    for mv in list(mm.device_migrations):
        mv.abort()
    mm.device_migrations.clear()


def migrate_device_coherent_folio(m: Machine, head: int) -> int:
    """``migrate_device_coherent_folio``: move one device-coherent folio to host memory; ``0`` or ``-EBUSY``.

    What a long-term pin does with a device-coherent page, which is not long-term pinnable: a device
    migration of the one pfn, without a VMA or a page-table walk (``migrate_device_unmap`` straight on the
    folio, every mapper's PTE becoming a migration entry), a host page allocated for it, the folio copied by
    the CPU (``folio_copy``), its state moved (``migrate_device_pages``) and every mapping pointed at the new
    page (``migrate_device_finalize``). A folio that is locked, large (the kernel warns: device-coherent folios
    are base pages), holds a reference besides its mappings, or finds no host page stays where it is:
    ``-EBUSY``. As ``migrate_device.c`` it counts no ``pgmigrate_*`` event and records no migration event;
    vmstat ``migrate_to_ram`` counts the page brought back. Caller holds the lock.
    """
    pages = m.pages
    h = np.array([head], dtype=np.int64)
    # folio_lock would sleep on a locked folio; here the pin that asked comes back and tries again.
    if pages.order[head] or pages.test(h, PageFlag.LOCKED)[0] or isolate_folios(m, h)[0]:
        return EBUSY
    pages.set(h, PageFlag.LOCKED)
    install_migration_entries(m, h)
    m.count_event("migrate_tlb_flush")
    swap = int(pages.test(h, PageFlag.SWAPCACHE)[0])
    # migrate_vma_check_page: only the migration's reference (and the swap cache's) may be left.
    new = m.frames.alloc_folios(0, 1, 0) if pages.refcount[head] == 1 + swap else np.empty(0, np.int64)
    if new.size == 0:
        remove_migration_entries(m, h, h)
        pages.clear(h, PageFlag.LOCKED | PageFlag.ISOLATED)
        pages.set(h, PageFlag.LRU)
        m.frames.put_folios(h)
        return EBUSY
    pages.set(new, PageFlag.LOCKED)
    m.frames.copy_pages(h, new)
    migrate_folio(m, h, new, pages.nr_pages(h))
    remove_migration_entries(m, h, new)
    pages.clear(np.concatenate([h, new]), PageFlag.LOCKED | PageFlag.ISOLATED)
    pages.set(new, PageFlag.LRU)
    m.frames.put_folios(h)  # the migration's reference: frees the device page
    m.frames.put_folios(new)  # the allocation's: the mappings hold the new page now
    m.count_event("migrate_to_ram")
    return 0
