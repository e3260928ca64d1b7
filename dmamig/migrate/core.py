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
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import as_pfn_array, check_node
from ..errors import InvalidArgument
from ..flags import EAGAIN, ENOMEM, MigrateMode, MigrateReason
from . import batch_loops
from .cost_charges import BatchCharges
from .entries import HPAGE_PMD_ORDER, PENDING, SPLIT, UNTRIED, Entries
from .interrupts import DeferredInterrupt
from .isolate import check_dst, collect_folios, putback_folios
from .move import MovePhase
from .options import MigrateOptions
from .result import PHASES, MigrateEvent, MigrateResult, MigrateStats
from .unmap import UnmapPhase

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..machine import Machine

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


_BASE_MODES: dict[MigrateMode, MigrateMode] = {}  # mode -> its ASYNC/SYNC_LIGHT/SYNC part


def _base_mode(mode: MigrateMode) -> MigrateMode:
    base = _BASE_MODES.get(mode)
    if base is None:  # flag arithmetic on enums is slow: once per mode
        base = _BASE_MODES[mode] = mode & _MODE_MASK
    return base


class _Migration(UnmapPhase, MovePhase):
    """One ``migrate_pages()`` call over isolated folios: its entries, loops and statistics.

    The unmap loop's passes come from :class:`UnmapPhase` (unmap.py), the copy and the move loop's passes from
    :class:`MovePhase` (move.py); this class drives them as ``migrate_pages()`` and ``migrate_pages_batch()``.
    """

    def __init__(self, m: Machine, node: int, mode: MigrateMode, engine: DmaEngine | None,
                 options: MigrateOptions, entries: Entries, reason: MigrateReason | None = MigrateReason.MR_SYSCALL,
                 kswapd: bool = False):
        self.m = m
        self.node = node
        # None: not a migrate_pages() call (a CPU fault bringing device pages back): no event, no reason counts.
        self.reason = reason
        self.kswapd = kswapd  # a demotion from kswapd's reclaim (pgdemote_kswapd), else from direct reclaim
        # alloc_demote_folio: the target first, then the other nodes of lower tiers (never a higher one)
        self.fallback_nodes = demotion_fallback(m, node, entries) if reason == MigrateReason.MR_DEMOTION else ()
        self.requested_mode = mode
        self.mode = _base_mode(mode)
        self.engine = engine
        self.options = options
        self.e = entries
        self.stats = MigrateStats()
        self.phase_ns = dict.fromkeys(PHASES, 0)
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
        self.one_object = m.object_or_none(entries.oid) \
            if batch_loops.HAVE_NUMBA and batch_loops.USE_BATCH_LOOPS and entries.oid >= 0 else None
        self.charges = BatchCharges.start(m, entries, self.stats)  # None unless the machine has a cost model

    # -- migrate_pages(): batches, one at a time ---------------------------------------------------------------
    def migrate_pages(self, positions: np.ndarray) -> None:
        """Cut the entries into batches and run each; split pieces after their batch; retries per mode."""
        steps = self.e.steps(positions, self.options.batch_pages, self.options.batches_per_step)
        depth = self.options.pipeline_depth if self.engine is not None else 0
        if depth == 0:
            for step in steps:
                if self.enomem:
                    break
                moved = self.nr_moved_folios
                self._drive(self._first_pass(step))
                if self.nr_moved_folios - moved < step.size or self.e.has_pieces:
                    self._after_step(step)
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

    def _first_pass(self, step: np.ndarray) -> Iterator[None]:
        if self.mode == MigrateMode.ASYNC:
            return self.migrate_pages_batch(step, MigrateMode.ASYNC, NR_MAX_MIGRATE_PAGES_RETRY)
        return self.migrate_pages_batch(step, MigrateMode.ASYNC, NR_MAX_MIGRATE_ASYNC_RETRY)

    @staticmethod
    def _drive(gen: Iterator[None]) -> None:
        for _ in gen:
            pass

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
    def migrate_pages_batch(self, todo: np.ndarray, mode: MigrateMode, passes: int,
                            ends_call: bool = True) -> Iterator[None]:
        """One batch (or step) through its unmap and move loops; yields while its DMA copy runs.

        A base page without a frame stops the unmap loop; unless the batch is the pass over split pieces
        (``ends_call=False``, whose result the kernel ignores), it also ends the whole call.
        """
        e = self.e
        unmapped: list[np.ndarray] = []
        nr_unmap = 0
        self.batch_enomem = False
        self.batch_counts_folios = ends_call
        self.listed = None  # what an earlier batch's unmap pass listed and no submission took
        tried = freezes = 0  # folio lock attempts and reference freezes, for a cost model
        if self.charges is not None:
            self.charges.before_unmap(todo)
        for _ in range(passes):
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
        nr_move = 0
        for _ in range(passes):
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
        self.stats.nr_passes += max(nr_unmap, nr_move)
        if moving.size == 0:
            return
        t0 = time.perf_counter_ns()
        with self.m.changed:
            self._undo(moving)  # still busy after the last pass: -EAGAIN, remapped to the old folio
            self.m.changed.notify_all()
        self.phase_ns["undo"] += time.perf_counter_ns() - t0

    # -- the end ------------------------------------------------------------------------------------------------
    def finish(self, interrupted: bool) -> None:
        """Put back every source that did not migrate and free unused destinations; settle the counters.

        After an exception (an interrupt between phases, a failing copy) some entries may still be unmapped:
        they are restored first, so no page stays unmapped, locked or isolated.
        """
        m, e = self.m, self.e
        if not interrupted and not self.enomem and self.nr_moved_folios == e.size:
            with m.lock:  # every folio moved (a split one's pieces included): nothing to put back
                self._count_vmstat()
            return
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

    def _count_vmstat(self) -> None:
        """Add the call's counters to vmstat, once, at the end (as migrate_pages() does), with the reason's own
        counters, and record the call's ``mm_migrate_pages`` event (caller holds the lock)."""
        s, count = self.stats, self.m.count_event
        if self.reason is not None:
            self._count_reason()
            self.m.record_migration(MigrateEvent(s.nr_succeeded, s.nr_failed_pages, s.nr_thp_succeeded,
                                                 s.nr_thp_failed, s.nr_thp_split, s.nr_split,
                                                 self.requested_mode, self.reason))
        for name, value in (("pgmigrate_success", s.nr_succeeded), ("pgmigrate_fail", s.nr_failed_pages),
                            ("thp_migration_success", s.nr_thp_succeeded), ("thp_migration_fail", s.nr_thp_failed),
                            ("thp_migration_split", s.nr_thp_split), ("pgmigrate_no_copy", s.nr_no_copy),
                            ("pgmigrate_dma_fallback", s.nr_dma_fallback), ("migrate_tlb_flush", s.nr_tlb_flush)):
            if value:
                count(name, value)


    def _count_reason(self) -> None:
        """The counters a reason adds: ``numa_pages_migrated`` and ``pgpromote_success`` for NUMA balancing (a
        promotion is a move from a lower tier into the top tier, the first host node), ``pgdemote_kswapd`` or
        ``pgdemote_direct`` for a demotion, after the reclaimer that demoted (``reclaimer_offset()``)."""
        s, m = self.stats, self.m
        if not s.nr_succeeded:
            return
        if self.reason == MigrateReason.MR_NUMA_MISPLACED:
            m.count_event("numa_pages_migrated", s.nr_succeeded)
            top = m.host_node_ids[0]
            if self.node == top:
                e = self.e
                moved = np.flatnonzero(e.status == 0)
                below = moved[m.nodemap.node_of(e.src[moved]) != top]
                if below.size:
                    m.count_event("pgpromote_success", int(e.nr[below].sum()))
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
@dataclass(kw_only=True)
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


def run_migration(m: Machine, req: MigrationRequest) -> MigrateResult:
    """Migrate the isolated folios of ``req`` and build the result for the pages it names."""
    heads, pfns, status, t_thread, t_wall = req.heads, req.pfns, req.status, req.t_thread, req.t_wall
    options = MigrateOptions.coerce(req.options)
    t_run = time.perf_counter_ns()
    with m.lock:  # the folios' objects may be released by a concurrent munmap once the lock is dropped
        entries = Entries(m, heads, req.dst)
        where = entries.locate(pfns, status) if heads.size else None
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
                mig.finish(interrupted)
                entries.fill_status(status, where)
                mig.phase_ns["putback"] += time.perf_counter_ns() - t0
    s = mig.stats
    rc = ENOMEM if mig.enomem else mig.nr_failed_folios
    if rc and entries.all_migrated():
        rc = 0  # a split large folio counted as a failure, but all its pieces moved (03e5f82ea632)
    return MigrateResult(status=status, nr_succeeded=s.nr_succeeded, nr_failed=s.nr_failed_pages,
                         nr_thp_succeeded=s.nr_thp_succeeded, nr_thp_failed=s.nr_thp_failed,
                         nr_thp_split=s.nr_thp_split, phase_ns=mig.phase_ns,
                         thread_time_ns=time.thread_time_ns() - t_thread,
                         wall_ns=time.perf_counter_ns() - t_wall, stats=s, options=options, rc=rc,
                         modelled=None if mig.charges is None else mig.charges.clock.result())


def check_reason(reason: Any) -> MigrateReason:
    """``reason`` as a :class:`~dmamig.flags.MigrateReason`; an error naming the argument otherwise."""
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
    no_copy = bool(mode & MigrateMode.NO_COPY) and engine is None  # with an engine, the engine copies
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
