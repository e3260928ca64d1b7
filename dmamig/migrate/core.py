"""The migration core: ``migrate_pages()`` as the kernel runs it, batch by batch.

Each batch of :data:`~.options.NR_MAX_BATCHED_MIGRATION` base pages goes through ``migrate_pages_batch()``: an unmap
loop (get a destination, lock, check writeback, install migration entries; busy folios retried on the next
pass), one TLB flush, the copy (the migrating thread's, or one DMA submission waited for before any move), a
move loop (check references, move state, remap to the new folio; a folio with a transient reference stays
unmapped and is retried on the next pass), and the undo of what is left. Sync modes first run the batch in
ASYNC mode for a few passes, then each folio that failed alone, in the caller's mode. Large folios split on
``-ENOMEM`` are migrated after their batch in one ASYNC pass.

Return-code rules, as in mm/migrate.c:
- ``0``: migrated, counted in ``pgmigrate_success`` (``thp_migration_success`` for a PMD-sized folio);
- ``-EAGAIN`` (busy lock in ASYNC, unexpected extra reference): retried on the next pass of its loop; after
  the last pass it is final and counted failed (sync modes retry it alone first);
- ``-ENOMEM`` (no destination frame): a large folio is split (a THP failure) and its pieces migrated after the
  batch; for a base page it ends the call: folios already unmapped still move, the rest stay untried and are
  neither counted failed nor retried;
- anything else (``-EBUSY`` for writeback in ASYNC/SYNC_LIGHT) is permanent within its loop; sync modes retry
  every failed folio but ``-ENOMEM`` alone, in the caller's mode.
A failed DMA copy fails no folio: the folios of that submission are copied by the migrating thread instead
(the batch-offload RFC's fallback), and counted.

The whole of ``migrate_pages()`` is here, one method per step, as mm/migrate.c keeps it in one file: the driver
(batches, passes, retries), the unmap loop (``migrate_folio_unmap``: ``get_new_folio``, where -ENOMEM splits a
large folio or ends the call; the folio lock, which ASYNC only tries, a busy one retried on the next pass with
its destination freed; writeback, -EBUSY unless SYNC; ``try_to_migrate``), the copy (one DMA submission for the
batch, waited for before anything moves), the move loop (``migrate_folio_move``: references, the copy where no
current one exists, state and mapping, the migration entries onto the new folios, ``migrate_folio_done``) and
the undo (``migrate_folio_undo_src`` and ``_dst``). A batch mapped through one VMA runs each loop's pass as one
compiled call (:mod:`.batch_loops`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import page_loops
from ..arguments import as_pfn_array, check_node
from ..errors import DmaError, InvalidArgument
from ..flags import EAGAIN, EBUSY, ENOMEM, MigrateMode, MigrateReason, PageFlag
from ..vma import install_migration_entries, mark_device_private, remove_migration_entries
from . import batch_loops
from .cost_charges import BatchCharges
from .entries import HPAGE_PMD_ORDER, PENDING, SPLIT, UNTRIED, Entries
from .interrupts import DeferredInterrupt
from .isolate import check_dst, collect_folios, putback_folios
from .mapping_callbacks import mapping_migrate_check
from .options import MigrateOptions
from .result import PHASES, MigrateResult, MigrateStats
from .state import migrate_folio

if TYPE_CHECKING:
    from ..dma import DmaEngine, Fence
    from ..dma.engine import RingBatches
    from ..machine import Machine
    from ..vma import Vma

__all__ = [
    "NR_MAX_MIGRATE_ASYNC_RETRY",
    "NR_MAX_MIGRATE_PAGES_RETRY",
    "NR_MAX_MIGRATE_SYNC_RETRY",
    "MigrationRequest",
    "check_mode",
    "migrate_pfns",
    "run_migration",
]

#: Passes over a batch in all.
NR_MAX_MIGRATE_PAGES_RETRY = 10
#: Sync modes first try the whole batch in ASYNC mode this many passes...
NR_MAX_MIGRATE_ASYNC_RETRY = 3
#: ...then each folio that failed alone, in the caller's mode, this many passes.
NR_MAX_MIGRATE_SYNC_RETRY = NR_MAX_MIGRATE_PAGES_RETRY - NR_MAX_MIGRATE_ASYNC_RETRY
_MODE_MASK = MigrateMode.ASYNC | MigrateMode.SYNC_LIGHT | MigrateMode.SYNC

_LOCKED = PageFlag.LOCKED
_NONE = np.empty(0, dtype=np.int64)
_NONE.flags.writeable = False
_NO_LIST = np.empty((2, 0), dtype=np.int64)  # no submission to list: a copy migration
_LOCKED_U32 = np.uint32(PageFlag.LOCKED)
_WRITEBACK_U32 = np.uint32(PageFlag.WRITEBACK)
_PUTBACK_CLEAR = np.uint32(~np.uint32(PageFlag.ISOLATED | PageFlag.LOCKED))
_LRU = np.uint32(PageFlag.LRU)
_PRIVATE = np.uint32(PageFlag.PRIVATE)
# Stand-in for a node's alloc_args where the old folios span nodes (they are freed node by node after the call).
_NO_ALLOCATOR = (np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), 1, -1)
# No batch: what the fused loop moves before its first batch and unmaps after its last.
_NO_STEP = np.empty(0, dtype=np.int64)
# No rings, for fused batches the migrating thread copies (of a route table's type, never read).
_NO_RINGS = np.zeros(0, dtype=np.int64)
# No page table, for a fused table made while the object has no VMA (each batch looks again).
_NO_PTE_FLAGS = np.zeros(0, dtype=np.uint8)


_CHECKED_MODES: dict[tuple[MigrateMode, bool], MigrateMode] = {}  # valid (mode, allow_no_copy) pairs seen


def check_mode(mode: Any, allow_no_copy: bool) -> MigrateMode:
    """Validate a MigrateMode: exactly one of ASYNC, SYNC_LIGHT, SYNC, plus NO_COPY where allowed."""
    if isinstance(mode, MigrateMode) and (mode, allow_no_copy) in _CHECKED_MODES:
        return mode  # flag arithmetic on enums is slow; a mode once accepted is accepted again
    if not isinstance(mode, MigrateMode):
        raise InvalidArgument(f"mode must be a MigrateMode (ASYNC, SYNC_LIGHT or SYNC), got {mode!r}")
    base = mode & _MODE_MASK
    if base not in (MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC):
        raise InvalidArgument(f"mode must hold exactly one of ASYNC, SYNC_LIGHT, SYNC; got {mode!r}")
    if mode & MigrateMode.NO_COPY and not allow_no_copy:
        raise InvalidArgument("NO_COPY needs destinations whose content is already copied: pass engine=m.dma "
                              "here, or use m.migrate_pages(..., dst_pfns=...)")
    _CHECKED_MODES[(mode, allow_no_copy)] = mode
    return mode


# The vmstat counters every call adds to (from its MigrateStats, in this order; see _count_vmstat).
_CALL_COUNTERS = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
                  "thp_migration_split", "pgmigrate_no_copy", "pgmigrate_dma_fallback", "migrate_tlb_flush")

_BASE_MODES: dict[MigrateMode, MigrateMode] = {}  # mode -> its ASYNC/SYNC_LIGHT/SYNC part
_NO_PHASE_NS = dict.fromkeys(PHASES, 0)  # a call's phase times start as its copy (cheaper than dict.fromkeys)


def _base_mode(mode: MigrateMode) -> MigrateMode:
    base = _BASE_MODES.get(mode)
    if base is None:  # flag arithmetic on enums is slow: once per mode
        base = _BASE_MODES[mode] = mode & _MODE_MASK
    return base


class _Migration:
    """One ``migrate_pages()`` call over isolated folios: its entries, loops and statistics."""

    def __init__(self, m: Machine, node: int, mode: MigrateMode, engine: DmaEngine | None,
                 options: MigrateOptions, entries: Entries, reason: MigrateReason | None = MigrateReason.MR_SYSCALL,
                 kswapd: bool = False):
        self.m = m
        self.node = node
        # None: not a migrate_pages() call (a CPU fault bringing device pages back): no event, no reason counts.
        self.reason = reason
        self.kswapd = kswapd  # a demotion from kswapd's reclaim (pgdemote_kswapd), else from direct reclaim
        # alloc_demote_folio: the target first, then the other nodes of lower tiers (never a higher one)
        self.fallback_nodes = demotion_fallback(m, node, entries) if reason is MigrateReason.MR_DEMOTION else ()
        self.requested_mode = mode
        self.mode = _base_mode(mode)
        self.engine = engine
        self.options = options
        self.e = entries
        self.stats = MigrateStats()
        self.phase_ns = _NO_PHASE_NS.copy()
        self.enomem = False  # a base page found no frame: the call ends (the kernel's rc_saved = -ENOMEM)
        self.batch_enomem = False  # ...and the batch it was in stops unmapping
        self.batch_counts_folios = True  # the batch's failures are folios of the return value
        self.interrupts = DeferredInterrupt()  # Ctrl-C lands between phases only
        self.nr_failed_folios = 0  # the kernel's return value: folios not migrated, a split THP as one
        self.nr_moved_folios = 0  # entries moved so far: a step that moved them all needs no second look
        # The batch whose DMA wait just made every copy current (the first move pass then has nothing to check
        # before it moves).
        self.copied_batch: np.ndarray | None = None
        # The pages of the DMA submission, as the compiled unmap pass listed them: (the entries it unmapped,
        # source pfns, destination pfns); taken by the submission when those entries are the whole batch.
        self.listed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # The one object every folio belongs to, where the compiled one-VMA passes may run (see _one_vma).
        self.one_object = entries.obj if batch_loops.HAVE_NUMBA and batch_loops.USE_BATCH_LOOPS else None
        self.charges = BatchCharges.start(m, entries, self.stats)  # None unless the machine has a cost model

    # -- migrate_pages(): batches, one at a time ---------------------------------------------------------------
    def migrate_pages(self, positions: np.ndarray) -> None:
        """Cut the entries into batches and run each; split pieces after their batch; retries per mode."""
        steps = self.e.steps(positions, self.options.batch_pages, self.options.batches_per_step)
        depth = self.options.pipeline_depth if self.engine is not None else 0
        if depth == 0:
            i = 0
            while i < len(steps) and not self.enomem:
                fusable, rings = self._can_fuse(steps, i)
                if fusable:
                    ran = self._fused_steps(steps, i, rings)
                    if ran > i:
                        i = ran
                        continue
                    # (none ran: the VMA or the rings could not be used; this step goes the general way)
                step = steps[i]
                moved = self.nr_moved_folios
                self._drive(self._first_pass(step))
                if self.nr_moved_folios - moved < step.size or self.e.has_pieces:
                    self._after_step(step)
                i += 1
            return
        # Experiment: a step's DMA copy runs while the next steps are unmapped. The blocking per-folio retries
        # and the split pieces wait until every step is through, so that no thread sleeps on a page lock while
        # it holds other folios locked for an unfinished step.
        queue: deque[Iterator[None]] = deque()
        for step in steps:
            if self.enomem:
                break
            gen = self._first_pass(step)
            if next(gen, StopIteration) is not StopIteration:
                queue.append(gen)
            while len(queue) > depth:
                self._drive(queue.popleft())
        while queue:
            self._drive(queue.popleft())
        if not self.enomem:
            self._after_step(np.concatenate(steps) if steps else positions[:0])

    def _first_pass(self, step: np.ndarray,
                    first: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[None]:
        return self.migrate_pages_batch(step, MigrateMode.ASYNC, self._first_passes(), first=first)

    def _first_passes(self) -> int:
        """Passes of a step's first, ASYNC, run: all of them in ASYNC mode, else the sync modes' ASYNC share."""
        return NR_MAX_MIGRATE_PAGES_RETRY if self.mode == MigrateMode.ASYNC else NR_MAX_MIGRATE_ASYNC_RETRY

    @staticmethod
    def _drive(gen: Iterator[None]) -> None:
        for _ in gen:
            pass

    # -- fused batches: a long migration, one compiled call per batch -----------------------------------------
    def _can_fuse(self, steps: list[np.ndarray], i: int) -> tuple[bool, RingBatches | None]:
        """Whether the steps from ``i`` on can run as fused batches (see :meth:`_fused_steps`), and the DMA rings
        they go over (None: the migrating thread copies).

        Fused are the common batches of a long migration: anonymous folios of one order, mapped through one VMA,
        from one node to another (whose DMA channels take ring rows, for a no-copy migration), one batch per
        step, no split pieces waiting, no fault point armed, no cost model, coherent device memory; a call of one
        batch too (its two fused calls cost less than the general path's three and its Python). Everything else
        (and every batch that leaves the common case on its way) takes the general path, which is the
        reference.
        """
        e, m = self.e, self.m
        if batch_loops.fused_batch is None or self.one_object is None or e.one_order < 0 \
                or e.all_given or e.by_callback is not None or e.shmem is not None or self.fallback_nodes \
                or self.charges is not None or m.device_private or e.src_node < 0 or e.src_node == self.node \
                or self.options.batches_per_step != 1 or e.has_pieces:
            return False, None
        if self.engine is None:
            return not m.faults.armed, None
        # (no rings while fault points are armed: the engine's faults are the machine's)
        rings = self.engine.ring_batches(e.src_node, self.node, max(map(len, steps[i:])) << e.one_order)
        return rings is not None, rings

    def _fused_steps(self, steps: list[np.ndarray], i: int, rings: RingBatches | None) -> int:
        """Run the steps from ``i`` on as fused batches, copied by the DMA engine over ``rings`` (None: by the
        migrating thread); returns the index of the first step not run.

        Per batch one compiled call under the machine lock (:func:`~.batch_loops.fused_batch`): the move pass
        of the batch before, whose copy is made, then the unmap pass of this one and the start of its copy (the
        submission of its pages to the rings; or the reference check before a copy of the migrating thread's);
        then, outside every lock, the wait for the DMA copy or the copy itself. The kernel's order is kept (a
        batch's move before the next batch's unmap), and so are the lock discipline and the counters of the
        general path. A batch that leaves the common case (folios busy or under writeback, no frames on the
        target node, a ring the submission does not go to, a failed copy, folios left after the move pass) is
        finished from that point by the general path; where the VMA or the rings can no longer be used, the
        batch before is moved the general way. Either way the caller goes on from the index returned (and asks
        :meth:`_can_fuse` again: the batch may have changed what the rest can take).
        """
        m, e, pages = self.m, self.e, self.m.pages
        copying = rings is None
        self.batch_mode = MigrateMode.ASYNC
        nodes = m.nodes
        tn, sn = nodes[self.node], nodes[e.src_node]
        ta, sa = tn.allocator, sn.allocator
        most = max(map(len, steps[i:]))
        work = batch_loops.fused_work(most, most << e.one_order)
        acc = work[:batch_loops.ACC_WORDS]
        # The steps from i on, one after another in one array: a batch is a range of it.
        positions = steps[i] if len(steps) == i + 1 else np.concatenate(steps[i:])
        # The VMA as it is now (each batch looks again under the lock, and sets it again where it changed).
        obj = self.one_object
        with m.lock:
            vma_in = self._one_vma()
            if vma_in is None:
                vma_part = (obj.pfns, 0, 0, _NO_STEP, _NO_PTE_FLAGS)
            else:
                vma_part = (obj.pfns, vma_in.pgoff, vma_in.npages, vma_in.pte_pfn, vma_in.pte_flags)
        table = batch_loops.fused_table(positions, e.status, e.src, e.ints, e.bools, pages.state, work,
                                        tn.alloc_args, sn.alloc_args, PENDING, e.oid, e.one_order, copying, vma_part)
        words = table.words
        # What the table holds of the VMA.
        obj_pfns_in, pgoff_in, npages_in, pte_pfn_in, pte_flags_in = vma_part
        prev = _NO_STEP  # the batch whose copy is done, moved by the next call
        prev_lo = prev_hi = lo = 0  # prev's range in positions; where the next batch starts
        interrupts, changed, call = self.interrupts, m.changed, batch_loops.fused_batch
        waited = 0  # nanoseconds of DMA waits, added to the phase times once
        try:
            while True:
                nxt = steps[i] if i < len(steps) else _NO_STEP
                hi = lo + nxt.size
                interrupts.check()
                # The last call only moves: it submits nothing, so it holds no rings.
                held = not copying and hi > lo
                with m.lock:
                    vma = self._one_vma()
                    ring_table = None if vma is None else (rings.hold() if held else _NO_RINGS)
                    if ring_table is None:
                        code = -1
                    else:
                        try:
                            # (compiled code reads the table's arrays unchecked: anything the VMA's part
                            # came from that may change is compared)
                            if vma is not vma_in or vma.pte_pfn is not pte_pfn_in \
                                    or vma.pte_flags is not pte_flags_in or obj.pfns is not obj_pfns_in \
                                    or vma.npages != npages_in or vma.pgoff != pgoff_in:
                                batch_loops.set_fused_vma(table, obj.pfns, vma.pgoff, vma.npages, vma.pte_pfn,
                                                          vma.pte_flags)
                                vma_in, pte_pfn_in, pte_flags_in, obj_pfns_in = vma, vma.pte_pfn, vma.pte_flags, \
                                    obj.pfns
                                npages_in, pgoff_in = vma.npages, vma.pgoff
                            code, nr, nlisted, taken, given_back = call(words, ring_table, prev_lo, prev_hi, lo,
                                                                        hi, rings.seq if held else 0)
                            if code == batch_loops.FUSED_SUBMITTED:
                                rings.published(nlisted, nr)
                        finally:
                            if held:
                                rings.release()
                        if taken:
                            ta.taken(taken)
                        if given_back:
                            sa.taken(-given_back)
                        if code == batch_loops.FUSED_MOVE_LEFT:
                            rc, _listed, freed, _acc, _ts = batch_loops.work_views(work)
                            left = self._settle_moved(prev, rc[:prev.size], freed, sa,
                                                      acc[batch_loops.ACC_LAST_MOVE:].tolist())
                        elif code == batch_loops.FUSED_UNMAP_LEFT:
                            rc = batch_loops.work_views(work)[0]
                            done, retry = self._sort_unlocked(nxt, rc[:nxt.size])
                        if prev.size:
                            changed.notify_all()
                if code == batch_loops.FUSED_SUBMITTED:
                    t0 = time.perf_counter_ns()
                    try:
                        rings.wait()
                    except DmaError:
                        waited += time.perf_counter_ns() - t0
                        self._copy_failed(None, nxt)
                        self._move_and_undo(nxt, self._first_passes(), 1, counted=1)
                        self._after_step(nxt)
                        return i + 1
                    waited += time.perf_counter_ns() - t0
                    prev, i, prev_lo, prev_hi, lo = nxt, i + 1, lo, hi, hi
                    continue
                if code == batch_loops.FUSED_TO_COPY:
                    # The migrating thread copies outside the lock; the locked, unmapped sources cannot change
                    # meanwhile (the move pass checks the references once more).
                    t0 = time.perf_counter_ns()
                    m.frames.copy_folios(e.src[nxt], e.dst[nxt])
                    self.phase_ns["copy"] += time.perf_counter_ns() - t0
                    prev, i, prev_lo, prev_hi, lo = nxt, i + 1, lo, hi, hi
                    continue
                break
        finally:
            self.phase_ns["dma_wait"] += waited
            self._add_fused(acc)
            if rings is not None:
                rings.close()
        # Out of the common case: the batch where it happened goes on the general way from where it is, and the
        # caller asks again whether the steps after it can be fused (a split, say, leaves folios of two orders).
        if code == batch_loops.FUSED_MOVED:
            return i
        if code == -1:  # the VMA or the rings cannot be used now: the batch before moves the general way
            if prev.size:
                e.fresh[prev] = True
                self.copied_batch = prev
                self._move_and_undo(prev, self._first_passes(), 1, counted=1)
                self._after_step(prev)
            return i
        if code == batch_loops.FUSED_MOVE_LEFT:  # the batch before has folios left; this one is untouched
            if left.size:
                self._move_and_undo(left, self._first_passes(), 1, nr_move=1, counted=1)
            else:  # the pass moved them all, and left Python its share (a new folio nobody holds)
                self.stats.nr_move_passes += 1
            self._after_step(prev)
            return i
        if code == batch_loops.FUSED_NO_FRAMES:  # untouched: the general allocation has the rules
            self._drive(self._first_pass(nxt))
        elif code == batch_loops.FUSED_UNMAP_LEFT:
            self.listed = None  # the general submission lists the pages of every pass
            self._drive(self._first_pass(nxt, first=(done, retry)))
        else:  # FUSED_UNMAPPED: unmapped whole; the general path copies (the engine's general path submits)
            listed = batch_loops.work_views(work)[1]
            self.listed = None if copying else (nxt, listed[0, :nlisted].copy(), listed[1, :nlisted].copy())
            self._drive(self._first_pass(nxt, first=(nxt, _NONE)))
        self._after_step(nxt)
        return i + 1

    def _add_fused(self, acc: np.ndarray) -> None:
        """Add what fused batches did (:func:`~.batch_loops.fused_batch`'s ``acc``) to the call's counters."""
        (pages, thp, large, no_copy, moved, unmaps, moves, move_ns, unmap_ns,
         submit_ns) = acc[:batch_loops.ACC_LAST_MOVE].tolist()
        s = self.stats
        s.nr_succeeded += pages
        s.nr_thp_succeeded += thp
        s.nr_large_succeeded += large
        s.nr_no_copy += no_copy
        self.nr_moved_folios += moved
        s.nr_unmap_passes += unmaps
        s.nr_tlb_flush += unmaps
        s.nr_passes += unmaps
        s.nr_move_passes += moves
        self.phase_ns["move"] += move_ns
        self.phase_ns["unmap"] += unmap_ns
        self.phase_ns["submit"] += submit_ns

    def _after_step(self, step: np.ndarray) -> None:
        """``migrate_pages_sync``'s second half, then the split pieces of the step's large folios."""
        e = self.e
        if not (e.status[step] != 0).any() and not e.has_pieces:
            return  # the whole step moved
        if self.mode != MigrateMode.ASYNC:
            # Every folio that failed but for lack of memory is tried again alone in the caller's mode: now it
            # may block on the page lock and on writeback. Its failure in the ASYNC passes is not counted.
            st = e.status[step]
            retry = step[(st == PENDING) | ((st < 0) & (st != ENOMEM))]
            e.status[retry] = PENDING
            for pos in retry.tolist():
                if self.enomem:
                    break
                self._drive(self.migrate_pages_batch(np.array([pos]), self.mode, NR_MAX_MIGRATE_SYNC_RETRY))
            self._count_failed(retry)
        else:
            st = e.status[step]
            self._count_failed(step[(st == PENDING) | (st < 0)])
        pieces = e.take_split_pieces()
        if pieces.size and not self.enomem:
            # One ASYNC pass; the pieces' failures are not folios of the return value: their large folio
            # already counted as one.
            self._drive(self.migrate_pages_batch(pieces, MigrateMode.ASYNC, 1, ends_call=False))
            self._count_failed(pieces, folios=False)

    def _count_failed(self, pos: np.ndarray, folios: bool = True) -> None:
        """Settle entries that end failed: the EAGAIN ones become -EAGAIN; count pages and folios."""
        e = self.e
        st = e.status[pos]
        e.status[pos[st == PENDING]] = EAGAIN
        failed = pos[(e.status[pos] < 0) & ~e.counted[pos]]
        if failed.size == 0:
            return
        e.counted[failed] = True
        nr = e.nr[failed]
        self.stats.nr_failed_pages += int(nr.sum())
        thp = int(np.count_nonzero(e.order[failed] == HPAGE_PMD_ORDER))
        self.stats.nr_thp_failed += thp
        self.stats.nr_large_failed += int(np.count_nonzero(nr > 1))
        if folios:
            self.nr_failed_folios += failed.size

    # -- migrate_pages_batch(): unmap loop, flush, copy, move loop, undo ----------------------------------------
    def migrate_pages_batch(self, todo: np.ndarray, mode: MigrateMode, passes: int, ends_call: bool = True,
                            first: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[None]:
        """One batch (or step) through its unmap and move loops; yields while its DMA copy runs.

        A base page without a frame stops the unmap loop; unless the batch is the pass over split pieces
        (``ends_call=False``, whose result the kernel ignores), it also ends the whole call. ``first``: the
        batch's first unmap pass was made already (a fused batch handed over, see :meth:`_fused_steps`), with
        these ``(unmapped, busy)`` entries, and :attr:`listed` holds what it listed.
        """
        e = self.e
        unmapped: list[np.ndarray] = []
        nr_unmap = 0
        self.batch_enomem = False
        self.batch_counts_folios = ends_call
        tried = 0  # folio lock attempts, for a cost model
        if first is None:
            self.listed = None  # what an earlier batch's unmap pass listed and no submission took
            if self.charges is not None:
                self.charges.before_unmap(todo)
        else:
            tried, nr_unmap = todo.size, 1
            unmapped.append(first[0])
            todo = first[1]
        for _ in range(passes - nr_unmap):
            self.interrupts.check()
            if todo.size == 0 or self.batch_enomem:
                break
            nr_unmap += 1
            tried += todo.size
            done, todo = self._unmap_pass(todo, mode)
            unmapped.append(done)
        if self.batch_enomem and ends_call:
            self.enomem = True
        self.stats.nr_unmap_passes += nr_unmap
        moving = np.concatenate(unmapped) if len(unmapped) > 1 else (unmapped[0] if unmapped else todo[:0])
        if moving.size == 0:
            self.stats.nr_passes += nr_unmap
            if self.charges is not None:
                self.charges.unmapped(tried, moving, 0, False)
            return
        # try_to_unmap_flush(): one flush per batch, after the whole batch is unmapped.
        flushes = e.nr_batches(moving)
        self.stats.nr_tlb_flush += flushes
        self.interrupts.check()
        fence = self._submit(moving)
        record = None if self.charges is None else self.charges.unmapped(tried, moving, flushes, fence is not None)
        if fence is not None:
            yield
            self._wait(fence, moving)
        if record is not None:
            record.before_move()
        self._move_and_undo(moving, passes, nr_unmap, record=record)

    def _move_and_undo(self, moving: np.ndarray, passes: int, nr_unmap: int, nr_move: int = 0, counted: int = 0,
                       record: Any = None) -> None:
        """The move loop of a batch whose copy is done, then the undo of what is left.

        ``nr_move``: move passes made already (a fused batch's, which left busy folios; not yet counted);
        ``counted``: this batch's passes counted in ``nr_passes`` already (a fused batch counts one when it is
        submitted). ``record``: the batch's cost-model record, if any.
        """
        freezes = 0  # reference freezes, for a cost model
        while nr_move < passes:
            self.interrupts.check()
            if nr_move:
                # The folios left were busy: their holders may have written them since the copy. Those copies
                # are made again in this pass (the freeze checks once more, under the lock).
                self._drop_stale_copies(moving)
            nr_move += 1
            freezes += moving.size
            moving = self._move_pass(moving)
            if moving.size == 0:
                break
        if record is not None:
            record.moved(freezes, moving)  # what is left is undone below
        self.stats.nr_move_passes += nr_move
        self.stats.nr_passes += max(nr_unmap, nr_move) - counted
        if moving.size == 0:
            return
        t0 = time.perf_counter_ns()
        with self.m.changed:
            self._undo(moving)  # still busy after the last pass: -EAGAIN, remapped to the old folio
            self.m.changed.notify_all()
        self.phase_ns["undo"] += time.perf_counter_ns() - t0

    # -- the unmap loop: migrate_folio_unmap over a batch, pass by pass -------------------------------------------
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
        rc = np.empty(todo.size, dtype=np.int32)
        # With an engine, the pass also lists the DMA submission's pages (every base page of the batch at most).
        listed = _NO_LIST
        if self.engine is not None:
            listed = np.empty((2, todo.size << e.one_order if e.one_order >= 0 else int(e.nr[todo].sum())),
                              dtype=np.int64)
        while True:
            bad, taken, n = batch_loops.unmap_one_vma(
                todo, e.status, PENDING, e.src, e.ints, e.bools, pages.state, e.oid, vma.pgoff, vma.npages,
                vma.pte_pfn, vma.pte_flags, *nd.alloc_args, order, rc, listed)
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
            todo, retry = self._sort_unlocked(todo, rc)
        if listed is not _NO_LIST:
            self.listed = (todo, listed[0, :n], listed[1, :n])
        if was_clean is not None:
            self._count_dirtied(was_clean)
        return todo, retry

    def _sort_unlocked(self, todo: np.ndarray, rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """After a compiled unmap pass where some folios did not lock (``rc`` per entry of ``todo``: 0 unmapped,
        1 busy, -EBUSY writeback): the busy ones give back their destinations for the next pass, the ones under
        writeback fail. Returns (unmapped, busy). Caller holds the lock."""
        e = self.e
        retry = todo[rc == 1]
        wb = todo[rc == EBUSY]
        if wb.size:
            e.release_dst(wb)
            e.status[wb] = EBUSY
            self.m.changed.notify_all()
        e.release_dst(retry)
        return todo[rc == 0], retry

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
            src = np.empty(total, dtype=np.int64)
            dst = np.empty(total, dtype=np.int64)
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
        except DmaError:
            self.phase_ns["dma_wait"] += time.perf_counter_ns() - t0
            self._copy_failed(fence.failed_pages(), moving)
            return
        self.phase_ns["dma_wait"] += time.perf_counter_ns() - t0
        self.e.fresh[moving] = True
        self.copied_batch = moving

    def _copy_failed(self, hit: np.ndarray | None, moving: np.ndarray) -> None:
        """The batch's DMA copy failed: the migrating thread copies the folios whose destinations it hit (the
        pages ``hit``; None: any), then every copy of the batch is current."""
        # Only the folios the failure hit: a destination page in a failed channel share. The others were copied
        # and move as they are.
        e = self.e
        failed = moving[~e.fresh[moving]]
        if hit is not None:
            failed = failed[np.isin(e.dst[failed], self.m.pages.head[hit])]
        # The source is unmapped and locked, so a CPU copy now is as exact as the DMA copy would have been.
        t0 = time.perf_counter_ns()
        self.m.frames.copy_folios(e.src[failed], e.dst[failed])
        self.phase_ns["copy"] += time.perf_counter_ns() - t0
        self.stats.nr_dma_fallback += int(e.nr[failed].sum())
        e.fresh[moving] = True
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
            stale = np.empty(moving.size, dtype=np.int64)
            keep = np.empty(moving.size, dtype=np.int64)
            busy = np.empty(moving.size, dtype=np.int64)
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
        freed = np.empty(total, dtype=np.int64)
        rc = np.empty(moving.size, dtype=np.int32)
        if e.src_node >= 0:
            nd = m.nodes[e.src_node]
            alloc, alloc_args = nd.allocator, nd.alloc_args
        else:
            alloc, alloc_args = None, _NO_ALLOCATOR
        got = batch_loops.move_one_vma(
            moving, e.status, e.src, e.ints, e.bools, pages.state, e.oid, self.one_object.pfns, vma.pgoff,
            vma.npages, vma.pte_pfn, vma.pte_flags, rc, freed, *alloc_args)
        return self._settle_moved(moving, rc, freed, alloc, got)

    def _settle_moved(self, moving: np.ndarray, rc: np.ndarray, freed: np.ndarray, alloc: Any,
                      got: tuple[int, ...] | list[int]) -> np.ndarray:
        """After a compiled move pass over ``moving`` (:func:`~.batch_loops.move_one_vma`: its ``rc`` and
        ``freed``, and ``got``, its seven results; ``alloc``: the source node's allocator it gave the old frames
        back to, or None): what it leaves to Python (a double free, the shmem counters, device-private entries,
        new folios nobody holds), then the counters. Returns the busy entries. Caller holds the lock."""
        m, e, pages = self.m, self.e, self.m.pages
        nfreed, thp, large, no_copy, dead, nbusy, bad = got
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
        s.nr_succeeded += nfreed
        s.nr_thp_succeeded += thp
        s.nr_large_succeeded += large
        s.nr_no_copy += no_copy
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

    # -- the end ------------------------------------------------------------------------------------------------
    def finish(self, interrupted: bool) -> bool:
        """Put back every source that did not migrate and free unused destinations; settle the counters. Returns
        whether every entry moved (then nothing was put back; a split folio's own entry never moves).

        After an exception (an interrupt between phases, a failing copy) some entries may still be unmapped:
        they are restored first, so no page stays unmapped, locked or isolated.
        """
        m, e = self.m, self.e
        if not interrupted and not self.enomem and self.nr_moved_folios == e.size:
            with m.lock:  # every folio moved: nothing to put back
                self._count_vmstat()
            return True
        with m.changed:
            if e.unmapped.any():
                if self.engine is not None:
                    self.engine.synchronize()  # no copy may still write a destination we free
                self._undo(np.flatnonzero(e.unmapped))
            if interrupted:
                e.status[e.status == UNTRIED] = PENDING
            untried = np.flatnonzero(e.status == UNTRIED)
            e.counted[untried] = True  # never tried: the call ended on -ENOMEM before reaching them
            e.status[untried] = ENOMEM
            self.stats.nr_untried_pages += int(e.nr[untried].sum())
            self._count_failed(np.flatnonzero((e.status == PENDING) | ((e.status < 0) & ~e.counted)))
            back = np.flatnonzero((e.status != 0) & (e.status != SPLIT))
            putback_folios(m, e.src[back])
            e.release_dst(back, given_too=True)
            self._count_vmstat()
            m.changed.notify_all()
        return False

    def _count_vmstat(self) -> None:
        """Add the call's counters to vmstat, once, at the end (as migrate_pages() does), with the reason's own
        counters, and record the call's ``mm_migrate_pages`` event (caller holds the lock)."""
        s, m = self.stats, self.m
        if self.reason is not None:
            self._count_reason()
            m.record_migration(s.nr_succeeded, s.nr_failed_pages, s.nr_thp_succeeded, s.nr_thp_failed,
                               s.nr_thp_split, s.nr_split, self.requested_mode, self.reason)
        m.count_events(_CALL_COUNTERS, (s.nr_succeeded, s.nr_failed_pages, s.nr_thp_succeeded, s.nr_thp_failed,
                                        s.nr_thp_split, s.nr_no_copy, s.nr_dma_fallback, s.nr_tlb_flush))


    def _count_reason(self) -> None:
        """The counters a reason adds: ``numa_pages_migrated`` and ``pgpromote_success`` for NUMA balancing (a
        promotion is a move from a lower tier into the top tier, the first host node), ``pgdemote_kswapd`` or
        ``pgdemote_direct`` for a demotion, after the reclaimer that demoted (``reclaimer_offset()``)."""
        s, m = self.stats, self.m
        if not s.nr_succeeded:
            return
        if self.reason == MigrateReason.MR_NUMA_MISPLACED:
            m.count_event("numa_pages_migrated", s.nr_succeeded)
            # Collection leaves out the pages already on the target node, so every page that moved into the top
            # tier came from below it (or from a device).
            if self.node == m.host_node_ids[0]:
                m.count_event("pgpromote_success", s.nr_succeeded)
        elif self.reason == MigrateReason.MR_DEMOTION:
            m.count_event("pgdemote_kswapd" if self.kswapd else "pgdemote_direct", s.nr_succeeded)


def demotion_fallback(m: Machine, node: int, entries: Entries) -> tuple[int, ...]:
    """The nodes ``alloc_demote_folio`` falls back to once ``node`` (the demotion target, tried alone first with
    ``__GFP_THISNODE``) has no frame: the other host nodes in tiers below every source's tier
    (``node_get_allowed_targets``), nearest tier first; never a node of the sources' tier or above."""
    tiers = m.host_node_ids
    src = entries.src
    if src.size == 0:
        return ()
    nodes = np.unique(m.nodemap.node_of(src)).tolist()
    if any(n not in tiers for n in nodes):
        return ()  # a device page has no tier below it
    lowest = max(tiers.index(n) for n in nodes)
    return tuple(n for n in tiers[lowest + 1:] if n != node)


# -- entry points ------------------------------------------------------------------------------------------------
@dataclass
class MigrationRequest:
    """One ``migrate_pages()`` call over folios already isolated: what moves, where to, how, and which pages
    the caller asked about.

    Attributes
    ----------
    heads : numpy.ndarray
        Head pfns of the isolated folios, each once (:func:`~.isolate.collect_folios` gives them).
    node : int
        The target node.
    mode : MigrateMode
        ``ASYNC``, ``SYNC_LIGHT`` or ``SYNC``; ``| NO_COPY`` when ``engine`` or the caller copies.
    pfns : numpy.ndarray
        The pages the caller named: the result holds one status per entry.
    status : numpy.ndarray
        :func:`~.isolate.collect_folios`'s provisional status of ``pfns``; its pending entries get the status
        of their folio.
    t_thread, t_wall : int
        ``time.thread_time_ns()`` and ``time.perf_counter_ns()`` when the caller's call began: the result's
        times (and its ``isolate`` phase) count from there.
    engine : DmaEngine, optional
        The DMA engine that copies each batch (no-copy migration); ``None``: the migrating thread copies.
    dst : numpy.ndarray, optional
        Destination folio heads, one per entry of ``heads``, whose content the caller copied already
        (``Machine.migrate_pages`` with ``NO_COPY``); ``None``: the core allocates destinations.
    options : MigrateOptions, optional
        Batching; ``None`` is the kernel's.
    reason : MigrateReason or None
        Why the folios migrate (``MR_SYSCALL`` by default); ``None`` for a migration that is not a
        ``migrate_pages()`` call (a CPU fault bringing device pages back), which records no event.
    kswapd : bool
        A demotion from kswapd's reclaim (``pgdemote_kswapd``), else from direct reclaim.
    entry : numpy.ndarray, optional
        Per page of ``pfns``, the position of its folio in ``heads`` (-1 for a page whose folio is not one of
        them), as :func:`~.isolate.collect_located` gives it for these very heads; ``None``: found here.
    """

    heads: np.ndarray
    node: int
    mode: MigrateMode
    pfns: np.ndarray
    status: np.ndarray
    t_thread: int
    t_wall: int
    engine: DmaEngine | None = None
    dst: np.ndarray | None = None
    options: MigrateOptions | None = None
    reason: MigrateReason | None = MigrateReason.MR_SYSCALL
    kswapd: bool = False
    entry: np.ndarray | None = None


def run_migration(m: Machine, req: MigrationRequest) -> MigrateResult:
    """Migrate the isolated folios of ``req`` and build the result for the pages it names."""
    heads, pfns, status, t_thread, t_wall = req.heads, req.pfns, req.status, req.t_thread, req.t_wall
    options = MigrateOptions.coerce(req.options)
    t_run = time.perf_counter_ns()
    with m.lock:  # the folios' objects may be released by a concurrent munmap once the lock is dropped
        entries = Entries(m, heads, req.dst)
        if not heads.size:
            where = None
        elif req.entry is not None:
            where = (req.entry, pfns)  # collection found each page's folio already
        else:
            where = entries.locate(pfns, status)
    mig = _Migration(m, req.node, req.mode, req.engine, options, entries, req.reason, req.kswapd)
    mig.phase_ns["isolate"] = t_run - t_wall  # validation, collecting the range, isolating its folios
    if heads.size:
        interrupted = True
        with mig.interrupts:
            try:
                mig.migrate_pages(np.arange(heads.size))
                interrupted = False
            finally:
                t0 = time.perf_counter_ns()
                entries.fill_status(status, where, all_moved=mig.finish(interrupted))
                mig.phase_ns["putback"] += time.perf_counter_ns() - t0
    s = mig.stats
    rc = ENOMEM if mig.enomem else mig.nr_failed_folios
    if rc and entries.all_migrated():
        rc = 0  # a split large folio counted as a failure, but all its pieces moved (03e5f82ea632)
    # The result's fields in order, positional: keywords cost a call of one folio measurably.
    return MigrateResult(status, s.nr_succeeded, s.nr_failed_pages, s.nr_thp_succeeded, s.nr_thp_failed,
                         s.nr_thp_split, mig.phase_ns,
                         time.thread_time_ns() - t_thread,  # thread_time_ns
                         time.perf_counter_ns() - t_wall,  # wall_ns
                         s, options, rc,
                         None if mig.charges is None else mig.charges.clock.result())  # modelled


def check_reason(reason: Any) -> MigrateReason:
    """``reason`` as a :class:`~dmamig.flags.MigrateReason`; an error naming the argument otherwise."""
    if type(reason) is MigrateReason:
        return reason
    try:
        return MigrateReason(reason)
    except (ValueError, TypeError):
        raise InvalidArgument(f"reason must be a MigrateReason (MR_SYSCALL, MR_NUMA_MISPLACED, MR_DEMOTION, ...), "
                              f"got {reason!r}") from None


def migrate_pfns(m: Machine, pfns: Any, node: int, mode: MigrateMode, dst_pfns: Any = None,
                 options: MigrateOptions | None = None,
                 reason: MigrateReason = MigrateReason.MR_SYSCALL, kswapd: bool = False,
                 engine: DmaEngine | None = None) -> MigrateResult:
    """``Machine.migrate_pages``: validate, isolate, migrate, put back (``engine``: the DMA engine copies, for
    the demotion entry point)."""
    t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    reason = check_reason(reason)
    pfns = as_pfn_array(m, "pfns", pfns)
    node = check_node(m, "node", node)
    mode = check_mode(mode, allow_no_copy=True)
    options = MigrateOptions.coerce(options)
    no_copy = _base_mode(mode) != mode and engine is None  # NO_COPY; with an engine, the engine copies
    if no_copy != (dst_pfns is not None):
        raise InvalidArgument("NO_COPY and dst_pfns go together: NO_COPY moves state onto destinations the "
                              "caller already copied (dst_pfns from m.alloc_pages); without NO_COPY the core "
                              "allocates destinations itself")
    with m.changed:
        dst = None
        if no_copy:
            dst = check_dst(m, pfns, as_pfn_array(m, "dst_pfns", dst_pfns), node)
        status, heads = collect_folios(m, pfns, node)
        if dst is not None:
            taken = status == PENDING
            m.frames.free_folios(dst[~taken])  # destinations of folios that will not move are ours to free
            dst = dst[taken]
            heads = pfns[taken]
    return run_migration(m, MigrationRequest(heads=heads, node=node, mode=mode, pfns=pfns, status=status,
                                             t_thread=t_thread, t_wall=t_wall, dst=dst, options=options,
                                             reason=reason, kswapd=kswapd, engine=engine))


def migrate_misplaced_folio(m: Machine, pfn: Any, node: int) -> MigrateResult:
    """``Machine.migrate_misplaced_folio``: NUMA balancing's move of one folio after a hint fault, ASYNC, with
    ``MR_NUMA_MISPLACED`` (a large folio that finds no destination fails rather than splits)."""
    pfn = as_pfn_array(m, "pfn", np.atleast_1d(np.asarray(pfn)))
    if pfn.size != 1:
        raise InvalidArgument(f"migrate_misplaced_folio moves one folio: pfn must be one pfn, got {pfn.size}")
    return migrate_pfns(m, pfn, node, MigrateMode.ASYNC, reason=MigrateReason.MR_NUMA_MISPLACED)


def next_demotion_node(m: Machine, node: int) -> int:
    """The host node one tier below ``node`` (host nodes are tiers, fastest first), or -1 for the lowest tier
    and for device memory, which has no demotion target."""
    tiers = m.host_node_ids
    if node not in tiers or tiers.index(node) + 1 == len(tiers):
        return -1
    return tiers[tiers.index(node) + 1]


def demote_folios(m: Machine, pfns: Any, kswapd: bool = False, engine: DmaEngine | None = None) -> MigrateResult:
    """``Machine.demote_folios``: ``demote_folio_list`` over folios of one host node: ``migrate_pages()`` to the
    next tier down, ``ASYNC``, ``MR_DEMOTION``, with ``alloc_demote_folio``'s fallback to lower tiers."""
    if engine is not None and engine is not m.dma:
        raise InvalidArgument("engine must be this machine's DMA engine (m.dma) or None")
    pfns = as_pfn_array(m, "pfns", pfns)
    nodes = np.unique(m.nodemap.node_of(pfns)).tolist()
    if len(nodes) != 1:
        raise InvalidArgument(f"demotion reclaims one node's folios (demote_folio_list runs per node): pfns lie "
                              f"on nodes {nodes}")
    target = next_demotion_node(m, nodes[0])
    if target < 0:
        raise InvalidArgument(f"node {nodes[0]} has no demotion target: it is not a host node above the lowest "
                              f"tier (host tiers, fastest first: {list(m.host_node_ids)})")
    mode = MigrateMode.ASYNC if engine is None else MigrateMode.ASYNC | MigrateMode.NO_COPY
    return migrate_pfns(m, pfns, target, mode, reason=MigrateReason.MR_DEMOTION, kswapd=kswapd, engine=engine)
