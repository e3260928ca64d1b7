"""The unmap loop of ``migrate_pages_batch()``: ``migrate_folio_unmap`` over a batch, pass by pass.

Each pass gets destinations (``get_new_folio``; -ENOMEM splits a large folio or ends the call), locks (ASYNC
only tries: busy is -EAGAIN, its destination freed and the folio retried next pass), checks writeback
(-EBUSY unless SYNC) and installs migration entries (``try_to_migrate``). A batch mapped through one VMA does
all of that in one compiled call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .. import page_loops
from ..flags import EBUSY, ENOMEM, MigrateMode, MigrateReason, PageFlag
from ..vma import install_migration_entries
from . import batch_loops
from .entries import HPAGE_PMD_ORDER, PENDING, UNTRIED

if TYPE_CHECKING:
    from ..vma import Vma

__all__ = ["UnmapPhase"]

_LOCKED = PageFlag.LOCKED
_NONE = np.empty(0, dtype=np.int64)
_NONE.flags.writeable = False
_NO_LIST = np.empty((2, 0), dtype=np.int64)  # no submission to list: a copy migration
_LOCKED_U32 = np.uint32(PageFlag.LOCKED)
_WRITEBACK_U32 = np.uint32(PageFlag.WRITEBACK)
_HEAD_U32 = np.uint32(PageFlag.HEAD)


class UnmapPhase:
    """The unmap loop's passes; mixed into the migration driver, whose entries and counters it uses."""

    def _unmap_pass(self, todo: np.ndarray, mode: MigrateMode) -> tuple[np.ndarray, np.ndarray]:
        """``migrate_folio_unmap`` over ``todo``; return (unmapped, busy: retry on the next pass)."""
        t0 = time.perf_counter_ns()
        m, e, pages = self.m, self.e, self.m.pages
        self.batch_mode = mode  # the move passes that follow run the mapping callbacks in this mode
        # m.changed's own lock, entered directly (the condition's Python-level wrapper costs more than the lock);
        # notify_all works the same under it.
        with m.lock:
            vma = self._one_vma() if mode == MigrateMode.ASYNC else None
            self.alloc_retry = _NONE
            if vma is not None:
                todo, retry = self._unmap_one_vma(todo, vma)
                if self.alloc_retry.size:
                    retry = np.concatenate([retry, self.alloc_retry])
                self.phase_ns["unmap"] += time.perf_counter_ns() - t0
                return todo, retry
            e.status[todo] = PENDING
            todo = self._get_new_folios(todo)
            if mode == MigrateMode.ASYNC:
                todo, retry = self._trylock(todo)
            else:
                todo, retry = self._lock_waiting(todo, mode)
                pages.set(e.src[todo], _LOCKED)
                todo = self._check_writeback(todo, mode)
            # migrate_folio_unmap gives a folio that will be retried back its destination
            # (migrate_folio_undo_dst); the next pass allocates another.
            e.release_dst(retry)
            if self.alloc_retry.size:
                retry = np.concatenate([retry, self.alloc_retry])
            if todo.size:
                was_clean = self._clean_file_folios(todo)
                install_migration_entries(m, e.base_pfns(e.src[todo], todo))
                self._count_dirtied(was_clean)
                e.unmapped[todo] = True
                e.check_fresh(todo)
        self.phase_ns["unmap"] += time.perf_counter_ns() - t0
        return todo, retry

    def _clean_file_folios(self, todo: np.ndarray) -> np.ndarray | None:
        """The entries of ``todo`` that are clean file folios, taken right before their PTEs become migration
        entries (no wait in between); None when the call has no file folio."""
        e = self.e
        if e.by_callback is None:
            return None
        return todo[e.by_callback[todo] & ~self.m.pages.test(e.src[todo], PageFlag.DIRTY)]

    def _count_dirtied(self, was_clean: np.ndarray | None) -> None:
        """Count the file folios of ``was_clean`` that a dirty PTE made dirty as it became a migration entry
        (``try_to_migrate_one``'s ``folio_mark_dirty``: a file folio's dirtiness is counted per node)."""
        if was_clean is None or was_clean.size == 0:
            return
        src = self.e.src[was_clean]
        dirtied = src[self.m.pages.test(src, PageFlag.DIRTY)]
        if dirtied.size:
            self.m.page_cache.count_dirtied(dirtied)

    def _get_new_folios(self, todo: np.ndarray) -> np.ndarray:
        """Allocate destinations; split large folios that get none; a base page that gets none ends the call.

        Returns the entries that go on (those with a destination, ahead of any -ENOMEM).
        """
        m, e = self.m, self.e
        if e.all_given:
            return todo  # NO_COPY onto the caller's destinations: nothing to allocate
        need = todo[e.dst[todo] < 0]
        if need.size == 0:
            return todo
        if e.one_order >= 0 and not self.fallback_nodes:
            # Folios of one order, one target node: a single allocation, and nothing more when it is served whole.
            heads = m.frames.alloc_folios(self.node, need.size, e.one_order)
            e.dst[need[:heads.size]] = heads
            if heads.size == need.size:
                self.alloc_retry = _NONE
                return todo
            short = [(e.one_order, need[heads.size:])]
        else:
            orders = e.order[need]
            lo = int(orders.min())
            groups = [(lo, need)] if lo == int(orders.max()) else \
                [(int(o), need[orders == o]) for o in np.unique(orders)]
            short = []  # per order, the entries left without a destination
            for order, pos in groups:
                heads = m.frames.alloc_folios(self.node, pos.size, order)
                for nid in self.fallback_nodes:  # a demotion: alloc_demote_folio's lower tiers, no direct reclaim
                    if heads.size == pos.size:
                        break
                    heads = np.concatenate([heads, m.frames.alloc_folios(nid, pos.size - heads.size, order)])
                e.dst[pos[: heads.size]] = heads
                short.append((order, pos[heads.size:]))
        stop = None  # position of the first entry that ended the call with -ENOMEM
        # "Large folio NUMA faulting doesn't split to retry": NUMA balancing's folio fails instead.
        nosplit = self.reason == MigrateReason.MR_NUMA_MISPLACED
        again = []  # large folios a long-term pin retries whole on the next pass (their split failed)
        for order, rest in short:
            for p in rest.tolist():
                if order > 0 and not nosplit:
                    if e.split(p):
                        # A split large folio is one failed folio (its pieces are migrated on their own).
                        thp = int(order == HPAGE_PMD_ORDER)
                        self.stats.nr_thp_split += thp
                        self.stats.nr_thp_failed += thp
                        self.stats.nr_split += 1
                        self.stats.nr_large_failed += 1
                        self.nr_failed_folios += 1
                        continue
                    if self.reason == MigrateReason.MR_LONGTERM_PIN:
                        # try_split_folio() gave -EAGAIN: "try again to split large folio to mitigate the
                        # failure of longterm pinning" (the folio is retried, not failed).
                        again.append(p)
                        continue
                e.status[p] = ENOMEM
                stop = p if stop is None else min(stop, p)
                break
        self.alloc_retry = np.array(again, dtype=np.int64)
        if again:
            todo = todo[~np.isin(todo, self.alloc_retry)]
        if stop is None:
            return todo if e.all_base else todo[e.status[todo] == PENDING]
        self.batch_enomem = True
        self._count_failed(np.array([stop]), folios=self.batch_counts_folios)
        # The kernel stops at the folio that found no memory: the ones after it in the list stay untried.
        later = todo[(todo > stop) & (e.status[todo] == PENDING)]
        e.release_dst(later)
        e.status[later] = UNTRIED
        return todo[(todo < stop) & (e.status[todo] == PENDING)]

    def _one_vma(self) -> Vma | None:
        """The one VMA through which every folio of the call is mapped, if so (the compiled single-call path).
        Asked at every pass: the lock was dropped since the last one, and a VMA may have been split or unmapped
        meanwhile (an object no VMA maps any more is released with no VMA left)."""
        obj = self.one_object
        if obj is None:
            return None
        vmas = obj.vmas
        return vmas[0] if len(vmas) == 1 else None

    def _unmap_one_vma(self, todo: np.ndarray, vma: Vma) -> tuple[np.ndarray, np.ndarray]:
        """The ASYNC unmap pass in one compiled call (caller holds the lock): destinations, where they are folios
        of one order from the target node and the node can serve them all, then lock, writeback, unmap.
        Returns (unmapped, busy), as :meth:`_unmap_pass`."""
        m, e, pages = self.m, self.e, self.m.pages
        order = -1  # -1: nothing for the compiled call to allocate
        if not e.all_given:  # NO_COPY onto the caller's destinations: nothing to allocate
            if e.one_order >= 0 and not self.fallback_nodes and not m.faults.armed:
                order = e.one_order
            else:
                e.status[todo] = PENDING
                todo = self._get_new_folios(todo)
        # Clean file folios, taken right before their PTEs become migration entries; the lock is held from here
        # to the unmap, so one the allocation below drops stays clean and is not counted.
        was_clean = None if e.by_callback is None else self._clean_file_folios(todo)
        nd = m.nodes[self.node]
        alloc = nd.allocator
        free, block_free = alloc.arrays()
        rc = np.empty(todo.size, dtype=np.int32)
        # With an engine, the pass also lists the DMA submission's pages (every base page of the batch at most).
        listed = _NO_LIST
        if self.engine is not None:
            listed = np.empty((2, todo.size << e.one_order if e.one_order >= 0 else int(e.nr[todo].sum())),
                              dtype=np.int64)
        while True:
            bad, taken, n = batch_loops.unmap_one_vma(
                todo, e.status, PENDING, e.src, e.nr, e.given, e.dst, e.unmapped, e.fresh, pages.write_seq,
                _LOCKED_U32, _WRITEBACK_U32, pages.flags, pages.refcount, pages.mapcount, pages.mapping,
                pages.index, pages.order, pages.head, e.oid, vma.pgoff, vma.npages, vma.pte_pfn, vma.pte_flags,
                free, block_free, alloc.block, nd.base_pfn, order, _HEAD_U32, rc, listed[0], listed[1])
            if taken >= 0:
                break
            # The node could not serve every destination (nothing was taken): the general allocation, which
            # splits a large folio or ends the call, then the unmap.
            order = -1
            e.status[todo] = PENDING
            todo = self._get_new_folios(todo)
            rc = rc[:todo.size]
        if taken:
            alloc.taken(taken)
        retry = _NONE
        if bad:
            retry = todo[rc == 1]
            wb = todo[rc == EBUSY]
            if wb.size:
                e.release_dst(wb)
                e.status[wb] = EBUSY
                m.changed.notify_all()
            todo = todo[rc == 0]
            e.release_dst(retry)
        if listed is not _NO_LIST:
            self.listed = (todo, listed[0, :n], listed[1, :n])
        if was_clean is not None:
            self._count_dirtied(was_clean)
        return todo, retry

    def _trylock(self, todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ASYNC: try each folio lock; busy -> -EAGAIN (retried next pass), writeback -> -EBUSY (permanent)."""
        m, e, pages = self.m, self.e, self.m.pages
        heads = e.src[todo]
        if page_loops.HAVE_NUMBA:
            rc = np.empty(todo.size, dtype=np.int32)
            if not page_loops.trylock_folios(heads, pages.flags, _LOCKED_U32, _WRITEBACK_U32, rc):
                return todo, todo[:0]
            busy = rc == 1
            bad = todo[rc == EBUSY]
        else:
            busy = pages.test(heads, _LOCKED)
            wb = ~busy & pages.test(heads, PageFlag.WRITEBACK)
            pages.set(heads[~busy & ~wb], _LOCKED)
            bad = todo[wb]
        if bad.size:
            e.release_dst(bad)
            e.status[bad] = EBUSY
            m.changed.notify_all()
        return todo[(e.status[todo] == PENDING) & ~busy], todo[busy]  # (bad ones now hold -EBUSY)

    def _lock_waiting(self, todo: np.ndarray, mode: MigrateMode) -> tuple[np.ndarray, np.ndarray]:
        """Sync modes take the lock, sleeping while it is busy; SYNC_LIGHT gives up on a !uptodate folio."""
        m, e, pages = self.m, self.e, self.m.pages
        retry = []
        for p in todo[pages.test(e.src[todo], _LOCKED)].tolist():
            head = int(e.src[p])
            if mode == MigrateMode.SYNC_LIGHT and not pages.test(head, PageFlag.UPTODATE):
                retry.append(p)
                continue
            while pages.test(head, _LOCKED):
                m.changed.wait()
        retry_arr = np.array(retry, dtype=np.int64)
        return (todo[~np.isin(todo, retry_arr)] if retry else todo), retry_arr

    def _check_writeback(self, todo: np.ndarray, mode: MigrateMode) -> np.ndarray:
        """Folios under writeback: -EBUSY unless SYNC, which waits for the writeback to end."""
        m, e, pages = self.m, self.e, self.m.pages
        wb = pages.test(e.src[todo], PageFlag.WRITEBACK)
        if not wb.any():
            return todo
        if mode != MigrateMode.SYNC:
            bad = todo[wb]
            pages.clear(e.src[bad], _LOCKED)
            e.release_dst(bad)
            e.status[bad] = EBUSY
            m.changed.notify_all()
            return todo[~wb]
        for p in todo[wb].tolist():
            while pages.test(int(e.src[p]), PageFlag.WRITEBACK):
                m.changed.wait()
        return todo

