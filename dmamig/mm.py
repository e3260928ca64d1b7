"""AddressSpace: a process's mappings and page tables, accesses, pins, fork, mprotect/mremap and migration.

The class is the public facade over the address space's state, a :class:`~dmamig.mm_struct.MmStruct` (VMAs,
pins, notifiers, migrations in flight); the work lives beside it, named after the kernel's files:
:mod:`dmamig.mmap` (mapping and unmapping), :mod:`dmamig.memory` (faults, copy-on-write, the zero page,
the access path), :mod:`dmamig.gup` (pins), :mod:`dmamig.fork`, :mod:`dmamig.mprotect` (mprotect and
mremap) and :mod:`dmamig.migrate.move_pages` (``migrate`` and ``move_pages``). What an address maps to, and the
``mmu_interval_notifier``-like callbacks of a device that keeps copies of the pages, are methods here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import as_bytes, check_node
from .filemap import File, check_file_mapping
from .flags import MigrateMode, MigrateReason, Prot, PteFlag
from .fork import fork_mm
from .gup import drop_pins, pin_range, unpin_range, write_pinned
from .memory import access_pfns, fault, read_pages, write_pages
from .migrate.device import abort_in_flight
from .migrate.move_pages import migrate_range, move_pages
from .migrate.options import MigrateOptions
from .mm_struct import MmStruct, segment_pfns
from .mmap import check_mmap, get_unmapped_area, unmap_range, unmap_slots
from .mprotect import change_protection, move_vma
from .vma import MemObject, Vma

if TYPE_CHECKING:
    from .dma import DmaEngine
    from .machine import Machine
    from .migrate import MigrateResult
    from .migrate.move_pages import MovePagesResult

__all__ = ["AddressSpace"]

_TOUCHED = np.uint8(PteFlag.YOUNG | PteFlag.DIRTY)
_YOUNG = np.uint8(PteFlag.YOUNG)


class AddressSpace:
    """One process's virtual memory: VMAs with page tables over the machine's frames.

    Create with :meth:`Machine.address_space`. Every method is thread-safe; an access that meets a
    migration entry waits until the migration finishes.

    Private memory behaves as the kernel's anonymous memory: a read of an untouched page maps the shared
    zero page (no frame; :meth:`pfn_of` gives ``ZERO_PFN``, :meth:`node_of` gives ``-1``, :meth:`pte_flags`
    shows ``PRESENT | SPECIAL`` without ``WRITE``), and :meth:`fork` shares private pages copy-on-write.

    Attributes
    ----------
    machine : Machine
        The machine whose frames this address space maps.
    mm_struct : MmStruct
        The address space's state (VMAs, pins, notifiers, migrations in flight), which the page faults, gup,
        fork, mprotect and the migration code work on; the methods here are the public way to change it.
    """

    def __init__(self, machine: Machine):
        self.machine = machine
        self.mm_struct = MmStruct(machine)

    # -- lookup -----------------------------------------------------------------------------------------------
    @property
    def vmas(self) -> tuple[Vma, ...]:
        """The VMAs in address order."""
        return self.mm_struct.vmas

    @property
    def migration_stalls(self) -> tuple[int, int]:
        """``(count, nanoseconds)``: calls of this address space that met a migration entry and waited for it
        to go, and the wall time they waited in all (what an application sees of migrations in flight)."""
        with self.machine.lock:
            return self.mm_struct.stalls, self.mm_struct.stall_ns

    # -- what an address maps ---------------------------------------------------------------------------------
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
            return segment_pfns(mms.wait_migrations(addr, length))

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

    # -- mmap / munmap ----------------------------------------------------------------------------------------
    def mmap(self, length: int, shared: bool = False, order: int = 0, file: File | None = None,
             offset: int = 0) -> int:
        """Map ``length`` bytes (rounded up to pages) of anonymous memory or of a file, readable and writable.

        Parameters
        ----------
        length : int
            Bytes; rounded up to whole pages.
        shared : bool
            A shared mapping (shared memory: fork shares it, its pages sit in a page cache) instead of a
            private one (fork shares its pages copy-on-write).
        order : int
            Folio order of the pages faulted in: ``9`` gives 2 MiB folios with 4 KiB pages. The address is
            aligned to the folio size; a fault falls back to base pages when no contiguous block is free.
        file : File, optional
            Map this file (from :meth:`Machine.open <dmamig.Machine.open>`) from byte ``offset`` on. Shared: the
            mapping is the file's page cache, and writes reach the file. Private: pages are read from the page
            cache and a write copies the page for this mapping alone (copy-on-write); the file never changes.
            A page past the end of the file cannot be accessed (AddressFault, the kernel's SIGBUS). File
            mappings use base pages (``order=0``); a shared mapping of a file opened read-only is refused.
        offset : int
            Page-aligned byte offset in ``file``.

        Returns
        -------
        int
            The start address.
        """
        mms = self.mm_struct
        mms.check_open()
        m = self.machine
        with m.lock:
            npages, shared, order = check_mmap(mms, length, shared, order)
            if file is not None:
                pgoff = check_file_mapping(m, file, offset, shared, order, npages)
                start = get_unmapped_area(mms, npages, order)
                # A private mapping's copies are anonymous pages at the file's page index.
                chain = (file,) if shared else (MemObject(m, pgoff + npages, False, 0), file)
                mms.insert(Vma(mms, start, npages, chain[0], pgoff, chain=chain))
                return start
            start = get_unmapped_area(mms, npages, order)
            mms.insert(Vma(mms, start, npages, MemObject(m, npages, shared, order), 0))
        return start

    def munmap(self, addr: int, length: int) -> None:
        """Unmap ``[addr, addr + length)`` (rounded up to pages); parts of a VMA may be unmapped.

        Holes inside the range are allowed, as with munmap(2); an address with no mapping at all is fine too.
        """
        mms = self.mm_struct
        mms.check_open()
        addr, length = mms.check_range(addr, length, aligned=True)
        ps = self.machine.page_size
        with self.machine.changed:
            mms.notify(addr, addr + -(-length // ps) * ps)
            unmap_range(mms, addr, addr + -(-length // ps) * ps)
            self.machine.changed.notify_all()

    def msync(self, addr: int, length: int, sync: bool = True) -> int:
        """Write back the files that ``[addr, addr + length)`` maps shared, like msync(2).

        ``sync`` is ``MS_SYNC``: each file's dirty folios are written and waited for (the whole file, which
        covers the range); ``False`` is ``MS_ASYNC``: writeback is started and finishes on the flusher. Private
        and anonymous mappings in the range have nothing to write. Returns ``0``, or the first file's
        ``-EIO`` / ``-ENOSPC`` from a failed writeback (reported once, as :meth:`File.fsync
        <dmamig.filemap.File.fsync>` reports it). Raises AddressFault where nothing is mapped.
        """
        mms = self.mm_struct
        mms.check_open()
        addr, length = mms.check_range(addr, length, aligned=True)
        with self.machine.lock:
            files = list(dict.fromkeys(v.obj for v, _s0, _s1 in mms.segments(addr, length)
                                       if isinstance(v.obj, File)))
        rc = 0
        for f in files:
            if sync:
                with self.machine.changed:
                    self.machine.page_cache.write_back(f, wait=True)
                    err, f.wb_err = f.wb_err, 0
                rc = rc or (-err if err else 0)
            else:
                with self.machine.changed:
                    self.machine.page_cache.write_back(f, wait=False)
        return rc

    # -- faults -----------------------------------------------------------------------------------------------
    def populate(self, addr: int, length: int, node: int = 0) -> None:
        """Fault in every page of ``[addr, addr + length)`` now, new pages on ``node`` (like MAP_POPULATE).

        A writable private mapping is faulted for writing, as the kernel's ``populate_vma_page_range`` does:
        zero-page and copy-on-write pages are replaced by pages of its own. A read-only private mapping gets
        the zero page, and a mapping without access rights is left alone. Pages present stay where they are.
        Raises AddressFault on an unmapped address and OutOfMemory when ``node`` is full.
        """
        mms = self.mm_struct
        mms.check_open()
        addr, length = mms.check_range(addr, length, aligned=False)
        node = check_node(self.machine, "node", node)
        with self.machine.changed:
            for v, s0, s1 in mms.wait_migrations(addr, length):
                if v.readable:
                    fault(mms, v, s0, s1, node, write=v.writable and not v.shared)

    # -- access -----------------------------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> np.ndarray:
        """Return a host copy of ``length`` bytes at ``addr`` as a uint8 array.

        Untouched private pages map the zero page (no frame is used); device-resident pages are migrated
        back first. Raises AddressFault on an unmapped address or a mapping without read access.
        """
        mms = self.mm_struct
        mms.check_open()
        addr, length = mms.check_range(addr, length, aligned=False)
        m = self.machine
        ps = m.page_size
        with m.changed:
            pfns = access_pfns(mms, addr, length, write=False)
            self._touch(addr, length, dirty=False)
            data = read_pages(m, pfns).reshape(-1)
        off = addr % ps
        return data[off: off + length].copy()

    def write(self, addr: int, data: Any) -> None:
        """Write bytes (bytes-like or a uint8 array) at ``addr``, faulting pages in on first touch.

        A write to a copy-on-write page (after :meth:`fork`) or to the zero page copies it first, for this
        address space alone. Raises AddressFault on an unmapped address or a mapping without write access.
        """
        mms = self.mm_struct
        mms.check_open()
        buf = as_bytes(data)
        addr, length = mms.check_range(addr, buf.size, aligned=False)
        m = self.machine
        with m.changed:
            mms.notify(addr, addr + length)
            pfns = access_pfns(mms, addr, length, write=True)
            write_pages(m, pfns, addr % m.page_size, buf)
            self._touch(addr, length, dirty=True)
            if m.page_cache.files:
                # A write through a shared file mapping dirties its folios (the write fault's
                # folio_mark_dirty; writeback write-protects nothing here, so every write counts).
                m.page_cache.mark_dirty(pfns)

    def _touch(self, addr: int, length: int, dirty: bool) -> None:
        bits = _TOUCHED if dirty else _YOUNG
        for v, s0, s1 in self.mm_struct.segments(addr, length):
            v.pte_flags[s0:s1] |= bits

    # -- pins -------------------------------------------------------------------------------------------------
    def pin(self, addr: int, length: int, longterm: bool = True) -> None:
        """Pin the pages of ``[addr, addr + length)``: fault them in and hold an extra reference on each.

        Pinned pages do not migrate (``-EAGAIN``), like pages under a GUP pin. As ``pin_user_pages`` does, a
        private page is made this address space's own first (the zero page and copy-on-write pages are
        replaced by a copy), so the pin and the mapping always see the same page; :meth:`fork` copies pinned
        pages at once instead of sharing them. Device-private pages of the range are faulted back to host
        memory by any pin (their entries are not present). Device-coherent pages are pinned where they are
        by a short-term pin; a long-term pin (``longterm``, the default: ``FOLL_LONGTERM``) migrates them to
        host memory first (``migrate_device_coherent_folio``), device memory not being long-term pinnable.
        Pages another thread is migrating are waited for; bringing device pages back is retried a bounded
        number of times (``dmamig.gup.LONGTERM_PIN_RETRIES``), then the pin fails with OutOfMemory and pins
        nothing.
        """
        pin_range(self.mm_struct, addr, length, longterm=longterm)

    def write_pinned(self, addr: int, data: Any) -> None:
        """Write bytes at ``addr`` through this address space's pins, as a pin holder writes its pages.

        A driver, an RDMA NIC or io_uring writes the pages it holds with ``pin_user_pages`` directly, not
        through the page table: the write neither faults nor waits for a migration entry, so it can land on a
        page a migration has unmapped and is about to move. The folio is marked dirty, as
        ``unpin_user_pages_dirty_lock`` does.

        Parameters
        ----------
        addr : int
            First byte; any alignment.
        data : bytes-like or uint8 array
            What to write; every page it touches must be pinned by this address space (:meth:`pin`).

        Raises InvalidArgument when a page of the range is not pinned here, AddressFault on an unmapped
        address.
        """
        self.mm_struct.check_open()
        write_pinned(self.mm_struct, addr, as_bytes(data))

    def unpin(self, addr: int, length: int) -> None:
        """Drop pins taken with :meth:`pin` on ``[addr, addr + length)``.

        Like ``unpin_user_pages`` it never waits: a pinned page a migration has unmapped is still the pinned
        page, and dropping the pin lets that migration's next pass move it.
        """
        unpin_range(self.mm_struct, addr, length)

    # -- fork, mprotect, mremap -------------------------------------------------------------------------------
    def fork(self) -> AddressSpace:
        """A child address space, as fork(2) makes it.

        Shared mappings are shared (mapcount 2). Private pages are shared copy-on-write: both processes map
        the same frame without the write bit, and the first write in either copies the page for the writer
        (the last mapper just gets the write bit back). Pages this address space has pinned are copied now.
        A page under migration is not waited for: the child gets a copy of its migration entry (readable, for
        a private mapping, in both processes), and the migration maps its new page in both.

        Raises OutOfMemory (and leaves nothing behind) when there are no frames for the pinned pages' copies.
        """
        self.mm_struct.check_open()
        return fork_mm(self.mm_struct)

    def mprotect(self, addr: int, length: int, prot: Prot | int) -> None:
        """Change the access rights of ``[addr, addr + length)`` (rounded up to pages), like mprotect(2).

        Parameters
        ----------
        addr, length : int
            A page-aligned start address and a length in bytes; every page must be mapped.
        prot : Prot or int
            ``Prot.NONE``, ``Prot.READ``, ``Prot.WRITE`` or ``Prot.READ | Prot.WRITE`` (0 to 3).

        Notes
        -----
        VMAs whose rights change are split at the range's ends; a VMA that has ``prot`` already is left
        alone. Removing write access clears the write bit of every PTE. Any change of rights, write kept
        or not, makes a migration entry readable, so a page under migration comes back read-only until a
        write fault. Granting write access sets no bit: the next write faults (and copies a copy-on-write
        page). Pages and migrations are not touched, nor waited for.
        """
        change_protection(self.mm_struct, addr, length, prot)

    def mremap(self, old_addr: int, old_len: int, new_len: int, may_move: bool = True) -> int:
        """Resize, and if needed move, the mapping at ``[old_addr, old_addr + old_len)``, like mremap(2).

        Parameters
        ----------
        old_addr, old_len : int
            A page-aligned address and a length inside one VMA.
        new_len : int
            The new length: smaller unmaps the tail, larger grows in place when the addresses after the
            range are free, else moves the mapping to a fresh range.
        may_move : bool
            ``MREMAP_MAYMOVE``: without it a growth that does not fit in place raises InvalidArgument.

        Returns
        -------
        int
            The mapping's (new) address. A moved mapping keeps its pages: same frames, same data, and
            migrations in flight over it complete (the rmap finds pages by object and index, not address).
        """
        with self.machine.changed:
            if isinstance(old_addr, (int, np.integer)) and isinstance(old_len, (int, np.integer)):
                self.mm_struct.notify(int(old_addr), int(old_addr) + int(old_len))
            return move_vma(self.mm_struct, old_addr, old_len, new_len, may_move)

    # -- migration --------------------------------------------------------------------------------------------
    def migrate(self, addr: int, length: int, node: int, mode: MigrateMode = MigrateMode.SYNC,
                engine: DmaEngine | None = None, options: MigrateOptions | None = None,
                move_all: bool = False, reason: MigrateReason = MigrateReason.MR_SYSCALL) -> MigrateResult:
        """Migrate the pages of ``[addr, addr + length)`` to ``node`` (like move_pages(2) over a range).

        Parameters
        ----------
        addr, length : int
            A page-aligned start address and a length in bytes (rounded up to pages).
        node : int
            Target node.
        mode : MigrateMode
            ``ASYNC``, ``SYNC_LIGHT`` or ``SYNC``.
        engine : DmaEngine, optional
            ``None`` for copy migration (the migrating thread copies every folio); ``m.dma`` for no-copy
            migration: each batch is unmapped, its copy submitted to the DMA engine and waited for, and only
            page state moves (``NO_COPY``).
        options : MigrateOptions, optional
            Batching; ``None`` is the kernel's (512-page batches, one at a time). Other settings are
            experiments (see :class:`~dmamig.MigrateOptions`).
        move_all : bool
            ``MPOL_MF_MOVE_ALL``: also move pages that other processes map (after a fork, or shared memory).
            Without it such a page is left alone with ``-EACCES``, as with ``MPOL_MF_MOVE``.
        reason : MigrateReason
            Why the pages migrate: ``MR_SYSCALL`` (``migrate_pages(2)``, the default), ``MR_DEMOTION`` for a
            tiering policy's demotion, ``MR_MEMPOLICY_MBIND``, ...; recorded in ``Machine.migrate_events``,
            counted by its own vmstat counters, and deciding the rules :class:`~dmamig.MigrateReason` lists.

        Returns
        -------
        MigrateResult
            One status per page of the range: ``0`` (migrated or already on ``node``), ``-ENOENT`` (not
            populated), ``-EFAULT`` (the zero page: nothing to move), ``-EACCES`` (mapped by another process,
            without ``move_all``) or the failure's ``-errno``. Pages left alone are not counted failed.
        """
        return migrate_range(self.mm_struct, addr, length, node, mode, engine, options, move_all, reason)

    def move_pages(self, addrs: Any, nodes: Any = None, mode: MigrateMode = MigrateMode.SYNC,
                   engine: DmaEngine | None = None, move_all: bool = False,
                   options: MigrateOptions | None = None) -> MovePagesResult:
        """Move the page at each address to its node, or report where each page is, like move_pages(2).

        Parameters
        ----------
        addrs : sequence of int
            Addresses (any byte of a page names the page), in any order.
        nodes : sequence of int, optional
            The target node of each address; ``None`` only queries (the syscall with ``nodes == NULL``).
        mode, engine, options :
            As for :meth:`migrate`.
        move_all : bool
            ``MPOL_MF_MOVE_ALL``; without it a page other processes map gets ``-EACCES``.

        Returns
        -------
        MovePagesResult
            ``status[i]``: the node the page at ``addrs[i]`` reached, or ``-ENOENT`` (not populated, or under
            migration right now), ``-EFAULT`` (no mapping there, or the zero page), ``-EACCES`` (mapped by
            another process, without ``move_all``), ``-EBUSY`` (its folio is isolated: by another migration,
            or named earlier in the same group), or the migration's ``-EAGAIN``/``-EBUSY``/``-ENOMEM``/``-EIO``.
            ``rc`` is the syscall's return value.

        Notes
        -----
        As the kernel's ``do_pages_move``: addresses are taken in order and queued; the queue is migrated
        whenever the target node changes and after every address that was not queued. A group that leaves
        folios unmigrated stops the call: ``rc`` counts them and every address after the group (untried, they
        report where their page is); ``-ENOMEM`` stops it too. Nothing waits for a migration in flight.
        """
        return move_pages(self.mm_struct, addrs, nodes, mode, engine, move_all, options)

    def close(self) -> None:
        """Unmap everything and drop this address space's pins. Idempotent.

        Migrations in flight in other threads finish first; a :class:`MigrateVma` left between ``setup()``
        and ``finalize()`` is aborted (:meth:`MigrateVma.abort`).
        """
        mms = self.mm_struct
        if mms.closed:
            return
        m = self.machine
        with m.changed:
            mms.notify(0, 1 << 62)
            # A device migration whose driver stopped between setup() and finalize() would hold its
            # migration entries forever: abort it (its pages come back) instead of waiting.
            abort_in_flight(mms)
            while any(v.has_migration_entries() for v in mms.vmas):
                m.changed.wait()
            for v in mms.vmas:
                unmap_slots(mms, v, np.arange(v.npages))
                mms.replace(v, [])
            drop_pins(mms, dict(mms.pins))
            mms.closed = True
            m.forget_space(self)
            m.changed.notify_all()

    def __enter__(self) -> AddressSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

