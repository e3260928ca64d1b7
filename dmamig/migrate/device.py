"""MigrateVma: driver-driven device migration of a virtual range (the kernel's ``migrate_device.c``).

``setup()`` collects the range into ``src`` (``pfn << MIGRATE_PFN_SHIFT | flags``), isolates, locks and
unmaps; the driver allocates destinations and copies with its DMA engine (``alloc_and_copy``); ``pages()``
moves page state only; ``finalize()`` remaps every slot to its new page, or restores the old one. A page
fails by losing its ``MIGRATE`` bit, never by aborting the range. ``abort()`` ends a migration the driver
cannot finish: it restores every page whose state has not moved, as ``finalize()`` does for pages that did
not migrate.

This module holds the steps a driver calls and their order; collection of the range is in
:mod:`.device_collect`, destinations, copies, splits and hole filling in :mod:`.device_move`.

Which pages ``setup()`` collects follows ``struct migrate_vma.flags`` (:class:`~dmamig.MigrateVmaSelect`) and
``pgmap_owner``: system memory with ``SYSTEM``, device pages with ``DEVICE_PRIVATE`` or ``DEVICE_COHERENT``
(as the machine's ``device_memory`` makes them) where the device node's :attr:`~dmamig.Node.owner` is the
caller's ``pgmap_owner``; holes always. With ``COMPOUND`` a PMD-sized folio (a PMD-sized hole) that the range
covers whole is one entry, ``MigratePfn.COMPOUND`` on its first slot and 0 on the others, and migrates to a
PMD-sized destination; a destination given in base pages splits it in ``pages()``, as ``migrate_vma_pages``
splits a source whose destination does not agree on ``COMPOUND``.
"""

from __future__ import annotations

from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from ..arguments import check_node
from ..errors import InvalidArgument
from ..flags import EAGAIN, EBUSY, MigrateVmaSelect, PageFlag
from ..mm_struct import MmStruct
from ..vma import folio_free_swap, install_migration_entries, remove_migration_entries
from .device_collect import HPAGE_PMD_NR, PFN_MIGRATE, PFN_VALID, VmaCollect, check_select
from .device_move import VmaMove
from .isolate import isolate_folios
from .state import migrate_folio

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..machine import Machine
    from ..mm import AddressSpace

__all__ = ["HPAGE_PMD_NR", "MigrateVma", "abort_in_flight", "migrate_device_coherent_folio"]


class MigrateVma(VmaCollect, VmaMove):
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
