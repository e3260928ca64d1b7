"""MigrateVma: driver-driven device migration of a virtual range (the kernel's ``migrate_device.c``).

``setup()`` collects the range into ``src`` (``pfn << MIGRATE_PFN_SHIFT | flags``), isolates, locks and
unmaps; the driver allocates destinations and copies with its DMA engine (``alloc_and_copy``); ``pages()``
moves page state only; ``finalize()`` remaps every slot to its new page, or restores the old one. A page
fails by losing its ``MIGRATE`` bit, never by aborting the range. ``abort()`` ends a migration the driver
cannot finish: it restores every page whose state has not moved, as ``finalize()`` does for pages that did
not migrate.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from .._validate import check_node
from ..errors import DmaError, InvalidArgument
from ..flags import EAGAIN, EBUSY, EIO, ENOMEM, MIGRATE_PFN_SHIFT, MigratePfn, PageFlag, PteFlag
from ..memory import map_pages
from ..vma import install_migration_entries, remove_migration_entries
from .core import isolate_folios
from .state import migrate_folio

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..mm import AddressSpace
    from ..vma import Vma

__all__ = ["MigrateVma", "abort_in_flight"]

_VALID = np.int64(MigratePfn.VALID)
_MIGRATE = np.int64(MigratePfn.MIGRATE)
_WRITE = np.int64(MigratePfn.WRITE)


class MigrateVma:
    """Migrate ``[start, end)`` of ``mm`` to ``node``, step by step as a device driver does.

    Attributes
    ----------
    src, dst : numpy.ndarray
        One int64 entry per page: ``pfn << 6 | MigratePfn`` flags (``src`` from :meth:`setup`, ``dst`` from
        :meth:`alloc_and_copy`). A hole (nothing mapped, or the shared zero page, as
        ``migrate_vma_collect_pmd`` selects it) is ``MIGRATE`` without ``VALID``; finalize maps a new page.
    cpages : int
        Pages collected by :meth:`setup` (``MIGRATE`` set).
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
    migrate to ``migrate_vma_fail``.
    """

    def __init__(self, mm: AddressSpace, start: int, end: int, node: int):
        m = mm.machine
        ps = m.page_size
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or v % ps:
                raise InvalidArgument(f"{name} must be a page-aligned address ({ps} bytes), got {v!r}")
        if end <= start:
            raise InvalidArgument(f"end ({end:#x}) must be greater than start ({start:#x})")
        self.mm = mm
        self.start, self.end = int(start), int(end)
        self.node = check_node(m, "node", node)
        self.npages = (self.end - self.start) // ps
        self.src = np.zeros(self.npages, dtype=np.int64)
        self.dst = np.zeros(self.npages, dtype=np.int64)
        self.status = np.zeros(self.npages, dtype=np.int32)
        self.cpages = 0
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
                self.src &= ~_MIGRATE  # nothing moved yet: every entry is a page that did not migrate
            self._state = "pages"
            self.finalize()
            if not committed:
                self._state = "aborted"

    def _moving(self) -> np.ndarray:
        """Entries with a page that is still selected and has a destination."""
        return ((self.src & _MIGRATE) != 0) & ((self.src & _VALID) != 0) & ((self.dst & _VALID) != 0)

    @staticmethod
    def _pfns(entries: np.ndarray) -> np.ndarray:
        return entries >> MIGRATE_PFN_SHIFT

    def setup(self) -> int:
        """Collect, isolate, lock and unmap the range; return ``cpages``.

        Raises InvalidArgument when the range is not inside one mapping (the kernel's ``-EINVAL``). Shared
        mappings, pages already on the target node, locked and pinned pages are not selected.
        """
        mm, m = self.mm, self.mm.machine
        pages = m.pages
        with m.changed:
            mm._check_open()
            self._step("new", "setup")
            try:
                segs = mm._wait_migrations(self.start, self.end - self.start)
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
            pfns = vma.pte_pfn[s0:s1]
            holes = pfns < 0
            self.src[holes] = _MIGRATE
            # Large folios are split so that every page is handled on its own (migrate_vma_collect_pmd).
            for head in np.unique(pages.head[pfns[~holes]][pages.order[pages.head[pfns[~holes]]] > 0]).tolist():
                self._try_split(head)
            present = np.flatnonzero(~holes)
            p = pfns[present]
            on_node = m.nodemap.node_of(p) == self.node
            large = pages.order[pages.head[p]] > 0
            locked = pages.test(pages.head[p], PageFlag.LOCKED)
            pinned = pages.refcount[p] != pages.mapcount[p]
            take = ~on_node & ~large & ~locked & ~pinned
            present, p = present[take], p[take]
            rc = isolate_folios(m, p)
            present, p = present[rc == 0], p[rc == 0]
            pages.set(p, PageFlag.LOCKED)
            writable = (vma.pte_flags[s0 + present] & np.uint8(PteFlag.WRITE)) != 0
            install_migration_entries(m, p)
            m.count_event("migrate_tlb_flush")
            self.src[present] = (p << MIGRATE_PFN_SHIFT) | _VALID | _MIGRATE | np.where(writable, _WRITE, 0)
            self.cpages = int(((self.src & _MIGRATE) != 0).sum())
            mm._device_migrations.append(self)  # close() aborts it if the driver never finishes
        return self.cpages

    def _try_split(self, head: int) -> None:
        m = self.mm.machine
        pages = m.pages
        nr = 1 << int(pages.order[head])
        pfns = head + np.arange(nr)
        if pages.refcount[head] == int(pages.mapcount[pfns].sum()) and not pages.test(head, PageFlag.LOCKED):
            pages.split(head)
            # Base pages nobody maps any more (a partly unmapped folio) are freed, as __split_huge_page does.
            m.free_folios(pfns[pages.refcount[pfns] <= 0])
            m.count_event("thp_migration_split")

    def alloc_and_copy(self, engine: DmaEngine | None = None) -> None:
        """Allocate destinations on the node and copy: with ``engine`` (a DMA copy) or on this thread.

        A hole gets a zero-filled page. Entries that get no frame or whose copy fails lose ``MIGRATE``.
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
                self.src[(self.dst & _VALID) != 0] &= ~_MIGRATE
                self._state = "copied"
                m.changed.notify_all()
            raise
        with m.changed:
            self._state = "copied"
            m.changed.notify_all()

    def _alloc_and_copy(self, engine: DmaEngine | None) -> None:
        m = self.mm.machine
        sel = np.flatnonzero(self.src & _MIGRATE)
        with m.lock:
            got = m.alloc_folios(self.node, sel.size, 0)
            self.src[sel[got.size:]] &= ~_MIGRATE
            self.status[sel[got.size:]] = ENOMEM
            sel = sel[: got.size]
            m.pages.set(got, PageFlag.LOCKED)
            writable = (self.src[sel] & _WRITE) != 0
            self.dst[sel] = (got << MIGRATE_PFN_SHIFT) | _VALID | np.where(writable, _WRITE, 0)
        valid = (self.src[sel] & _VALID) != 0
        src_p, dst_p = self._pfns(self.src[sel[valid]]), got[valid]
        m.zero_pfns(got[~valid])
        if src_p.size == 0:
            return
        if engine is None:
            m.copy_pages(src_p, dst_p)
            return
        try:
            engine.copy(src_p, dst_p).wait()
        except DmaError:
            bad = sel[valid]
            self.src[bad] &= ~_MIGRATE
            self.status[bad] = EIO

    def pages(self) -> None:
        """Move page state to the destinations, no copy (``folio_migrate_mapping`` + ``folio_migrate_flags``)."""
        m = self.mm.machine
        pages = m.pages
        with m.lock:
            self._step("copied", "pages")
            sel = np.flatnonzero(self._moving())
            old, new = self._pfns(self.src[sel]), self._pfns(self.dst[sel])
            busy = pages.refcount[old] != 1  # only the isolation reference may remain
            self.src[sel[busy]] &= ~_MIGRATE
            self.status[sel[busy]] = EAGAIN
            sel, old, new = sel[~busy], old[~busy], new[~busy]
            migrate_folio(m, old, new, np.ones(old.size, dtype=np.int64))

    def finalize(self) -> None:
        """Remap each slot to its new page (or restore the old one), unlock, put back, free the leftovers."""
        m = self.mm.machine
        pages = m.pages
        with m.changed:
            self._step("pages", "done")
            if self in self.mm._device_migrations:
                self.mm._device_migrations.remove(self)
            moved = self._moving()
            kept = ((self.src & _VALID) != 0) & ~moved
            old, new = self._pfns(self.src[moved]), self._pfns(self.dst[moved])
            remove_migration_entries(m, old, new)
            back = self._pfns(self.src[kept])
            remove_migration_entries(m, back, back)
            pages.clear(np.concatenate([old, back, new]), PageFlag.LOCKED | PageFlag.ISOLATED)
            pages.set(np.concatenate([back, new]), PageFlag.LRU)
            m.put_folios(old)  # the migration's reference: a reference taken since pages() keeps it alive
            m.put_folios(np.concatenate([back, new]))
            self.status[moved] = 0
            holes = np.flatnonzero(((self.src & _MIGRATE) != 0) & ((self.src & _VALID) == 0)
                                   & ((self.dst & _VALID) != 0))
            self._fill_holes(holes)
            unused = ((self.dst & _VALID) != 0) & ~moved
            unused[holes[self.status[holes] == 0]] = False
            m.free_folios(self._pfns(self.dst[unused]))
            # migrate_device.c counts no pgmigrate_* events: device migration has counters of its own.
            n = int(moved.sum()) + int((self.status[holes] == 0).sum())
            m.count_event("migrate_vma_success", n)
            m.count_event("migrate_vma_fail", self.cpages - n)
            m.changed.notify_all()

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
        free = vma.pte_pfn[slots] < 0
        holes, slots = holes[free], slots[free]
        new = self._pfns(self.dst[holes])
        pages.clear(new, PageFlag.LOCKED)
        pages.set(new, PageFlag.UPTODATE | PageFlag.LRU | PageFlag.SWAPBACKED)
        pages.mapping[new] = vma.obj.id
        pages.index[new] = vma.pgoff + slots
        pages.refcount[new] -= 1  # the allocation reference: the PTE takes its own below
        vma.obj.pfns[vma.pgoff + slots] = new
        map_pages(self.mm, vma, slots, new)
        self.status[holes] = 0


def abort_in_flight(mm: AddressSpace) -> None:
    """Abort every MigrateVma still in flight on ``mm`` (``AddressSpace.close``; caller holds the lock)."""
    for mv in list(mm._device_migrations):
        mv.abort()
    mm._device_migrations.clear()
