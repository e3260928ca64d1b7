"""Servicing a batch of device faults, as UVM's fault handler does.

One batch: the fetched fault-buffer entries are deduplicated and grouped by 2 MiB virtual block; the
prefetch policy widens each block's faulted pages; the device makes room by evicting other blocks when it is
short of frames; untouched pages get zeroed pages on the device (nothing to copy); pages resident elsewhere
go through the migration core, copied by the DMA engine (no-copy migration) or the migrating thread; then the
access is replayed. Service time is split into :data:`~dmamig.uvm.options.SERVICE_PHASES`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..array_ops import union_ints, unique_ints
from ..errors import OutOfMemory
from ..flags import MigrateMode, PteFlag
from ..memory import fault_absent, wp_pages
from ..migrate.core import MigrationRequest, run_migration
from ..migrate.isolate import collect_folios
from .dup import ReadDuplicates
from .evict import evict_block, tracker_of
from .options import VA_BLOCK_SIZE, UvmOptions, UvmStats
from .prefetch import density_prefetch

if TYPE_CHECKING:
    from ..mm import AddressSpace

__all__ = ["FaultService"]

_WRITE = np.uint8(PteFlag.WRITE)


class FaultService:
    """Services the faults of one device node on one address space, counting into ``stats``."""

    def __init__(self, mm: AddressSpace, node: int, options: UvmOptions, stats: UvmStats):
        m = mm.machine
        self.mm, self.node, self.options, self.stats = mm, node, options, stats
        ps = m.page_size
        self.block_size = max(VA_BLOCK_SIZE, ps)
        self.block_pages = self.block_size // ps
        self.tracker = tracker_of(m, node)
        self.engine = m.dma if options.no_copy else None
        self.mode = MigrateMode.SYNC | MigrateMode.NO_COPY if options.no_copy else MigrateMode.SYNC
        self.dups = ReadDuplicates(m, node) if options.read_duplication else None
        if self.dups is not None:
            mm.register_notifier(self.collapse)

    def collapse(self, start: int, end: int) -> None:
        """Drop the read duplicates of ``[start, end)`` (the address space's notifier; lock held)."""
        if self.dups is not None:
            self.stats.pages_collapsed += self.dups.drop(start, end)

    def duplicated(self, addrs: np.ndarray) -> np.ndarray:
        if self.dups is None or not len(self.dups):
            return np.zeros(addrs.size, dtype=bool)
        return self.dups.lookup(addrs) >= 0

    # -- one batch ---------------------------------------------------------------------------------------------
    def service_batch(self, entries: np.ndarray, protect: np.ndarray | None = None,
                      write: bool = False) -> np.ndarray:
        """Service fault-buffer ``entries`` (page addresses, duplicates allowed); return the pages handled.

        The returned page addresses (faulted and prefetched) were brought to the device, or could not be and
        will be accessed where they are. Blocks in ``protect`` (block numbers: the rest of the stretch the
        access replays next) are not evicted to make room. A read with read duplication copies pages
        resident elsewhere instead of migrating them. The caller holds no lock.
        """
        st, m = self.stats, self.mm.machine
        t0 = time.perf_counter_ns()
        uniq = unique_ints(entries)
        st.faults += int(entries.size)
        st.duplicates += int(entries.size - uniq.size)
        st.batches += 1
        st.pages_faulted += int(uniq.size)
        ps, bs, bp = m.page_size, self.block_size, self.block_pages
        blocks = unique_ints(uniq // bs)
        cand = (blocks[:, None] * bs + np.arange(bp, dtype=np.int64) * ps).reshape(-1)
        with m.changed:
            pfns, valid = self._lookup_valid(cand)
            resident = (pfns >= 0) & valid
            resident[resident] = m.nodemap.node_of(pfns[resident]) == self.node
            resident |= self.duplicated(cand) & valid
        faulted = np.zeros(cand.size, dtype=bool)
        faulted[np.searchsorted(blocks, uniq // bs) * bp + (uniq % bs) // ps] = True
        t1 = time.perf_counter_ns()
        st.service_ns["fetch"] += t1 - t0
        if self.options.prefetch == "density":
            want = density_prefetch(faulted.reshape(-1, bp), resident.reshape(-1, bp), valid.reshape(-1, bp),
                                    self.options.prefetch_threshold).reshape(-1)
        else:
            want = faulted & valid & ~resident
        t2 = time.perf_counter_ns()
        st.service_ns["prefetch"] += t2 - t1
        addrs = cand[want]
        prefetched = int((want & ~faulted).sum())
        if addrs.size:
            need = self._frames_needed(pfns[want])
            keep = blocks if protect is None else union_ints(blocks, protect)
            self._make_room(need, {(self.mm, int(b)) for b in keep.tolist()})
            self._bring_in(addrs, duplicate=not write and self.dups is not None)
            st.pages_prefetched += prefetched
        self.tracker.touch(self.mm, blocks)
        st.replays += 1
        return union_ints(addrs, uniq)

    def prefetch_pages(self, addrs: np.ndarray) -> None:
        """Bring page ``addrs`` (sorted, of one 2 MiB block or a few) to the device without any fault."""
        m, mm = self.mm.machine, self.mm
        blocks = unique_ints(addrs // self.block_size)
        with m.changed:
            pfns, valid = self._lookup_valid(addrs)
            on = pfns >= 0
            on[on] = m.nodemap.node_of(pfns[on]) == self.node
        want = valid & ~on
        if want.any():
            self._make_room(self._frames_needed(pfns[want]), {(mm, int(b)) for b in blocks.tolist()})
            self._bring_in(addrs[want])
            self.stats.pages_prefetched += int(want.sum())
        self.tracker.touch(mm, blocks)

    def _lookup_valid(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pfns of ``addrs`` and whether each lies in a readable mapping (caller holds ``changed``)."""
        pfns, mapped = self.mm.mm_struct.lookup_settled(addrs)
        valid = mapped.copy()
        for v in self.mm.vmas:
            if not v.readable:
                valid[(addrs >= v.start) & (addrs < v.end)] = False
        return pfns, valid

    def _frames_needed(self, pfns: np.ndarray) -> int:
        """Device frames the pages ``pfns`` need: one per absent page, whole folios for present ones."""
        pages = self.mm.machine.pages
        present = pfns[pfns >= 0]
        heads = unique_ints(pages.head[present]) if present.size else present
        return int((pfns < 0).sum()) + int(pages.nr_pages(heads).sum() if heads.size else 0)

    # -- eviction ----------------------------------------------------------------------------------------------
    def _make_room(self, need: int, exclude: set) -> None:
        """Evict blocks in policy order until ``need`` frames are free (or nothing more can go)."""
        m, st = self.mm.machine, self.stats
        nd = m.nodes[self.node]
        with m.lock:
            if nd.free_pages >= need:
                return
            if self.dups is not None:
                # Copies are the cheapest room: dropping one moves nothing (the page is still where it was).
                st.pages_collapsed += self.dups.drop_some(need - nd.free_pages)
                if nd.free_pages >= need:
                    return
        t0 = time.perf_counter_ns()
        for mm, block in self.tracker.victims(self.options.eviction, exclude):
            with m.lock:
                if nd.free_pages >= need:
                    break
            n, _res = evict_block(mm, block, self.block_size, self.node, self.engine,
                                  self.options.migrate_options)
            # The entry goes even when some pages could not move (pinned): retrying them on every batch
            # would only repeat the failure; a later access of the block tracks it again.
            self.tracker.forget(mm, block)
            st.pages_evicted += n
            st.bytes_evicted += n * m.page_size
            st.blocks_evicted += bool(n)
        st.service_ns["evict"] += time.perf_counter_ns() - t0

    # -- populate and migrate ----------------------------------------------------------------------------------
    def _bring_in(self, addrs: np.ndarray, duplicate: bool = False) -> None:
        """Give absent pages zeroed device pages and migrate the others onto the device (or, with
        ``duplicate``, copy private pages resident elsewhere into read-only device copies)."""
        m, st, mm = self.mm.machine, self.stats, self.mm.mm_struct
        t0 = time.perf_counter_ns()
        t_thread = time.thread_time_ns()
        with m.changed:
            pfns, _mapped = mm.lookup_settled(addrs)
            if (pfns < 0).any():
                for v, pos, slots in mm.lookup(addrs)[1]:
                    absent = slots[pfns[pos] < 0]
                    if absent.size:
                        st.pages_populated += self._populate(v, absent)
                pfns, _mapped = mm.lookup_settled(addrs)
            present = pfns >= 0
            present[present] = m.nodemap.node_of(pfns[present]) != self.node
            if duplicate:
                present &= ~self._dup_private(addrs, pfns, present)
            move = pfns[present]
            t_wall = time.perf_counter_ns()
            st.service_ns["populate"] += t_wall - t0
            status, heads = collect_folios(m, move, self.node) if move.size else (None, move)
        if heads.size:
            res = run_migration(m, MigrationRequest(heads=heads, node=self.node, mode=self.mode, pfns=move,
                                                    status=status, t_thread=t_thread, t_wall=t_wall,
                                                    engine=self.engine, options=self.options.migrate_options,
                                                    reason=None))  # the driver's, not migrate_pages()
            st.pages_migrated += res.nr_succeeded
            st.bytes_migrated += res.nr_succeeded * m.page_size
            for k, v in res.phase_ns.items():
                st.service_ns[k] += v

    def _dup_private(self, addrs: np.ndarray, pfns: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Copy the present private pages among ``addrs`` to the device; return which now have a copy.

        Pages of shared mappings are left to migrate: another process may write them without this address
        space's notifier hearing of it. Caller holds ``changed``.
        """
        private = present.copy()
        for v in self.mm.vmas:
            if v.shared:
                private[(addrs >= v.start) & (addrs < v.end)] = False
        private &= ~self.duplicated(addrs)
        idx = np.flatnonzero(private)
        n = self.dups.add(addrs[idx], pfns[idx], self.engine) if idx.size else 0
        self.stats.pages_read_duplicated += n
        done = np.zeros(addrs.size, dtype=bool)
        done[idx[:n]] = True
        return done | (present & self.duplicated(addrs))

    def _populate(self, vma: object, slots: np.ndarray) -> int:
        """Zeroed pages for untouched slots, on the device, or on the host when neither room nor eviction
        could free enough (then accessed remotely). Returns the pages placed on the device."""
        mm = self.mm.mm_struct
        try:
            fault_absent(mm, vma, slots, self.node)
            return int(slots.size)
        except OutOfMemory:
            fault_absent(mm, vma, slots, 0)
            return 0

    def make_writable(self, addrs: np.ndarray) -> None:
        """Break copy-on-write (or restore the write bit of shared pages) for a device write to ``addrs``.

        The caller holds ``changed``. The private copy goes on the device, or on the host when it is full.
        """
        mm = self.mm.mm_struct
        pfns, hits = mm.lookup(addrs)
        for v, pos, slots in hits:
            p = pfns[pos]
            if v.shared:
                v.pte_flags[slots[p >= 0]] |= _WRITE
                continue
            absent = slots[p < 0]
            if absent.size:
                self._populate(v, absent)
            wp = slots[(p >= 0) & ((v.pte_flags[slots] & _WRITE) == 0)]
            if wp.size:
                try:
                    wp_pages(mm, v, wp, self.node)
                except OutOfMemory:
                    wp_pages(mm, v, wp, 0)
