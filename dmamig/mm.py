"""AddressSpace: a process's mappings, page tables, faults, accesses, pins, fork and migration."""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ._validate import check_node
from .errors import AddressFault, InvalidArgument, OutOfMemory
from .flags import MigrateMode, PageFlag, PteFlag
from .migrate.options import MigrateOptions
from .nodes import MAX_ORDER
from .vma import NO_PFN, MemObject, Vma

if TYPE_CHECKING:
    from .dma import DmaEngine
    from .machine import Machine
    from .migrate import MigrateResult

__all__ = ["AddressSpace"]

#: First virtual address handed out by mmap (like a process's mmap base, away from 0).
MMAP_BASE = 0x10_0000_0000
_NEW_PTE = np.uint8(PteFlag.PRESENT | PteFlag.WRITE | PteFlag.YOUNG)
_TOUCHED = np.uint8(PteFlag.YOUNG | PteFlag.DIRTY)
# Flags of a freshly faulted anonymous or shared-memory page.
_NEW_PAGE_FLAGS = PageFlag.UPTODATE | PageFlag.LRU | PageFlag.SWAPBACKED
#: memcg id given to pages faulted by address spaces (one cgroup for the emulated machine).
DEFAULT_MEMCG = 1
# How many times read/write try to bring device pages back before accessing them in place.
_MIGRATE_TO_RAM_TRIES = 3


class AddressSpace:
    """One process's virtual memory: VMAs with page tables over the machine's frames.

    Create with :meth:`Machine.address_space`. Every method is thread-safe; an access that meets a
    migration entry waits until the migration finishes.
    """

    def __init__(self, machine: Machine):
        self.machine = machine
        self._vmas: list[Vma] = []
        self._next = MMAP_BASE
        self._pins: dict[int, int] = {}
        self._closed = False

    # -- lookup -----------------------------------------------------------------------------------------------
    @property
    def vmas(self) -> tuple[Vma, ...]:
        """The VMAs in address order."""
        return tuple(self._vmas)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("this address space is closed")

    def _check_range(self, addr: Any, length: Any, aligned: bool) -> tuple[int, int]:
        for name, v in (("addr", addr), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgument(f"{name} must be an integer, got {type(v).__name__}")
        if addr < 0:
            raise InvalidArgument(f"addr must be >= 0, got {addr}")
        if length <= 0:
            raise InvalidArgument(f"length must be > 0, got {length}")
        ps = self.machine.page_size
        if aligned and addr % ps:
            raise InvalidArgument(f"addr {addr:#x} must be aligned to the page size ({ps} bytes)")
        return int(addr), int(length)

    def _segments(self, addr: int, length: int) -> list[tuple[Vma, int, int]]:
        """``[(vma, first_slot, end_slot), ...]`` covering ``[addr, addr + length)``; AddressFault on a hole."""
        ps = self.machine.page_size
        end = addr + length
        out = []
        cur = addr
        i = bisect.bisect_right([v.start for v in self._vmas], cur) - 1
        while cur < end:
            if i < 0 or i >= len(self._vmas) or not (self._vmas[i].start <= cur < self._vmas[i].end):
                raise AddressFault(f"address {cur:#x} is not mapped (access {addr:#x}+{length:#x})")
            v = self._vmas[i]
            s0 = (cur - v.start) // ps
            s1 = -(-(min(end, v.end) - v.start) // ps)
            out.append((v, s0, s1))
            cur = v.end
            i += 1
        return out

    def _wait_migrations(self, addr: int, length: int) -> list[tuple[Vma, int, int]]:
        """Segments of the range once no migration entry is left in it (caller holds ``machine.changed``)."""
        while True:
            segs = self._segments(addr, length)
            if not any(v.has_migration_entries(s0, s1) for v, s0, s1 in segs):
                return segs
            self.machine.changed.wait()

    # -- mmap / munmap ----------------------------------------------------------------------------------------
    def mmap(self, length: int, shared: bool = False, order: int = 0) -> int:
        """Map ``length`` bytes (rounded up to pages) of anonymous memory; return the start address.

        Parameters
        ----------
        length : int
            Bytes; rounded up to whole pages.
        shared : bool
            A shared mapping (shared memory: fork shares it, its pages sit in a page cache) instead of a
            private one (fork copies it).
        order : int
            Folio order of the pages faulted in: ``9`` gives 2 MiB folios with 4 KiB pages. The address is
            aligned to the folio size; a fault falls back to base pages when no contiguous block is free.
        """
        self._check_open()
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
            raise InvalidArgument(f"length must be a positive integer, got {length!r}")
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 0 <= order <= MAX_ORDER:
            raise InvalidArgument(f"order must be an integer in 0..{MAX_ORDER}, got {order!r}")
        m = self.machine
        ps = m.page_size
        npages = -(-int(length) // ps)
        align = ps << order
        with m.lock:
            start = -(-self._next // align) * align
            self._next = start + npages * ps + ps  # a guard page between mappings
            obj = MemObject(m, npages, bool(shared), int(order))
            self._insert(Vma(self, start, npages, obj, 0))
        return start

    def _insert(self, vma: Vma) -> None:
        bisect.insort(self._vmas, vma, key=lambda v: v.start)
        vma.obj.vmas.append(vma)

    def _remove(self, vma: Vma) -> None:
        self._vmas.remove(vma)
        vma.obj.vmas.remove(vma)

    def munmap(self, addr: int, length: int) -> None:
        """Unmap ``[addr, addr + length)`` (rounded up to pages); parts of a VMA may be unmapped.

        Holes inside the range are allowed, as with munmap(2); an address with no mapping at all is fine too.
        """
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=True)
        m = self.machine
        ps = m.page_size
        end = addr + -(-length // ps) * ps
        with m.changed:
            while True:
                hit = [v for v in self._vmas if v.start < end and v.end > addr]
                spans = [(v, max(0, (addr - v.start) // ps), min(v.npages, (end - v.start) // ps)) for v in hit]
                if not any(v.has_migration_entries(s0, s1) for v, s0, s1 in spans):
                    break
                m.changed.wait()
            for v, s0, s1 in spans:
                self._unmap_slots(v, np.arange(s0, s1))
                self._split_vma(v, s0, s1)
            m.changed.notify_all()

    def _unmap_slots(self, vma: Vma, slots: np.ndarray) -> None:
        """Drop the PTEs of ``slots``: mapcount and the PTE's reference; free what nobody holds."""
        m = self.machine
        pfns = vma.pte_pfn[slots]
        live = pfns >= 0
        pfns = pfns[live]
        if pfns.size:
            np.subtract.at(m.pages.mapcount, pfns, 1)
            if not vma.shared:
                vma.obj.pfns[vma.pgoff + slots[live]] = NO_PFN
            m.put_folios(m.pages.head[pfns])
        vma.pte_pfn[slots] = NO_PFN
        vma.pte_flags[slots] = 0

    def _split_vma(self, vma: Vma, s0: int, s1: int) -> None:
        """Remove slots ``[s0, s1)`` from ``vma``, keeping the pieces on either side as VMAs of their own."""
        ps = self.machine.page_size
        self._remove(vma)
        if s0 > 0:
            self._insert(Vma(self, vma.start, s0, vma.obj, vma.pgoff, vma.pte_pfn[:s0].copy(),
                             vma.pte_flags[:s0].copy()))
        if s1 < vma.npages:
            self._insert(Vma(self, vma.start + s1 * ps, vma.npages - s1, vma.obj, vma.pgoff + s1,
                             vma.pte_pfn[s1:].copy(), vma.pte_flags[s1:].copy()))
        if not vma.obj.vmas:
            vma.obj.release()

    # -- faults -----------------------------------------------------------------------------------------------
    def _fault(self, vma: Vma, s0: int, s1: int, node: int) -> None:
        """Fault in every unpopulated slot of ``[s0, s1)``, new pages on ``node`` (caller holds the lock).

        Shared mappings find pages in their object's page cache first. A large-folio mapping allocates whole
        folios where the folio lies inside the VMA and is wholly absent, else base pages. Raises OutOfMemory,
        with nothing allocated, when the node is short.
        """
        slots = s0 + np.flatnonzero(vma.pte_pfn[s0:s1] == NO_PFN)
        if slots.size == 0:
            return
        m, pages, obj = self.machine, self.machine.pages, vma.obj
        cached = obj.pfns[vma.pgoff + slots]
        hit = cached >= 0
        if hit.any():
            self._map(vma, slots[hit], cached[hit])
        slots = slots[~hit]
        if slots.size == 0:
            return
        idx = vma.pgoff + slots
        folio_heads, base_idx = self._plan_folios(vma, idx)
        order = obj.order
        big = m.alloc_folios(node, folio_heads.size, order) if folio_heads.size else np.empty(0, np.int64)
        # Folios that found no contiguous block fall back to base pages, as a THP fault does.
        fallback = folio_heads[big.size:]
        if fallback.size:
            base_idx = np.sort(np.concatenate([base_idx, (fallback[:, None] + np.arange(1 << order)).ravel()]))
        small = m.alloc_folios(node, base_idx.size, 0)
        if small.size < base_idx.size:
            m.free_folios(np.concatenate([big, small]))
            raise OutOfMemory(f"node {node} is out of free pages: {base_idx.size + (big.size << order)} needed "
                              f"for a fault at {vma.start + int(slots[0]) * m.page_size:#x}, "
                              f"{m.nodes[node].free_pages} free")
        new_idx = np.concatenate([(folio_heads[: big.size, None] + np.arange(1 << order)).ravel(), base_idx]) \
            if big.size else base_idx
        new_pfns = np.concatenate([pages.expand(big), small]) if big.size else small
        heads = np.concatenate([big, small])
        m.zero_pfns(new_pfns)
        pages.mapping[new_pfns] = obj.id
        pages.index[new_pfns] = new_idx
        pages.set(heads, _NEW_PAGE_FLAGS)
        pages.memcg[heads] = DEFAULT_MEMCG
        # The allocation reference becomes the page cache's (one per base page) for shared memory; for
        # anonymous memory the PTEs' references are the only ones.
        pages.refcount[heads] = pages.nr_pages(heads) if obj.shared else 0
        obj.pfns[new_idx] = new_pfns
        m.count_event("pgfault", new_pfns.size)
        self._map(vma, new_idx - vma.pgoff, new_pfns)

    def _plan_folios(self, vma: Vma, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split missing object indices into whole large folios (their first index) and base pages."""
        order = vma.obj.order
        if order == 0:
            return np.empty(0, np.int64), idx
        nr = 1 << order
        first = np.unique(idx >> order) << order
        inside = (first >= vma.pgoff) & (first + nr <= vma.pgoff + vma.npages)
        first = first[inside]
        if first.size:
            members = first[:, None] + np.arange(nr)
            empty = (vma.obj.pfns[members] == NO_PFN).all(axis=1)
            first = first[empty]
        in_folio = np.isin(idx >> order, first >> order)
        return first, idx[~in_folio]

    def _map(self, vma: Vma, slots: np.ndarray, pfns: np.ndarray) -> None:
        pages = self.machine.pages
        vma.pte_pfn[slots] = pfns
        vma.pte_flags[slots] = _NEW_PTE
        np.add.at(pages.mapcount, pfns, 1)
        np.add.at(pages.refcount, pages.head[pfns], 1)

    def populate(self, addr: int, length: int, node: int = 0) -> None:
        """Fault in every page of ``[addr, addr + length)`` now, new pages on ``node``.

        Pages already present stay where they are. Raises AddressFault on an unmapped address and
        OutOfMemory when ``node`` is full.
        """
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=False)
        node = check_node(self.machine, "node", node)
        with self.machine.changed:
            for v, s0, s1 in self._wait_migrations(addr, length):
                self._fault(v, s0, s1, node)

    # -- access -----------------------------------------------------------------------------------------------
    def _pfns_for_access(self, addr: int, length: int) -> np.ndarray:
        """Fault in the range on the host and bring device pages back (``migrate_to_ram``); return its pfns.

        Device pages that cannot come back (pinned, host full) are accessed in place, as device-coherent
        memory would be. On return the caller holds ``machine.changed`` with the range free of migrations.
        """
        m = self.machine
        for attempt in range(_MIGRATE_TO_RAM_TRIES + 1):
            segs = self._wait_migrations(addr, length)
            for v, s0, s1 in segs:
                self._fault(v, s0, s1, 0)
            pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])
            remote = m.nodemap.node_of(pfns) != 0
            if not remote.any() or attempt == _MIGRATE_TO_RAM_TRIES:
                return pfns
            self._migrate_to_ram(pfns[remote])
        return pfns

    def _migrate_to_ram(self, pfns: np.ndarray) -> None:
        """A CPU fault on device pages: migrate their folios back to host RAM (lock held on entry and exit)."""
        from .migrate.core import collect_folios, run_migration

        m = self.machine
        t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
        status, heads = collect_folios(m, pfns, 0)
        m.count_event("migrate_to_ram", int(m.pages.nr_pages(heads).sum()) if heads.size else 0)
        m.lock.release()
        try:
            run_migration(m, heads, 0, MigrateMode.SYNC, None, None, pfns, status, t_thread, t_wall)
        finally:
            m.lock.acquire()

    def read(self, addr: int, length: int) -> np.ndarray:
        """Return a host copy of ``length`` bytes at ``addr`` as a uint8 array.

        Unpopulated pages fault in (zero-filled, on the host); device-resident pages are migrated back first.
        """
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=False)
        m = self.machine
        ps = m.page_size
        with m.changed:
            pfns = self._pfns_for_access(addr, length)
            self._touch(addr, length, dirty=False)
            data = m.read_pfns(pfns).reshape(-1)
        off = addr % ps
        return data[off: off + length].copy()

    def write(self, addr: int, data: Any) -> None:
        """Write bytes (bytes-like or a uint8 array) at ``addr``, faulting pages in on first touch."""
        self._check_open()
        buf = _as_bytes(data)
        addr, length = self._check_range(addr, buf.size, aligned=False)
        m = self.machine
        ps = m.page_size
        off = addr % ps
        with m.changed:
            pfns = self._pfns_for_access(addr, length)
            pages_data = m.read_pfns(pfns) if (off or (off + length) % ps) else \
                np.empty((pfns.size, ps), dtype=np.uint8)
            flat = pages_data.reshape(-1)
            flat[off: off + length] = buf
            m.write_pfns(pfns, pages_data)
            self._touch(addr, length, dirty=True)

    def _touch(self, addr: int, length: int, dirty: bool) -> None:
        bits = _TOUCHED if dirty else np.uint8(PteFlag.YOUNG)
        for v, s0, s1 in self._segments(addr, length):
            v.pte_flags[s0:s1] |= bits

    # -- inspection -------------------------------------------------------------------------------------------
    def _pte_pfn(self, addr: Any) -> int:
        self._check_open()
        addr, _ = self._check_range(addr, 1, aligned=False)
        with self.machine.changed:
            ((v, s0, _s1),) = self._wait_migrations(addr, 1)
            return int(v.pte_pfn[s0])

    def pfn_of(self, addr: int) -> int:
        """The pfn backing the page at ``addr``, or -1 if it is not populated."""
        return self._pte_pfn(addr)

    def node_of(self, addr: int) -> int:
        """The node backing the page at ``addr``, or -1 if it is not populated."""
        pfn = self._pte_pfn(addr)
        return -1 if pfn < 0 else int(self.machine.nodemap.node_of(np.array([pfn]))[0])

    def pte_flags(self, addr: int) -> PteFlag:
        """The PTE bits of the page at ``addr`` (0 when not populated)."""
        self._check_open()
        addr, _ = self._check_range(addr, 1, aligned=False)
        with self.machine.lock:
            ((v, s0, _s1),) = self._segments(addr, 1)
            return PteFlag(int(v.pte_flags[s0]))

    def pfns_of(self, addr: int, length: int) -> np.ndarray:
        """Pfn of every page of ``[addr, addr + length)``, -1 where not populated (vectorized pfn_of)."""
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=False)
        with self.machine.changed:
            return np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in self._wait_migrations(addr, length)])

    def nodes_of(self, addr: int, length: int) -> np.ndarray:
        """Node of every page of ``[addr, addr + length)``, -1 where not populated (vectorized node_of)."""
        pfns = self.pfns_of(addr, length)
        return np.where(pfns >= 0, self.machine.nodemap.node_of(np.maximum(pfns, 0)), -1)

    # -- pins -------------------------------------------------------------------------------------------------
    def pin(self, addr: int, length: int) -> None:
        """Pin the pages of ``[addr, addr + length)``: fault them in and hold an extra reference on each.

        Pinned pages do not migrate (``-EAGAIN``), like pages under a long-term GUP pin.
        """
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=True)
        m = self.machine
        with m.changed:
            segs = self._wait_migrations(addr, length)
            for v, s0, s1 in segs:
                self._fault(v, s0, s1, 0)
            pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])
            np.add.at(m.pages.refcount, m.pages.head[pfns], 1)
            for p in pfns.tolist():
                self._pins[p] = self._pins.get(p, 0) + 1

    def unpin(self, addr: int, length: int) -> None:
        """Drop pins taken with :meth:`pin` on ``[addr, addr + length)``."""
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=True)
        m = self.machine
        with m.changed:
            segs = self._wait_migrations(addr, length)
            pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])
            need: dict[int, int] = {}
            for p in pfns.tolist():
                need[p] = need.get(p, 0) + 1
            missing = [p for p, n in need.items() if self._pins.get(p, 0) < n]
            if missing:
                raise InvalidArgument(f"range {addr:#x}+{length:#x} holds pages this address space has not "
                                      f"pinned ({len(missing)} of {len(need)})")
            self._drop_pins(need)
            m.changed.notify_all()

    def _drop_pins(self, pins: dict[int, int]) -> None:
        m = self.machine
        for p, n in pins.items():
            left = self._pins[p] - n
            if left:
                self._pins[p] = left
            else:
                del self._pins[p]
        if pins:
            pfns = np.fromiter(pins.keys(), dtype=np.int64, count=len(pins))
            refs = np.fromiter(pins.values(), dtype=np.int64, count=len(pins))
            m.put_folios(m.pages.head[pfns], refs)

    # -- fork, migrate, close ---------------------------------------------------------------------------------
    def fork(self) -> AddressSpace:
        """A child address space: shared mappings are shared (mapcount 2), private ones copied now.

        Raises OutOfMemory (and leaves nothing behind) when there are no frames for the private copies.
        """
        self._check_open()
        m = self.machine
        child = m.address_space()
        try:
            with m.changed:
                while any(v.has_migration_entries() for v in self._vmas):
                    m.changed.wait()
                child._next = self._next
                for v in self._vmas:
                    self._fork_vma(child, v)
        except BaseException:
            child.close()
            raise
        return child

    def _fork_vma(self, child: AddressSpace, v: Vma) -> None:
        m = self.machine
        if v.shared:
            cv = Vma(child, v.start, v.npages, v.obj, v.pgoff, v.pte_pfn.copy(), v.pte_flags.copy())
            child._insert(cv)
            live = cv.pte_pfn >= 0
            pfns = cv.pte_pfn[live]
            np.add.at(m.pages.mapcount, pfns, 1)
            np.add.at(m.pages.refcount, m.pages.head[pfns], 1)
            return
        # A private mapping gets its own object and a copy of every present page, on the page's node and with
        # the parent's folio order where the node still has a contiguous block.
        obj = MemObject(m, v.obj.pfns.size, False, v.obj.order)
        cv = Vma(child, v.start, v.npages, obj, v.pgoff)
        child._insert(cv)
        present = np.flatnonzero(v.pte_pfn >= 0)
        if present.size == 0:
            return
        src = v.pte_pfn[present]
        nodes = m.nodemap.node_of(src)
        for n in np.unique(nodes).tolist():
            sel = present[nodes == n]
            child._fault_slots(cv, sel, n)
            m.copy_pages(v.pte_pfn[sel], cv.pte_pfn[sel])
        cv.pte_flags[present] = v.pte_flags[present]

    def _fault_slots(self, vma: Vma, slots: np.ndarray, node: int) -> None:
        """Fault in exactly ``slots`` of ``vma`` on ``node`` (grouping contiguous slot runs)."""
        if slots.size == 0:
            return
        cuts = np.flatnonzero(np.diff(slots) != 1) + 1
        for run in np.split(slots, cuts):
            self._fault(vma, int(run[0]), int(run[-1]) + 1, node)

    def migrate(self, addr: int, length: int, node: int, mode: MigrateMode = MigrateMode.SYNC,
                engine: DmaEngine | None = None, options: MigrateOptions | None = None) -> MigrateResult:
        """Migrate the pages of ``[addr, addr + length)`` to ``node`` (like move_pages(2)).

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

        Returns
        -------
        MigrateResult
            One status per page of the range: ``0`` (migrated or already on ``node``), ``-ENOENT`` (not
            populated) or the failure's ``-errno``.
        """
        from .migrate.core import check_mode, collect_folios, run_migration

        t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
        self._check_open()
        addr, length = self._check_range(addr, length, aligned=True)
        m = self.machine
        node = check_node(m, "node", node)
        mode = check_mode(mode, allow_no_copy=False)
        options = MigrateOptions.coerce(options)
        if engine is not None:
            from .dma import DmaEngine

            if not isinstance(engine, DmaEngine) or engine is not m.dma:
                raise InvalidArgument("engine must be this machine's DMA engine (m.dma) or None")
            mode |= MigrateMode.NO_COPY
        with m.changed:
            segs = self._wait_migrations(addr, length)
            pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])
            status, heads = collect_folios(m, pfns, node)
        return run_migration(m, heads, node, mode, engine, None, pfns, status, t_thread, t_wall, options)

    def close(self) -> None:
        """Unmap everything and drop this address space's pins. Idempotent."""
        if self._closed:
            return
        m = self.machine
        with m.changed:
            while any(v.has_migration_entries() for v in self._vmas):
                m.changed.wait()
            for v in list(self._vmas):
                self._unmap_slots(v, np.arange(v.npages))
                self._remove(v)
                if not v.obj.vmas:
                    v.obj.release()
            self._drop_pins(dict(self._pins))
            self._closed = True
            m.forget_space(self)
            m.changed.notify_all()

    def __enter__(self) -> AddressSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_bytes(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise InvalidArgument(f"data must be bytes-like or a uint8 array, got an array of {data.dtype}")
        buf = np.ascontiguousarray(data).reshape(-1)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        raise InvalidArgument(f"data must be bytes-like or a uint8 array, got {type(data).__name__}")
    if buf.size == 0:
        raise InvalidArgument("data must not be empty")
    return buf
