"""The copy and the move loop of ``migrate_pages_batch()``: ``migrate_folio_move`` over a batch.

With a DMA engine the batch's copy is one submission, waited for before anything moves (a failed copy falls
back to the migrating thread). Each move pass checks references (an extra one keeps the folio unmapped for
the next pass), copies where no current copy exists, moves state and mapping, points the migration entries
at the new folios and frees the old ones (``migrate_folio_done``); ``_undo`` is ``migrate_folio_undo_src`` and
``_dst``. A batch mapped through one VMA moves in one compiled call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .. import page_loops
from ..errors import DmaError
from ..flags import EAGAIN, PageFlag
from ..vma import mark_device_private, remove_migration_entries
from . import batch_loops
from .entries import HPAGE_PMD_ORDER, PENDING
from .mapping_callbacks import mapping_migrate_check
from .state import migrate_folio

if TYPE_CHECKING:
    from ..dma import Fence
    from ..vma import Vma

__all__ = ["MovePhase"]

_LOCKED = PageFlag.LOCKED
_PUTBACK_CLEAR = np.uint32(~np.uint32(PageFlag.ISOLATED | PageFlag.LOCKED))
_LRU = np.uint32(PageFlag.LRU)
_PRIVATE = np.uint32(PageFlag.PRIVATE)
_NONE = np.empty(0, dtype=np.int64)
_NONE.flags.writeable = False
# Stand-ins for the allocator arrays where the old folios span nodes (they are freed node by node after the call).
_NO_ALLOCATOR = (np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))


class MovePhase:
    """The copy and the move loop's passes; mixed into the migration driver."""

    # -- the copy -----------------------------------------------------------------------------------------------
    def _submit(self, moving: np.ndarray) -> Fence | None:
        """No-copy with an engine: one DMA submission for the whole batch's stale destinations."""
        if self.engine is None:
            return None
        t0 = time.perf_counter_ns()
        e = self.e
        listed, self.listed = self.listed, None
        if listed is not None and listed[0] is moving:
            src, dst = listed[1], listed[2]  # the one unmap pass of this batch listed its pages
        elif batch_loops.HAVE_NUMBA:
            total = moving.size << e.one_order if e.one_order >= 0 else int(e.nr[moving].sum())
            src, dst = np.empty((2, total), dtype=np.int64)
            n = batch_loops.stale_base_pfns(moving, e.src, e.dst, e.nr, e.fresh, src, dst)
            src, dst = src[:n], dst[:n]
        else:
            need = moving[~e.fresh[moving]]
            src, dst = e.base_pfns(e.src[need], need), e.base_pfns(e.dst[need], need)
        if src.size == 0:
            return None
        fence = self.engine.copy(src, dst)
        self.phase_ns["submit"] += time.perf_counter_ns() - t0
        return fence

    def _wait(self, fence: Fence, moving: np.ndarray) -> None:
        """Wait for the batch's DMA copy; if it failed, the migrating thread copies those folios instead."""
        t0 = time.perf_counter_ns()
        try:
            fence.wait()
            failed = None
        except DmaError:
            # Only the folios the failure hit: a destination page in a failed channel share. The others were
            # copied and move as they are.
            e = self.e
            failed = moving[~e.fresh[moving]]
            hit = fence.failed_pages()
            if hit is not None:
                failed = failed[np.isin(e.dst[failed], self.m.pages.head[hit])]
        self.phase_ns["dma_wait"] += time.perf_counter_ns() - t0
        if failed is not None:
            # The source is unmapped and locked, so a CPU copy now is as exact as the DMA copy would have been.
            t0 = time.perf_counter_ns()
            self.m.frames.copy_folios(self.e.src[failed], self.e.dst[failed])
            self.phase_ns["copy"] += time.perf_counter_ns() - t0
            n = int(self.e.nr[failed].sum())
            self.stats.nr_dma_fallback += n
        self.e.fresh[moving] = True
        self.copied_batch = moving

    # -- the move loop ------------------------------------------------------------------------------------------
    def _move_pass(self, moving: np.ndarray) -> np.ndarray:
        """``migrate_folio_move`` over ``moving``; return the busy ones (still unmapped, for the next pass).

        Folios of files go through their mapping's migrate callback (:meth:`_move_by_callback`); the others,
        anonymous and shared memory (``migrate_folio``), through the core's own path (:meth:`_move_folios`).
        """
        by_callback = self.e.by_callback
        if by_callback is None:
            return self._move_folios(moving)
        mine = by_callback[moving]
        if not mine.any():
            return self._move_folios(moving)
        retry = self._move_by_callback(moving[mine])
        rest = moving[~mine]
        return np.concatenate([retry, self._move_folios(rest)]) if rest.size else retry

    def _move_by_callback(self, moving: np.ndarray) -> np.ndarray:
        """``move_to_new_folio`` through each folio's ``mapping->a_ops->migrate_folio``; return the busy ones.

        Under the lock: the callback decides (``-EAGAIN`` keeps the folio unmapped for the next pass, another
        ``-errno`` fails it and restores its mappings), then the reference check (``folio_migrate_mapping``:
        the page cache's references, one for private data, the isolation reference), then the copy if nobody
        made one, then the move. The copy follows the check, as in the kernels that had ``NO_COPY``: a writer
        must hold a reference, so one that writes without the folio lock either fails the check or wrote
        before the copy. A copy made before the move pass (the DMA engine's, a ``NO_COPY`` caller's) has no
        such protection: that is what the no-copy refusal of ``mapping_migrate_check`` is for.
        """
        m, e, pages = self.m, self.e, self.m.pages
        t0 = time.perf_counter_ns()
        with m.changed:
            no_copy = e.fresh[moving] | e.given[moving] | (self.engine is not None)
            rc = mapping_migrate_check(m, e.src[moving], self.batch_mode, no_copy, self.options)
            src = e.src[moving]
            expected = e.nr[moving] + 1 + ((pages.flags[src] & _PRIVATE) != 0)
            busy = (rc == EAGAIN) | ((rc == 0) & (pages.refcount[src] != expected))
            busy |= (rc == 0) & self._drop_stale_copies(moving)
            failed = moving[(rc != 0) & (rc != EAGAIN)]
            if failed.size:
                for err in np.unique(rc[(rc != 0) & (rc != EAGAIN)]).tolist():
                    self._undo(moving[rc == err], err)
            ok = moving[(rc == 0) & ~busy]
            if ok.size:
                stale = ok[~e.fresh[ok]]
                if stale.size:
                    t1 = time.perf_counter_ns()
                    m.frames.copy_folios(e.src[stale], e.dst[stale])
                    self.phase_ns["copy"] += time.perf_counter_ns() - t1
                    t0 += time.perf_counter_ns() - t1
                file = m.page_cache.file_folios(e.src[ok])
                m.page_cache.move_counters(e.src[ok[file]], e.dst[ok[file]])
                new = e.dst[ok]
                self._move_to_new_folios(ok)
                if m.movable_object_ids.size:  # a movable page goes back to its driver, not on an LRU
                    pages.clear(new[np.isin(pages.mapping[new], m.movable_object_ids)], PageFlag.LRU)
            m.changed.notify_all()
        self.phase_ns["move"] += time.perf_counter_ns() - t0
        return moving[busy]

    def _move_folios(self, moving: np.ndarray) -> np.ndarray:
        """The core's own move pass (``migrate_folio``) over ``moving``; return the busy ones."""
        m, e, pages = self.m, self.e, self.m.pages
        retry = _NONE
        if moving is self.copied_batch:
            self.copied_batch = None  # for this pass only: a later one may find copies a write made stale
            stale = retry  # the DMA wait before this first pass made every copy current: nothing to copy
        elif batch_loops.HAVE_NUMBA:
            # folio_migrate_mapping's reference check comes before the copy, so a busy folio is not copied.
            t0 = time.perf_counter_ns()
            stale, keep, busy = np.empty((3, moving.size), dtype=np.int64)
            with m.lock:
                nc, nb, nk = batch_loops.to_copy(moving, e.src, e.expected, e.fresh, pages.refcount, stale, keep,
                                                 busy)
            if nb:
                retry = busy[:nb]
                moving = keep[:nk]
            stale = stale[:nc]
            self.phase_ns["move"] += time.perf_counter_ns() - t0
        else:
            if not e.fresh[moving].all():
                t0 = time.perf_counter_ns()
                with m.lock:
                    busy = pages.refcount[e.src[moving]] != e.expected[moving]
                if busy.any():
                    retry = moving[busy]
                    moving = moving[~busy]
                self.phase_ns["move"] += time.perf_counter_ns() - t0
            fresh = e.fresh[moving]
            stale = moving[~fresh] if not fresh.all() else moving[:0]
        if stale.size:
            # The copy path (or a caller's NO_COPY copy that a write made stale): the migrating thread copies
            # outside the metadata lock; the locked, unmapped source cannot change meanwhile.
            t0 = time.perf_counter_ns()
            m.frames.copy_folios(e.src[stale], e.dst[stale])
            self.phase_ns["copy"] += time.perf_counter_ns() - t0
        t0 = time.perf_counter_ns()
        with m.lock:  # m.changed's lock, entered directly, as in the unmap pass
            vma = self._one_vma()
            if vma is not None:
                busy_pos = self._move_one_vma(moving, vma)
                m.changed.notify_all()
                self.phase_ns["move"] += time.perf_counter_ns() - t0
                return np.concatenate([retry, busy_pos]) if retry.size else busy_pos
            # Freeze: references may have been taken while we copied, and a copy made before this pass is
            # trusted only while its destination is newer than its source.
            busy = pages.refcount[e.src[moving]] != e.expected[moving]
            busy |= self._drop_stale_copies(moving)
            if busy.any():
                retry = np.concatenate([retry, moving[busy]])
                moving = moving[~busy]
            if moving.size:
                self._move_to_new_folios(moving)
            m.changed.notify_all()
        self.phase_ns["move"] += time.perf_counter_ns() - t0
        return retry

    def _drop_stale_copies(self, moving: np.ndarray) -> np.ndarray:
        """Drop the ``fresh`` mark of every copy a write has overtaken; return where it was dropped.

        Called before each retried pass (so the copy is made again in that pass) and at the freeze, under the
        lock (where a dropped mark makes the folio busy for one more pass).

        A copy is good for the pass that made it only while nobody can write the source. The DMA copy (or the
        caller's, for ``NO_COPY``) is made before the move loop, and a holder of an extra reference can write
        the unmapped source through it, then drop it before a later freeze: moving state over that copy would
        lose the write. Every frame write advances ``write_seq``, so a destination newer than its source is a
        copy no write has overtaken; any other is copied again on the next pass.
        """
        e = self.e
        stale = e.fresh[moving]
        if stale.any():
            fresh = moving[stale]
            stale[stale] = ~self.m.pages.copies_current(e.src[fresh], e.dst[fresh], e.nr[fresh])
            e.fresh[moving[stale]] = False
        return stale

    def _move_one_vma(self, moving: np.ndarray, vma: Vma) -> np.ndarray:
        """Freeze, move and finish the folios of ``moving`` in one compiled call, which also gives the old
        frames back to their node; return the busy ones."""
        m, e, pages = self.m, self.e, self.m.pages
        total = moving.size << e.one_order if e.one_order >= 0 else int(e.nr[moving].sum())
        freed = np.empty(total + 4, dtype=np.int64)
        counts = freed[total:]
        rc = np.empty(moving.size, dtype=np.int32)
        if e.src_node >= 0:
            nd = m.nodes[e.src_node]
            alloc, base = nd.allocator, nd.base_pfn
            free, block_free = alloc.arrays()
        else:
            alloc, base, (free, block_free) = None, -1, _NO_ALLOCATOR
        nfreed, dead, nbusy, bad = batch_loops.move_one_vma(
            moving, e.src, e.dst, e.nr, e.expected, e.order, e.fresh, pages.write_seq, e.status, e.unmapped,
            HPAGE_PMD_ORDER, _PUTBACK_CLEAR, _LRU, pages.flags, pages.refcount, pages.mapcount, pages.mapping,
            pages.index, pages.private, pages.last_cpupid, pages.memcg, pages.order, pages.head, e.oid,
            self.one_object.pfns, vma.pgoff, vma.npages, vma.pte_pfn, vma.pte_flags, rc, freed, counts, free,
            block_free, 1 if alloc is None else alloc.block, base)
        if nfreed == 0:
            return moving
        if bad >= 0:
            raise RuntimeError(f"double free of frame {int(freed[bad])} (allocator invariant broken)")
        if e.shmem is not None:  # folio_migrate_mapping's nr_shmem (and nr_file_pages) change node
            moved = moving[rc == 0]
            moved = moved[e.shmem[moved]]
            m.page_cache.move_shmem(e.src[moved], e.dst[moved], e.nr[moved])
        if alloc is not None:
            alloc.taken(-nfreed)
        else:
            self._free_old(freed[:nfreed])
        if m.device_private:  # entries now naming device-private pages are not present PTEs
            new = e.dst[moving[rc == 0]]
            mark_device_private(m, new if e.all_base else pages.expand(new))
        if dead:
            new = e.dst[moving[rc == 0]]
            m.frames.free_folios(new[pages.refcount[new] <= 0])
        s = self.stats
        c = counts.tolist()
        s.nr_succeeded += c[0]
        s.nr_thp_succeeded += c[1]
        s.nr_large_succeeded += c[2]
        s.nr_no_copy += c[3]
        self.nr_moved_folios += moving.size - nbusy
        return moving[rc != 0] if nbusy else _NONE

    def _free_old(self, pfns: np.ndarray) -> None:
        """Give the reset frames of old folios back to their allocator."""
        e = self.e
        if e.src_node >= 0:
            nd = self.m.nodes[e.src_node]
            nd.allocator.free(pfns - nd.base_pfn)
        else:
            self.m.frames.free_frames(pfns)

    def _count_moved(self, pos: np.ndarray) -> None:
        """Moved folios: status 0, counted (no-copy pages are those whose destination was already fresh)."""
        e = self.e
        e.unmapped[pos] = False
        e.status[pos] = 0
        if e.all_base:
            pages_moved, thp, large = pos.size, 0, 0
            nc = int(np.count_nonzero(e.fresh[pos]))
        else:
            nr = e.nr[pos]
            pages_moved = int(nr.sum())
            thp = int(np.count_nonzero(e.order[pos] == HPAGE_PMD_ORDER))
            large = int(np.count_nonzero(nr > 1))
            nc = int(nr[e.fresh[pos]].sum())
        s = self.stats
        s.nr_succeeded += pages_moved
        s.nr_thp_succeeded += thp
        s.nr_large_succeeded += large
        s.nr_no_copy += nc
        self.nr_moved_folios += pos.size

    def _move_to_new_folios(self, pos: np.ndarray) -> None:
        """Move mapping and state, point migration entries at the new folios, unlock, free the old ones."""
        m, e, pages = self.m, self.e, self.m.pages
        old, new = e.src[pos], e.dst[pos]
        if e.shmem is not None:
            sh = pos[e.shmem[pos]]
            m.page_cache.move_shmem(e.src[sh], e.dst[sh], e.nr[sh])
        migrate_folio(m, old, new, e.nr[pos])
        remove_migration_entries(m, e.base_pfns(old, pos), e.base_pfns(new, pos))
        # migrate_folio_done(): the new folio joins the LRU and drops the isolation reference it inherited; the
        # old one (still locked and isolated: nobody can reach it) goes back to the allocator.
        if page_loops.HAVE_NUMBA:
            freed = np.empty(pos.size if e.all_base else int(e.nr[pos].sum()), dtype=np.int64)
            dead = page_loops.done_folios(old, new, e.nr[pos], _PUTBACK_CLEAR, _LRU, pages.flags, pages.refcount,
                                        pages.mapcount, pages.mapping, pages.index, pages.private,
                                        pages.last_cpupid, pages.memcg, pages.order, pages.head, freed)
            self._free_old(freed)
            if dead:
                m.frames.free_folios(new[pages.refcount[new] <= 0])
        else:
            pages.flags[new] = (pages.flags[new] & _PUTBACK_CLEAR) | _LRU
            m.frames.free_folios(old)
            m.frames.put_folios(new, unique=True)
        self._count_moved(pos)

    def _undo(self, pos: np.ndarray, rc: int = PENDING) -> None:
        """``migrate_folio_undo_src/dst``: restore the source mappings, unlock, give back the destinations."""
        if pos.size == 0:
            return
        m, e, pages = self.m, self.e, self.m.pages
        srcp = e.base_pfns(e.src[pos], pos)
        remove_migration_entries(m, srcp, srcp)
        e.unmapped[pos] = False
        pages.clear(e.src[pos], _LOCKED)
        e.release_dst(pos)
        e.status[pos] = rc

