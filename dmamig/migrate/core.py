"""The migration core: ``migrate_pages`` as a batch pipeline (unmap the batch, one flush, move the batch).

Return-code rules, as in mm/migrate.c:
- ``0``: migrated, counted in ``pgmigrate_success`` (``thp_migration_success`` for a large folio);
- ``-EAGAIN`` (busy page lock in ASYNC, unexpected extra reference): retried on the next pass; after the last
  pass it is final and counted failed;
- ``-ENOMEM`` (no destination frame): a large folio is split and its base pages migrated instead; a base page
  fails for good;
- anything else (``-EBUSY`` for writeback in ASYNC/SYNC_LIGHT, ``-EIO`` for a failed DMA copy) is permanent,
  never retried within a pass loop. Sync modes retry every failed folio but ``-ENOMEM``/``-EIO`` alone, in the
  caller's mode, after the batched ASYNC passes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._arrays import all_distinct, distinct, first_occurrences
from ..errors import DmaError, InvalidArgument
from ..flags import EAGAIN, EBUSY, EIO, ENOENT, ENOMEM, MigrateMode, PageFlag
from ..vma import install_migration_entries, remove_migration_entries
from .options import NR_MAX_BATCHED_MIGRATION, MigrateOptions
from .state import migrate_folio

if TYPE_CHECKING:
    from ..dma import DmaEngine, Fence
    from ..machine import Machine

__all__ = [
    "NR_MAX_BATCHED_MIGRATION",
    "NR_MAX_MIGRATE_ASYNC_RETRY",
    "NR_MAX_MIGRATE_PAGES_RETRY",
    "NR_MAX_MIGRATE_SYNC_RETRY",
    "MigrateResult",
    "MigrateStats",
    "check_mode",
    "collect_folios",
    "isolate_folios",
    "migrate_pfns",
    "run_migration",
]

#: Passes over a batch in all.
NR_MAX_MIGRATE_PAGES_RETRY = 10
#: Sync modes first try the whole batch in ASYNC mode this many passes...
NR_MAX_MIGRATE_ASYNC_RETRY = 3
#: ...then each folio that failed alone, in the caller's mode, this many passes.
NR_MAX_MIGRATE_SYNC_RETRY = NR_MAX_MIGRATE_PAGES_RETRY - NR_MAX_MIGRATE_ASYNC_RETRY

# Internal entry states (positive, so they never collide with -errno).
_PENDING = 1  # still to be tried: the kernel's -EAGAIN between passes
_SPLIT = 2  # a large folio split into base-page entries of its own

_LOCKED = PageFlag.LOCKED
_MODE_MASK = MigrateMode.ASYNC | MigrateMode.SYNC_LIGHT | MigrateMode.SYNC
PHASES = ("unmap", "copy", "dma_wait", "move", "undo")


@dataclass
class MigrateStats:
    """Counters of one migrate call (``struct migrate_pages_stats``)."""

    nr_succeeded: int = 0
    nr_failed_pages: int = 0
    nr_thp_succeeded: int = 0
    nr_thp_failed: int = 0
    nr_thp_split: int = 0
    nr_no_copy: int = 0
    nr_tlb_flush: int = 0
    nr_passes: int = 0


@dataclass
class MigrateResult:
    """What a migration did: per-page status and counters, in base pages as the kernel counts.

    Attributes
    ----------
    status : numpy.ndarray
        One int32 per requested base page: ``0`` (migrated or already on the node) or ``-errno``:
        ``-EAGAIN`` (busy or pinned), ``-EBUSY`` (writeback, or not migratable), ``-ENOMEM`` (target full),
        ``-EIO`` (DMA copy failed), ``-ENOENT`` (no page there).
    nr_succeeded, nr_failed : int
        Base pages migrated, and base pages the core tried and could not migrate.
    nr_thp_succeeded, nr_thp_failed, nr_thp_split : int
        Large folios migrated whole, failed, and split to be migrated as base pages.
    phase_ns : dict
        Wall nanoseconds on the migrating thread per phase: unmap, copy, dma_wait, move, undo.
    thread_time_ns, wall_ns : int
        CPU time of the migrating thread and wall time of the whole call.
    options : MigrateOptions
        The batching the call ran with (the kernel's unless an experiment asked otherwise).
    """

    status: np.ndarray
    nr_succeeded: int = 0
    nr_failed: int = 0
    nr_thp_succeeded: int = 0
    nr_thp_failed: int = 0
    nr_thp_split: int = 0
    phase_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    thread_time_ns: int = 0
    wall_ns: int = 0
    stats: MigrateStats = field(default_factory=MigrateStats)
    options: MigrateOptions = field(default_factory=MigrateOptions)

    @property
    def ok(self) -> bool:
        """True when every requested page ended on the target node."""
        return bool((self.status == 0).all())


def check_mode(mode: Any, allow_no_copy: bool) -> MigrateMode:
    """Validate a MigrateMode: exactly one of ASYNC, SYNC_LIGHT, SYNC, plus NO_COPY where allowed."""
    if not isinstance(mode, MigrateMode):
        raise InvalidArgument(f"mode must be a MigrateMode (ASYNC, SYNC_LIGHT or SYNC), got {mode!r}")
    base = mode & _MODE_MASK
    if base not in (MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC):
        raise InvalidArgument(f"mode must hold exactly one of ASYNC, SYNC_LIGHT, SYNC; got {mode!r}")
    if mode & MigrateMode.NO_COPY and not allow_no_copy:
        raise InvalidArgument("NO_COPY needs destinations whose content is already copied: pass engine=m.dma "
                              "here, or use m.migrate_pages(..., dst_pfns=...)")
    return mode


class _Migration:
    """One ``migrate_pages()`` call over isolated folios: entries, passes, statistics."""

    def __init__(self, m: Machine, node: int, mode: MigrateMode, engine: DmaEngine | None,
                 options: MigrateOptions):
        self.m = m
        self.options = options
        self.node = node
        self.mode = mode & _MODE_MASK
        self.engine = engine
        self.stats = MigrateStats()
        self.phase_ns = dict.fromkeys(PHASES, 0)
        self.src = np.empty(0, dtype=np.int64)
        self.dst = np.empty(0, dtype=np.int64)
        self.status = np.empty(0, dtype=np.int32)
        self.given = np.empty(0, dtype=bool)  # destination supplied (and pre-copied) by the caller
        self.fresh = np.empty(0, dtype=bool)  # destination content equals the source right now
        self.nr = np.empty(0, dtype=np.int64)  # base pages of each entry's folio
        self.expected = np.empty(0, dtype=np.int64)  # folio_expected_refs() of each entry
        self.batch_of = np.empty(0, dtype=np.int64)  # the batch each entry belongs to
        self.unmapped = np.empty(0, dtype=bool)  # source locked and behind migration entries right now

    # -- entries -------------------------------------------------------------------------------------------
    def add(self, heads: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
        """Append folios (already isolated); return their entry positions."""
        n = heads.size
        start = self.src.size
        self.src = np.concatenate([self.src, heads])
        self.dst = np.concatenate([self.dst, np.full(n, -1, np.int64) if dst is None else dst])
        self.status = np.concatenate([self.status, np.full(n, _PENDING, np.int32)])
        given = np.full(n, dst is not None)
        self.given = np.concatenate([self.given, given])
        self.fresh = np.concatenate([self.fresh, given.copy()])
        nr = self.m.pages.nr_pages(heads)
        self.nr = np.concatenate([self.nr, nr])
        # folio_expected_refs(): the isolation reference, plus the page cache's for a shared-memory folio.
        self.expected = np.concatenate([self.expected, 1 + np.where(self._shared(heads), nr, 0)])
        self.batch_of = np.concatenate([self.batch_of, np.full(n, -1, np.int64)])
        self.unmapped = np.concatenate([self.unmapped, np.zeros(n, dtype=bool)])
        return np.arange(start, start + n)

    def _steps(self, positions: np.ndarray) -> list[np.ndarray]:
        """Cut entries into batches of NR_MAX_BATCHED_MIGRATION base pages, and batches into steps."""
        nr = self.nr[positions]
        batch_id = (np.cumsum(nr) - nr) // self.options.batch_pages
        self.batch_of[positions] = batch_id
        step_id = batch_id // self.options.batches_per_step
        cuts = np.flatnonzero(np.diff(step_id)) + 1
        return np.split(positions, cuts)

    # -- the driver ----------------------------------------------------------------------------------------
    def run(self, positions: np.ndarray) -> None:
        """Migrate the entries at ``positions`` with the retry policy of the mode."""
        steps = self._steps(positions)
        if self.mode == MigrateMode.ASYNC:
            self._run_steps(steps, MigrateMode.ASYNC, NR_MAX_MIGRATE_PAGES_RETRY)
        else:
            self._run_steps(steps, MigrateMode.ASYNC, NR_MAX_MIGRATE_ASYNC_RETRY)
            # Every folio that failed but for lack of memory or a DMA error is tried again alone, in the
            # caller's mode: now it may block on the page lock and on writeback.
            all_pos = np.arange(self.src.size)
            retry = all_pos[(self.status < 0) & (self.status != ENOMEM) & (self.status != EIO)
                            | (self.status == _PENDING)]
            self.status[retry] = _PENDING
            for pos in retry.tolist():
                self._run_steps([np.array([pos])], self.mode, NR_MAX_MIGRATE_SYNC_RETRY)
        self.status[self.status == _PENDING] = EAGAIN

    def _run_steps(self, steps: list[np.ndarray], mode: MigrateMode, passes: int) -> None:
        # The kernel's order is one step at a time: unmap, copy or wait for the DMA copy, move. The pipeline
        # (an experiment setting) lets that many steps' DMA copies run while the next step is unmapped; a
        # blocking pass never pipelines, so the core never sleeps on a lock while holding other page locks.
        depth = self.options.pipeline_depth if self.engine is not None and mode == MigrateMode.ASYNC else 0
        queue: deque[Iterator[None]] = deque()
        for b in steps:
            gen = self._step(b, mode, passes)
            if next(gen, StopIteration) is not StopIteration:
                queue.append(gen)
            while len(queue) > depth:
                self._advance(queue)
        while queue:
            self._advance(queue)

    @staticmethod
    def _advance(queue: deque[Iterator[None]]) -> None:
        gen = queue.popleft()
        if next(gen, StopIteration) is not StopIteration:
            queue.append(gen)

    def _step(self, positions: np.ndarray, mode: MigrateMode, passes: int) -> Iterator[None]:
        """One step of batches through their passes; yields while its DMA copy runs."""
        for _ in range(passes):
            todo = positions[self.status[positions] == _PENDING]
            if todo.size == 0:
                return
            self.stats.nr_passes += 1
            unmapped, added = self._unmap(todo, mode)
            if added.size:
                positions = np.concatenate([positions, added])
            fence = self._submit(unmapped)
            yield
            self._move(unmapped, fence)

    # -- phase 1: unmap --------------------------------------------------------------------------------------
    def _unmap(self, todo: np.ndarray, mode: MigrateMode) -> tuple[np.ndarray, np.ndarray]:
        """Get destinations, lock, check writeback and install migration entries; one TLB flush."""
        t0 = time.perf_counter_ns()
        m = self.m
        with m.changed:
            added = self._get_new_folios(todo)
            todo = np.concatenate([todo, added])
            todo = todo[self.dst[todo] >= 0]
            todo = self._lock_folios(todo, mode)
            todo = self._check_writeback(todo, mode)
            if todo.size:
                install_migration_entries(m, m.pages.expand(self.src[todo]))
                self.unmapped[todo] = True
                # try_to_unmap_flush(): one flush per batch, after the whole batch is unmapped.
                flushes = len(distinct(self.batch_of[todo])) if todo.size < 4096 else \
                    int(np.count_nonzero(np.bincount(self.batch_of[todo])))
                self.stats.nr_tlb_flush += flushes
                m.count_event("migrate_tlb_flush", flushes)
        self.phase_ns["unmap"] += time.perf_counter_ns() - t0
        return todo, added

    def _get_new_folios(self, todo: np.ndarray) -> np.ndarray:
        """Allocate destinations on the target node; split large folios that get none. Returns split entries."""
        m, pages = self.m, self.m.pages
        need = todo[self.dst[todo] < 0]
        orders = pages.order[self.src[need]]
        added = []
        for order in distinct(orders):
            pos = need[orders == order]
            heads = m.alloc_folios(self.node, pos.size, order)
            self.dst[pos[: heads.size]] = heads
            short = pos[heads.size:]
            if order == 0:
                self.status[short] = ENOMEM
                continue
            for p in short.tolist():
                base = self._split(p)
                if base is None:
                    self.status[p] = ENOMEM
                    continue
                added.append(base)
        if not added:
            return np.empty(0, dtype=np.int64)
        added_pos = np.concatenate(added)
        got = m.alloc_folios(self.node, added_pos.size, 0)
        self.dst[added_pos[: got.size]] = got
        self.status[added_pos[got.size:]] = ENOMEM
        return added_pos

    def _split(self, pos: int) -> np.ndarray | None:
        """Split the large folio of entry ``pos`` into base pages, each isolated; None if it is pinned."""
        m, pages = self.m, self.m.pages
        head = int(self.src[pos])
        nr = 1 << int(pages.order[head])
        pfns = head + np.arange(nr)
        shared = self._shared(np.array([head]))[0]
        expected = 1 + int(pages.mapcount[pfns].sum()) + (nr if shared else 0)
        if pages.refcount[head] != expected or pages.test(head, _LOCKED):
            return None  # split_folio() refuses a folio with extra references or a busy lock
        pages.split(head, page_cache=bool(shared))
        # The isolation reference stayed on the head; every other base page gets its own.
        pages.refcount[pfns[1:]] += 1
        self.status[pos] = _SPLIT
        self.stats.nr_thp_split += 1
        m.count_event("thp_migration_split")
        added = self.add(pfns)
        self.batch_of[added] = self.batch_of[pos]
        return added

    def _lock_folios(self, todo: np.ndarray, mode: MigrateMode) -> np.ndarray:
        """Take each source folio's lock: ASYNC only tries (busy -> -EAGAIN, retried); sync modes wait."""
        m, pages = self.m, self.m.pages
        busy = pages.test(self.src[todo], _LOCKED)
        if busy.any():
            if mode == MigrateMode.ASYNC:
                self._release_dst(todo[busy])  # stays _PENDING: -EAGAIN, retried next pass
                todo = todo[~busy]
            else:
                for p in todo[busy].tolist():
                    head = int(self.src[p])
                    if mode == MigrateMode.SYNC_LIGHT and not pages.test(head, PageFlag.UPTODATE):
                        self._release_dst(np.array([p]))
                        continue
                    while pages.test(head, _LOCKED):
                        m.changed.wait()
                todo = todo[(self.dst[todo] >= 0) | self.given[todo]]
                todo = todo[~pages.test(self.src[todo], _LOCKED)]
        pages.set(self.src[todo], _LOCKED)
        return todo

    def _check_writeback(self, todo: np.ndarray, mode: MigrateMode) -> np.ndarray:
        """Folios under writeback: -EBUSY unless SYNC, which waits for the writeback to end."""
        m, pages = self.m, self.m.pages
        wb = pages.test(self.src[todo], PageFlag.WRITEBACK)
        if not wb.any():
            return todo
        if mode != MigrateMode.SYNC:
            bad = todo[wb]
            pages.clear(self.src[bad], _LOCKED)
            self._release_dst(bad)
            self.status[bad] = EBUSY
            m.changed.notify_all()
            return todo[~wb]
        for p in todo[wb].tolist():
            while pages.test(int(self.src[p]), PageFlag.WRITEBACK):
                m.changed.wait()
        return todo

    def _release_dst(self, pos: np.ndarray) -> None:
        """Free the destinations the core allocated for ``pos``; caller-supplied ones are kept, now stale."""
        own = pos[~self.given[pos] & (self.dst[pos] >= 0)]
        self.m.free_folios(self.dst[own])
        self.dst[own] = -1
        self.fresh[pos[self.given[pos]]] = False

    # -- the DMA submission ---------------------------------------------------------------------------------
    def _submit(self, unmapped: np.ndarray) -> Fence | None:
        """No-copy with an engine: hand the whole batch's copies to the DMA engine while we go on."""
        if self.engine is None or unmapped.size == 0:
            return None
        need = unmapped[~self.fresh[unmapped]]
        if need.size == 0:
            return None
        pages = self.m.pages
        return self.engine.copy(pages.expand(self.src[need]), pages.expand(self.dst[need]))

    # -- phase 2: move ---------------------------------------------------------------------------------------
    def _shared(self, heads: np.ndarray) -> np.ndarray:
        m = self.m
        mapping = m.pages.mapping[heads]
        out = np.zeros(heads.size, dtype=bool)
        for oid in distinct(mapping[mapping >= 0]):
            out[mapping == oid] = m.object(oid).shared
        return out

    def _move(self, unmapped: np.ndarray, fence: Fence | None) -> None:
        """Check references, copy (or wait for the DMA copy), move mapping and state, remap; undo failures."""
        if unmapped.size == 0:
            return
        m, pages = self.m, self.m.pages
        failed: list[tuple[np.ndarray, int]] = []
        t0 = time.perf_counter_ns()
        with m.lock:
            busy = pages.refcount[self.src[unmapped]] != self.expected[unmapped]
        if busy.any():
            failed.append((unmapped[busy], _PENDING))
            unmapped = unmapped[~busy]
        self.phase_ns["move"] += time.perf_counter_ns() - t0

        if fence is not None:
            t0 = time.perf_counter_ns()
            try:
                fence.wait()
            except DmaError:
                failed.append((unmapped, EIO))
                unmapped = unmapped[:0]
            self.phase_ns["dma_wait"] += time.perf_counter_ns() - t0
        else:
            stale = unmapped[~self.fresh[unmapped]]
            if stale.size:
                # The copy path (or a retried NO_COPY folio whose caller-made copy is stale): the migrating
                # thread copies, outside the metadata lock; the locked, unmapped source cannot change.
                t0 = time.perf_counter_ns()
                m.copy_folios(self.src[stale], self.dst[stale])
                self.phase_ns["copy"] += time.perf_counter_ns() - t0
        no_copy = self.engine is not None or self.fresh[unmapped]

        t0 = time.perf_counter_ns()
        with m.changed:
            # Freeze: references may have been taken while we copied.
            busy = pages.refcount[self.src[unmapped]] != self.expected[unmapped]
            if busy.any():
                failed.append((unmapped[busy], _PENDING))
                no_copy = no_copy[~busy] if isinstance(no_copy, np.ndarray) else no_copy
                unmapped = unmapped[~busy]
            self._move_to_new_folios(unmapped, no_copy)
            self.phase_ns["move"] += time.perf_counter_ns() - t0
            t0 = time.perf_counter_ns()
            for pos, rc in failed:
                self._undo(pos, rc)
            m.changed.notify_all()
        self.phase_ns["undo"] += time.perf_counter_ns() - t0

    def _move_to_new_folios(self, pos: np.ndarray, no_copy: np.ndarray | bool) -> None:
        """Move mapping and state, point migration entries at the new folios, unlock, free the old ones."""
        if pos.size == 0:
            return
        m, pages = self.m, self.m.pages
        old, new = self.src[pos], self.dst[pos]
        self.unmapped[pos] = False
        migrate_folio(m, old, new, self.nr[pos])
        remove_migration_entries(m, pages.expand(old), pages.expand(new))
        # putback: the new folio joins the LRU and drops the isolation reference it inherited; the old one
        # (still locked and isolated: nobody can reach it) goes back to the allocator.
        pages.flags[new] = (pages.flags[new] & np.uint32(~np.uint32(PageFlag.ISOLATED | _LOCKED))) \
            | np.uint32(PageFlag.LRU)
        m.free_folios(old)
        m.put_folios(new, unique=True)
        self.status[pos] = 0
        nr = self.nr[pos]
        large = nr > 1
        thp = int(np.count_nonzero(large))
        pages_moved = int(nr.sum()) if thp else pos.size
        self.stats.nr_succeeded += pages_moved
        self.stats.nr_thp_succeeded += thp
        if isinstance(no_copy, np.ndarray):
            nc = int(nr[no_copy].sum())
        else:
            nc = pages_moved if no_copy else 0
        self.stats.nr_no_copy += nc
        m.count_event("pgmigrate_success", pages_moved)
        m.count_event("thp_migration_success", thp)
        m.count_event("pgmigrate_no_copy", nc)

    def _undo(self, pos: np.ndarray, rc: int) -> None:
        """Restore the source mappings, unlock, and give back (or mark stale) the destinations."""
        if pos.size == 0:
            return
        m, pages = self.m, self.m.pages
        srcp = pages.expand(self.src[pos])
        remove_migration_entries(m, srcp, srcp)
        self.unmapped[pos] = False
        pages.clear(self.src[pos], _LOCKED)
        self._release_dst(pos)
        self.status[pos] = rc

    # -- the end ---------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Put back the sources that did not migrate, free unused caller destinations, count failures."""
        m, pages = self.m, self.m.pages
        with m.changed:
            # After an exception (a failing copy, an interrupt) some entries may still be unmapped or never
            # tried: restore and put them back too, so that no page stays unmapped, locked or isolated.
            if self.unmapped.any():
                if self.engine is not None:
                    self.engine.synchronize()  # no copy may still write a destination we free
                self._undo(np.flatnonzero(self.unmapped), EIO)
            self.status[self.status == _PENDING] = EAGAIN
            failed = np.flatnonzero(self.status < 0)
            heads = self.src[failed]
            nr = self.nr[failed]
            pages.clear(heads, PageFlag.ISOLATED)
            pages.set(heads, PageFlag.LRU)
            m.put_folios(heads)
            spare = failed[self.given[failed] & (self.dst[failed] >= 0)]
            m.free_folios(self.dst[spare])
            self.dst[spare] = -1
            self.stats.nr_failed_pages += int(nr.sum())
            self.stats.nr_thp_failed += int((nr > 1).sum())
            m.count_event("pgmigrate_fail", int(nr.sum()))
            m.count_event("thp_migration_fail", int((nr > 1).sum()))
            m.changed.notify_all()

    def status_of(self, pfns: np.ndarray) -> np.ndarray:
        """Status of each base pfn that was a source page of this migration; -ENOENT for any other."""
        live = self.status != _SPLIT
        nr = self.nr[live]
        table = np.full(self.m.pages.nr_pfns, ENOENT, dtype=np.int32)
        if (nr == 1).all():
            table[self.src[live]] = self.status[live]
        else:
            first = np.concatenate(([0], np.cumsum(nr)[:-1]))
            base = np.repeat(self.src[live] - first, nr) + np.arange(int(nr.sum()))
            table[base] = np.repeat(self.status[live], nr)
        return table[pfns]


# -- entry points ------------------------------------------------------------------------------------------------
def isolate_folios(m: Machine, heads: np.ndarray) -> np.ndarray:
    """Take folios off their LRU list for migration (caller holds the lock); return 0 or -errno per folio.

    A free page gives ``-ENOENT``; a page off the LRU (driver-owned, or already isolated by another
    migration) gives ``-EBUSY``. An isolated folio holds one extra reference until it is put back.
    """
    pages = m.pages
    rc = np.zeros(heads.size, dtype=np.int32)
    free = pages.refcount[heads] <= 0
    rc[free] = ENOENT
    off_lru = ~free & (~pages.test(heads, PageFlag.LRU) | pages.test(heads, PageFlag.ISOLATED))
    rc[off_lru] = EBUSY
    ok = heads[rc == 0]
    pages.set(ok, PageFlag.ISOLATED)
    pages.clear(ok, PageFlag.LRU)
    pages.refcount[ok] += 1
    return rc


def collect_folios(m: Machine, pfns: np.ndarray, node: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick and isolate the folios of ``pfns`` (``-1`` = no page) that must move to ``node``.

    Caller holds the lock. Returns ``(status, heads)``: a provisional per-page status (``0`` for pages already
    on ``node``, ``-errno`` for pages that cannot be taken, ``_PENDING`` for the rest) and the isolated heads.
    """
    status = np.full(pfns.size, ENOENT, dtype=np.int32)
    present = pfns >= 0
    if present.all():
        heads_all = m.pages.head[pfns]
    else:
        heads_all = np.where(present, m.pages.head[np.where(present, pfns, 0)], -1)
    on_node = present & (m.nodemap.node_of(np.maximum(heads_all, 0)) == node)
    status[on_node] = 0
    want = present & ~on_node
    wanted = heads_all[want]
    # Each folio once, in address order: runs stay contiguous for the DMA planner.
    heads = wanted[first_occurrences(wanted, m.pages.nr_pfns)]
    rc = isolate_folios(m, heads)
    if want.any():
        rc_of = np.zeros(m.pages.nr_pfns, dtype=np.int32)
        rc_of[heads] = rc
        status[want] = rc_of[wanted]
    status[want & (status == 0)] = _PENDING
    return status, heads[rc == 0]


def run_migration(m: Machine, heads: np.ndarray, node: int, mode: MigrateMode, engine: DmaEngine | None,
                  dst: np.ndarray | None, pfns: np.ndarray, status: np.ndarray, t_thread: int,
                  t_wall: int, options: MigrateOptions | None = None) -> MigrateResult:
    """Migrate isolated ``heads`` and build the result for the requested ``pfns``."""
    options = MigrateOptions.coerce(options)
    mig = _Migration(m, node, mode, engine, options)
    if heads.size:
        positions = mig.add(heads, dst)
        try:
            mig.run(positions)
        finally:
            mig.finish()
        pending = status == _PENDING
        status[pending] = mig.status_of(pfns[pending])
    s = mig.stats
    return MigrateResult(status=status, nr_succeeded=s.nr_succeeded, nr_failed=s.nr_failed_pages,
                         nr_thp_succeeded=s.nr_thp_succeeded, nr_thp_failed=s.nr_thp_failed,
                         nr_thp_split=s.nr_thp_split, phase_ns=mig.phase_ns,
                         thread_time_ns=time.thread_time_ns() - t_thread,
                         wall_ns=time.perf_counter_ns() - t_wall, stats=s, options=options)


def migrate_pfns(m: Machine, pfns: Any, node: int, mode: MigrateMode, dst_pfns: Any = None,
                 options: MigrateOptions | None = None) -> MigrateResult:
    """``Machine.migrate_pages``: validate, isolate, migrate, put back."""
    from .._validate import as_pfn_array, check_node

    t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    pfns = as_pfn_array(m, "pfns", pfns)
    node = check_node(m, "node", node)
    mode = check_mode(mode, allow_no_copy=True)
    options = MigrateOptions.coerce(options)
    no_copy = bool(mode & MigrateMode.NO_COPY)
    if no_copy != (dst_pfns is not None):
        raise InvalidArgument("NO_COPY and dst_pfns go together: NO_COPY moves state onto destinations the "
                              "caller already copied (dst_pfns from m.alloc_pages); without NO_COPY the core "
                              "allocates destinations itself")
    with m.changed:
        dst = None
        if no_copy:
            dst = _check_dst(m, pfns, as_pfn_array(m, "dst_pfns", dst_pfns), node)
        status, heads = collect_folios(m, pfns, node)
        if dst is not None:
            taken = status == _PENDING
            m.free_folios(dst[~taken])  # destinations of folios that will not move are ours to free
            dst = dst[taken]
            heads = pfns[taken]
    return run_migration(m, heads, node, mode, None, dst, pfns, status, t_thread, t_wall, options)


def _check_dst(m: Machine, pfns: np.ndarray, dst: np.ndarray, node: int) -> np.ndarray:
    pages = m.pages
    if dst.size != pfns.size:
        raise InvalidArgument(f"dst_pfns must pair one destination with each pfn: {pfns.size} pfns, "
                              f"{dst.size} dst_pfns")
    if (pages.head[pfns] != pfns).any() or not all_distinct(pfns, pages.nr_pfns):
        raise InvalidArgument("with dst_pfns, pfns must be distinct folio heads (one entry per folio)")
    if not all_distinct(dst, pages.nr_pfns):
        raise InvalidArgument("dst_pfns must be distinct")
    owned = (pages.head[dst] == dst) & (pages.refcount[dst] == 1) & (pages.mapping[dst] < 0) \
        & ~pages.test(dst, PageFlag.LRU) & (pages.mapcount[dst] == 0)
    if not owned.all():
        raise InvalidArgument(f"dst_pfns {dst[~owned][:8].tolist()} are not folios from m.alloc_pages")
    if (m.nodemap.node_of(dst) != node).any():
        raise InvalidArgument(f"dst_pfns must all be on the target node {node}")
    if (pages.order[dst] != pages.order[pfns]).any():
        raise InvalidArgument("each destination folio must have the order of its source folio")
    return dst
