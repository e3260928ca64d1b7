"""One compiled call per phase of a batch whose folios are mapped through a single VMA (the usual case).

``unmap_one_vma`` is the ASYNC unmap pass (``get_new_folio`` where one node's allocator can serve every
destination, trylock, writeback check, ``try_to_migrate``); ``move_one_vma`` is a move pass (the reference-count
freeze, ``folio_migrate_mapping`` + ``folio_migrate_flags``, the object's slots, ``remove_migration_ptes`` onto
the new folios, ``migrate_folio_done``). Each strings together the per-phase loops of :mod:`dmamig.page_loops`
inside one nogil call, so a batch costs a fixed handful of Python-level calls whatever it holds
(``stale_base_pfns`` lists the DMA submission's pages in between). In a long migration ``fused_batch`` makes a
batch one call: the move pass of the batch before, then this one's unmap pass and the start of its copy (the
ring submission, or the reference check before the migrating thread's copy). A call's own set-up and end are
compiled too: ``init_entries`` sets up its entries, ``cut_batches`` cuts them into batches, ``fill_status`` gives
the pages their status (``fill_moved_status`` where every folio moved whole). The general path in ``core.py``
(any number of VMAs, through ``vma.py`` and ``state.py``) does the same work phase by phase and stays the
reference: the tests run random migrations both ways and compare every page, page table and object slot.
"""

from __future__ import annotations

import numpy as np

from .. import page_loops
from ..array_table import ArrayTable, TableLayout
from ..backends.cpu.spin import SPIN_ERROR
from ..dma.ring import RING_ERROR
from ..flags import MIGRATION_ENTRY_KEPT, PageFlag, PteFlag
from ..nodes import PAGEBLOCK_ORDER

__all__ = ["ACC_LARGE", "ACC_LAST_MOVE", "ACC_MOVED", "ACC_MOVES", "ACC_MOVE_NS", "ACC_NO_COPY", "ACC_PAGES",
           "ACC_SUBMIT_NS", "ACC_THP", "ACC_UNMAPS", "ACC_UNMAP_NS", "ACC_WORDS", "FUSED_ERROR", "FUSED_LAYOUT",
           "FUSED_MOVED", "FUSED_MOVE_LEFT", "FUSED_NO_FRAMES", "FUSED_SUBMITTED", "FUSED_TO_COPY", "FUSED_UNMAPPED",
           "FUSED_UNMAP_LEFT", "HAVE_NUMBA", "ROW_BATCH_OF", "ROW_COUNTED", "ROW_DST", "ROW_EXPECTED", "ROW_FRESH",
           "ROW_GIVEN", "ROW_NR", "ROW_ORDER", "ROW_SPLIT_FIRST", "ROW_UNMAPPED", "T_BOOLS", "T_INTS", "T_OBJ_PFNS",
           "T_POSITIONS", "T_PTE_FLAGS", "T_PTE_PFN", "T_SBLOCK_FREE", "T_SFREE", "T_SRC", "T_STATE", "T_STATUS",
           "T_TBLOCK_FREE", "T_TFREE", "T_WORK", "USE_BATCH_LOOPS", "alloc_one_order", "cut_batches",
           "fill_moved_status", "fill_status", "fused_batch", "fused_table", "fused_work", "init_entries",
           "move_one_vma", "set_fused_vma", "stale_base_pfns", "to_copy", "unmap_one_vma", "work_views"]

HAVE_NUMBA = page_loops.HAVE_NUMBA
#: Run a batch mapped through one VMA as one compiled call per phase; the phase-by-phase path of core.py is the
#: reference, and the only path for folios mapped through several VMAs.
USE_BATCH_LOOPS = True

# Rows of a call's entry blocks (Entries.ints and Entries.bools), which a compiled call takes whole.
ROW_ORDER, ROW_NR, ROW_EXPECTED, ROW_DST, ROW_BATCH_OF, ROW_SPLIT_FIRST = range(6)
ROW_GIVEN, ROW_FRESH, ROW_UNMAPPED, ROW_COUNTED = range(4)

_PRESENT = int(PteFlag.PRESENT)
# Page flags the loops set or test: constants of the compiled code, not arguments (each argument costs a call).
_LOCKED = np.uint32(PageFlag.LOCKED)
_WRITEBACK = np.uint32(PageFlag.WRITEBACK)
_HEAD = np.uint32(PageFlag.HEAD)
_LRU = np.uint32(PageFlag.LRU)
_SWAPCACHE = np.uint32(PageFlag.SWAPCACHE)
# migrate_folio_done: the new folio leaves isolation and its lock.
_PUTBACK_CLEAR = np.uint32(~np.uint32(PageFlag.ISOLATED | PageFlag.LOCKED))
# Order of a PMD-mapped THP (entries.HPAGE_PMD_ORDER): only such folios count in thp_migration_*.
_PMD_ORDER = PAGEBLOCK_ORDER
_MIGRATION = int(PteFlag.MIGRATION)
_KEPT = int(MIGRATION_ENTRY_KEPT)


def _entry_rows(ints, bools):
    """A call's entry columns from its two blocks (Entries.ints, Entries.bools), in ``ROW_*`` order: order, nr,
    expected, dst, batch_of, split_first, given, fresh, unmapped, counted."""
    return (ints[ROW_ORDER], ints[ROW_NR], ints[ROW_EXPECTED], ints[ROW_DST], ints[ROW_BATCH_OF],
            ints[ROW_SPLIT_FIRST], bools[ROW_GIVEN], bools[ROW_FRESH], bools[ROW_UNMAPPED], bools[ROW_COUNTED])


def _copy_current(s, d, n, write_seq):
    """Whether every base frame of the destination folio ``d`` was written after its source frame last was (over
    views indexed from 0, without a branch, so that it vectorises: see the note on indexing in
    :mod:`dmamig.page_loops`)."""
    src = write_seq[s:s + n]
    dst = write_seq[d:d + n]
    current = True
    for j in range(n):
        current &= dst[j] > src[j]
    return current


def _unmap_one_vma(pos, status, pending, src, ints, bools, state, oid, pgoff, npages, pte_pfn, pte_flags, free,
                   block_free, block, node_base, order, rc, listed):
    """The ASYNC unmap pass over entries ``pos`` (the call's entries as ``src``, ``status`` and the ``ints`` and
    ``bools`` blocks; every page's state as PageArray's ``state`` buffer): with ``order`` >= 0 first
    ``get_new_folio`` for the entries without a destination, as :func:`alloc_one_order` from the target node's
    allocator arrays (its pfns from ``node_base``); then lock each folio (busy: rc 1; writeback: rc -EBUSY, lock
    given back), install migration entries for the locked ones, mark them unmapped and check their caller
    destinations (fresh when written after the source last changed). Every entry of ``pos`` gets status
    ``pending`` first.

    Where ``listed`` is not empty (its two rows hold every base page of ``pos``), the base pfns of the unmapped
    folios without a current copy go there, source and destination, folio by folio: the DMA submission's pages,
    as :func:`stale_base_pfns` lists them.

    Returns ``(how many did not lock, frames taken, pages listed)``; ``(0, -1, 0)`` when the node could not serve
    every destination, and then nothing was done (the general allocation, which has rules for running short,
    goes first and this runs again with ``order`` -1).
    """
    _order, nr, _expected, dst, _batch, _split, given, fresh, unmapped, _counted = _entry_rows(ints, bools)
    mapping, index, _private, head, write_seq, _mark, flags, refcount, mapcount, _cpupid, _memcg, page_order = \
        page_fields(state)
    taken = 0
    if order >= 0:
        taken = alloc_one_order(pos, dst, free, block_free, block, node_base, order, _HEAD, flags, refcount,
                                page_order, head)
        if taken < 0:
            return 0, -1, 0
    for i in range(pos.size):
        status[pos[i]] = pending
    heads = np.empty(pos.size, dtype=np.int64)
    for i in range(pos.size):
        heads[i] = src[pos[i]]
    bad = trylock_folios(heads, flags, _LOCKED, _WRITEBACK, rc)
    for i in range(pos.size):
        if rc[i] != 0:
            continue
        p = pos[i]
        unmapped[p] = True
        if given[p]:
            fresh[p] = _copy_current(heads[i], dst[p], nr[p], write_seq)
    nlisted = 0
    if listed.shape[1]:
        done = pos
        if bad:
            done = np.empty(pos.size - bad, dtype=np.int64)
            k = 0
            for i in range(pos.size):
                if rc[i] == 0:
                    done[k] = pos[i]
                    k += 1
        nlisted = stale_base_pfns(done, src, dst, nr, fresh, listed[0], listed[1])
    # A large folio in order in the VMA's slots in one go; the base pfns of the others listed, then installed
    # page by page.
    total = 0
    for i in range(pos.size):
        if rc[i] == 0:
            total += nr[pos[i]]
    pfns = np.empty(total, dtype=np.int64)
    k = 0
    for i in range(pos.size):
        if rc[i] != 0:
            continue
        h = heads[i]
        n = nr[pos[i]]
        s0 = first_slot(mapping, index, h, n, oid, pgoff, npages) if n > 1 else -1
        if s0 >= 0:
            install_in_order(h, n, h, s0, mapcount, refcount, flags, pte_pfn, pte_flags)
            continue
        for j in range(n):
            pfns[k] = h + j
            k += 1
    install_entries(pfns[:k], mapping, index, head, mapcount, refcount, flags, oid, pgoff, npages, pte_pfn,
                    pte_flags)
    return bad, taken, nlisted


def _alloc_one_order(pos, dst, free, block_free, block, node_base, order, head_flag, flags, refcount, page_order,
                     head):
    """``get_new_folio`` for the entries of ``pos`` without a destination, all folios of ``order`` from one
    node's allocator arrays (its pfns start at ``node_base``): all of them or none. Returns the frames taken, or
    -1 when the node cannot serve them all (nothing taken: the caller takes the general path, where running short
    has its rules)."""
    need = 0
    for i in range(pos.size):
        if dst[pos[i]] < 0:
            need += 1
    if need == 0:
        return 0
    size = 1 << order
    out = np.empty(need, dtype=np.int64)
    if order == 0:
        got = alloc_frames0(free, block_free, block, need, out)
    else:
        got = alloc_frames_order(free, block_free, block, size, need, out)
    if got < need:
        for j in range(got):  # give back what was taken
            for k in range(size):
                free[out[j] + k] = True
            block_free[out[j] // block] += size
        return -1
    for j in range(need):
        out[j] += node_base
    prep_new_folios(out, order, head_flag, flags, refcount, page_order, head)
    j = 0
    for i in range(pos.size):
        p = pos[i]
        if dst[p] < 0:
            dst[p] = out[j]
            j += 1
    return need * size


def _init_entries(heads, state, node_table, untried, ints, status):
    """A migrate call's entries set up in one pass (``Entries``, whose numpy path is the reference): per folio
    of ``heads`` (pages in PageArray's ``state`` buffer) its order and size, one expected reference, no
    destination, batch 0, no split piece (the rows of ``ints``: the ``ROW_*`` constants) and status ``untried``.
    Returns (largest order, whether every folio has it, the one node of all heads or -1, lowest and highest
    ``mapping``, whether any folio is in the swap cache) so the caller can take the one-object, one-node,
    one-order paths."""
    mapping, _index, _private, _head, _ws, _mark, flags, _refcount, _mapcount, _cpupid, _memcg, page_order = \
        page_fields(state)
    top = 0
    low = 1 << 30
    node = -2
    lo = 1 << 62
    hi = -(1 << 62)
    swap = False
    for i in range(heads.size):
        h = heads[i]
        o = page_order[h]
        ints[ROW_ORDER, i] = o
        ints[ROW_NR, i] = 1 << o
        ints[ROW_EXPECTED, i] = 1
        ints[ROW_DST, i] = -1
        ints[ROW_BATCH_OF, i] = 0
        ints[ROW_SPLIT_FIRST, i] = -1
        status[i] = untried
        top = max(top, o)
        low = min(low, o)
        nd = node_table[h]
        if node == -2:
            node = nd
        elif nd != node:
            node = -1
        mp = mapping[h]
        lo = min(lo, mp)
        hi = max(hi, mp)
        if flags[h] & _SWAPCACHE:
            swap = True
    return top, low == top, node, lo, hi, swap


def _fill_status(status, pending, entry, pfns, entry_status, split_first, src, split):
    """``Entries.fill_status`` (its numpy lines are the reference): each page of ``status`` still ``pending``
    takes the status of its entry ``entry[i]``; a page of a split folio takes its own piece's."""
    for i in range(status.size):
        if status[i] != pending:
            continue
        e = entry[i]
        s = entry_status[e]
        if s == split:
            s = entry_status[split_first[e] + pfns[i] - src[e]]
        status[i] = s


def _fill_moved_status(status, pending):
    """``Entries.fill_status`` where every entry moved whole: each page still ``pending`` is 0 (its entry
    need not be looked up)."""
    for i in range(status.size):  # a select, not a branch: it vectorises
        status[i] = 0 if status[i] == pending else status[i]


def _cut_batches(nr, batch_pages, out):
    """``batch_ids`` (entries.py, whose numpy loop is the reference): a batch takes folios of ``nr`` base pages,
    in list order, until it holds ``batch_pages`` or more; the batch of each folio goes to ``out``."""
    b = 0
    held = 0
    for i in range(nr.size):
        out[i] = b
        held += nr[i]
        if held >= batch_pages:
            b += 1
            held = 0


def _stale_base_pfns(pos, src, dst, nr, fresh, out_src, out_dst):
    """Every base pfn of the source and the destination folio of each entry of ``pos`` without a current copy,
    folio by folio, into ``out_src`` and ``out_dst`` (a DMA submission's pages). Returns how many."""
    k = 0
    for i in range(pos.size):
        p = pos[i]
        if fresh[p]:
            continue
        s = src[p]
        d = dst[p]
        n = nr[p]
        to_src = out_src[k:k + n]
        to_dst = out_dst[k:k + n]
        for j in range(n):
            to_src[j] = s + j
            to_dst[j] = d + j
        k += n
    return k


def _to_copy(pos, src, expected, fresh, refcount, copy, keep, busy):
    """Before a move pass's copy, when some entry of ``pos`` has no current copy: the folios with an extra
    reference are busy (``folio_migrate_mapping``'s check comes before the copy, so a busy folio is not copied)
    and go to ``busy``, the others without a current copy to ``copy``; ``keep`` gets the entries that stay in
    the pass. Returns ``(copies, busy ones, kept)``; ``(0, 0, -1)`` when every entry has a current copy (then
    nothing is checked and ``pos`` stays whole)."""
    stale = False
    for i in range(pos.size):
        if not fresh[pos[i]]:
            stale = True
            break
    if not stale:
        return 0, 0, -1
    nc = 0
    nk = 0
    nb = 0
    for i in range(pos.size):
        p = pos[i]
        if refcount[src[p]] != expected[p]:
            busy[nb] = p
            nb += 1
            continue
        keep[nk] = p
        nk += 1
        if not fresh[p]:
            copy[nc] = p
            nc += 1
    return nc, nb, nk


def _move_pages(o, n, nr, mapping, index, mapcount, refcount, oid, obj_pfns, pgoff, npages, pte_pfn, pte_flags):
    """The base pages of one folio pair in one pass: each new page takes its old page's ``mapping`` and
    ``index`` (``folio_migrate_mapping``), the object's slot that held the old page holds the new one, and the
    VMA's migration entry of the old page maps the new one (``remove_migration_ptes``: a mapcount on the page, a
    reference on the new folio's head ``n``). The same work as ``move_object_slots``, the per-page half of
    ``move_folio_state`` and ``remove_entries`` of :mod:`dmamig.page_loops`, which pass over the pages three
    times (each reads the old page's slot)."""
    # The two folios' pages as views indexed from 0 (see the note on indexing in dmamig.page_loops).
    old_mapping = mapping[o:o + nr]
    old_index = index[o:o + nr]
    new_mapping = mapping[n:n + nr]
    new_index = index[n:n + nr]
    new_mapcount = mapcount[n:n + nr]
    refs = 0
    for j in range(nr):
        mp = old_mapping[j]
        ix = old_index[j]
        new_mapping[j] = mp
        new_index[j] = ix
        if mp != oid:
            continue
        p = o + j
        q = n + j
        if obj_pfns[ix] == p:
            obj_pfns[ix] = q
        s = ix - pgoff
        if s < 0 or s >= npages or pte_pfn[s] != p:
            continue
        f = pte_flags[s]
        if (f & _MIGRATION) == 0:
            continue
        pte_pfn[s] = q
        pte_flags[s] = (f & _KEPT) | _PRESENT
        new_mapcount[j] += 1
        refs += 1
    refcount[n] += refs


def _move_in_order(o, n, nr, s0, mapping, index, mapcount, refcount, oid, obj_pfns, pgoff, pte_pfn, pte_flags):
    """:func:`_move_pages` for an old folio whose pages are in order in the VMA's slots from ``s0`` (and in the
    object's from ``s0 + pgoff``; :func:`~dmamig.page_loops.first_slot`): the same steps, each a select instead
    of a branch, over views of the slots."""
    new_mapping = mapping[n:n + nr]
    new_index = index[n:n + nr]
    new_mapcount = mapcount[n:n + nr]
    obj_slots = obj_pfns[s0 + pgoff:s0 + pgoff + nr]
    slot_pfn = pte_pfn[s0:s0 + nr]
    slot_flags = pte_flags[s0:s0 + nr]
    refs = 0
    for j in range(nr):
        p = o + j
        q = n + j
        new_mapping[j] = oid
        new_index[j] = s0 + pgoff + j
        held = obj_slots[j]
        obj_slots[j] = q if held == p else held
        f = slot_flags[j]
        hit = (slot_pfn[j] == p) & ((f & _MIGRATION) != 0)
        slot_pfn[j] = q if hit else slot_pfn[j]
        slot_flags[j] = ((f & _KEPT) | _PRESENT) if hit else f
        new_mapcount[j] += hit
        refs += hit
    refcount[n] += refs


def _move_one_vma(pos, status, src, ints, bools, state, oid, obj_pfns, pgoff, npages, pte_pfn, pte_flags, rc, freed,
                  free, block_free, block, node_base):
    """Freeze-check, move and finish the folios of entries ``pos`` (the call's entries and every page's state
    as :func:`unmap_one_vma` takes them); rc 0 moved, 1 busy (retry). Moved entries get status 0 and leave the
    unmapped set.

    Busy is an extra reference, or a copy made before this pass that a write has since made stale (its
    ``fresh`` mark is dropped here, so the next pass copies again): see ``_Migration._drop_stale_copies`` in core.py.
    The old folios' frames, reset, go to ``freed[:n]``, ``n`` the base pages moved; where ``node_base`` >= 0
    (every old folio is on the node whose allocator arrays ``free``, ``block_free`` are given, its pfns from
    ``node_base``) they also go back to that allocator. Returns ``(n, PMD-sized folios moved, large folios moved,
    pages moved whose destination was already a copy, new folios that lost their last reference, busy entries,
    the index in freed of a frame already free or -1)``; a double free gives nothing back (the allocator's
    invariant).
    """
    order, nr, expected, dst, _batch, _split, _given, fresh, unmapped, _counted = _entry_rows(ints, bools)
    mapping, index, private, head, write_seq, _mark, flags, refcount, mapcount, last_cpupid, memcg, page_order = \
        page_fields(state)
    moved = 0
    total = 0
    for i in range(pos.size):
        p = pos[i]
        stale = False
        if fresh[p] and not _copy_current(src[p], dst[p], nr[p], write_seq):
            fresh[p] = False
            stale = True
        if refcount[src[p]] == expected[p] and not stale:
            rc[i] = 0
            moved += 1
            total += nr[p]
        else:
            rc[i] = 1
    thp = large = no_copy = 0
    if moved == 0:
        return 0, thp, large, no_copy, 0, pos.size, -1
    o = np.empty(moved, dtype=np.int64)
    n = np.empty(moved, dtype=np.int64)
    k = np.empty(moved, dtype=np.int64)
    j = 0
    for i in range(pos.size):
        if rc[i] != 0:
            continue
        p = pos[i]
        o[j] = src[p]
        n[j] = dst[p]
        k[j] = nr[p]
        j += 1
        status[p] = 0
        unmapped[p] = False
        if order[p] == _PMD_ORDER:
            thp += 1
        if nr[p] > 1:
            large += 1
        if fresh[p]:
            no_copy += nr[p]
    for i in range(moved):
        move_head_state(o[i], n[i], flags, refcount, private, last_cpupid, memcg)
        s0 = first_slot(mapping, index, o[i], k[i], oid, pgoff, npages) if k[i] > 1 else -1
        if s0 >= 0 and s0 + pgoff + k[i] <= obj_pfns.size:
            _move_in_order(o[i], n[i], k[i], s0, mapping, index, mapcount, refcount, oid, obj_pfns, pgoff, pte_pfn,
                           pte_flags)
        else:
            _move_pages(o[i], n[i], k[i], mapping, index, mapcount, refcount, oid, obj_pfns, pgoff, npages,
                        pte_pfn, pte_flags)
    dead = done_folios(o, n, k, _PUTBACK_CLEAR, _LRU, flags, refcount, mapcount, mapping, index, private,
                       last_cpupid, memcg, page_order, head, freed)
    bad = -1
    if node_base >= 0:
        if total == moved:  # base pages: frame by frame
            frames = np.empty(total, dtype=np.int64)
            for i in range(total):
                frames[i] = freed[i] - node_base
            bad = free_frames(free, block_free, block, frames)
        else:
            bad = free_folio_frames(free, block_free, block, o, k, node_base)
    return total, thp, large, no_copy, dead, pos.size - moved, bad


# What fused_batch returns first: the batch before moved and the next one, unmapped whole, was submitted to the
# rings (SUBMITTED) or is for the caller to copy (TO_COPY), or there was no next one (MOVED); or it stopped at a
# case the general path takes: the batch before has folios left after its move pass (MOVE_LEFT; the next one
# untouched), the target node could not serve the next one (NO_FRAMES; untouched), some of its folios did not
# lock (UNMAP_LEFT), or it is unmapped whole but not copied (UNMAPPED: the rings did not take the submission,
# their code second; or, copying, a folio has an extra reference, which the copy must not overlook).
FUSED_SUBMITTED, FUSED_TO_COPY, FUSED_MOVED, FUSED_MOVE_LEFT, FUSED_NO_FRAMES, FUSED_UNMAP_LEFT, \
    FUSED_UNMAPPED = range(7)
#: Words of fused_batch's ``acc``, added up over calls: pages moved, PMD-sized and large folios moved, pages moved
#: without a copy of their own, entries moved, batches submitted whole (an unmap pass, a TLB flush, a pass each),
#: move passes that moved every folio, and the nanoseconds of the move, unmap and submission phases; then the
#: last move pass's result where it left folios (move_one_vma's seven values).
(ACC_PAGES, ACC_THP, ACC_LARGE, ACC_NO_COPY, ACC_MOVED, ACC_UNMAPS, ACC_MOVES, ACC_MOVE_NS, ACC_UNMAP_NS,
 ACC_SUBMIT_NS, ACC_LAST_MOVE) = range(11)
ACC_WORDS = ACC_LAST_MOVE + 7


# fused_batch's scratch is one int64 buffer (each array argument costs a compiled call its own unboxing): first
# the ACC_WORDS counters, which the caller reads after every run (a slice); then the entries and the base pages a
# batch holds at most, and the other parts work_views gives, which the caller reads only where a batch leaves the
# common case.
_WORK_HEAD = ACC_WORDS + 4


def fused_work(entries: int, pages: int) -> np.ndarray:
    """Scratch for :func:`fused_batch` over batches of at most ``entries`` folios and ``pages`` base pages, its
    counters (``work[:ACC_WORDS]``) zeroed; :func:`work_views` gives its parts."""
    work = np.zeros(_WORK_HEAD + (entries + 1) // 2 + 3 * pages, dtype=np.int64)
    work[ACC_WORDS] = entries
    work[ACC_WORDS + 1] = pages
    return work


def work_views(work):
    """The parts of a :func:`fused_work` buffer, as views (numpy's here; :func:`fused_batch` takes them apart the
    same way, compiled): ``(rc, listed, freed, acc, ts)``: an int32 per entry; two rows of an int64 per page (a
    submission's source and destination pfns); an int64 per page (old frames); the ``ACC_WORDS`` counters; clock
    scratch."""
    most, pages = work[ACC_WORDS], work[ACC_WORDS + 1]
    a = _WORK_HEAD + (most + 1) // 2
    rc = work[_WORK_HEAD:a].view(np.int32)[:most]
    listed = work[a:a + 2 * pages].reshape((2, pages))
    b = a + 2 * pages
    freed = work[b:b + pages]
    return rc, listed, freed, work[:ACC_WORDS], work[ACC_WORDS + 2:_WORK_HEAD]


# fused_batch takes its arrays and constants in one table (dmamig.array_table): a call converts each array
# argument on its own, and this one would take two dozen. The call's own arrays are set once per run of fused
# batches, the VMA's where the VMA (or its page table) changes; the rings come as their route's table.
(T_POSITIONS, T_STATUS, T_SRC, T_INTS, T_BOOLS, T_STATE, T_WORK, T_TFREE, T_TBLOCK_FREE, T_SFREE, T_SBLOCK_FREE,
 T_OBJ_PFNS, T_PTE_PFN, T_PTE_FLAGS) = range(14)
FUSED_LAYOUT = TableLayout(
    ((np.int64, 1), (np.int32, 1), (np.int64, 1), (np.int64, 2), (np.bool_, 2), (np.uint8, 1), (np.int64, 1),
     (np.bool_, 1), (np.int64, 1), (np.bool_, 1), (np.int64, 1),
     (np.int64, 1), (np.int64, 1), (np.uint8, 1)), scalars=10)
# The scalars' words, constants of the compiled code.
(_W_PENDING, _W_OID, _W_ORDER, _W_COPYING, _W_TBLOCK, _W_TBASE, _W_SBLOCK, _W_SBASE, _W_PGOFF,
 _W_NPAGES) = (FUSED_LAYOUT.scalar_word(k) for k in range(10))


def fused_table(positions: np.ndarray, status: np.ndarray, src: np.ndarray, ints: np.ndarray, bools: np.ndarray,
                state: np.ndarray, work: np.ndarray, target_alloc: tuple, source_alloc: tuple, pending: int, oid: int,
                order: int, copying: bool, vma: tuple) -> ArrayTable:
    """The table of a run of :func:`fused_batch` calls over the steps in ``positions`` (a batch is a range of
    it): the call's entries (``status``, ``src`` and the two entry blocks), the page state buffer, the scratch
    ``work`` (:func:`fused_work`), the target and source nodes' ``alloc_args``, the entries' ``pending``
    status, the object ``oid`` the VMA maps, the destination ``order``, whether the migrating thread copies,
    and the VMA's part, as :func:`set_fused_vma` takes it (``(obj_pfns, pgoff, npages, pte_pfn, pte_flags)``),
    which :func:`set_fused_vma` sets again where the VMA changed."""
    table = FUSED_LAYOUT.table()
    tfree, tbf, tblock, tbase = target_alloc
    sfree, sbf, sblock, sbase = source_alloc
    obj_pfns, pgoff, npages, pte_pfn, pte_flags = vma
    table.set(T_POSITIONS, (positions, status, src, ints, bools, state, work, tfree, tbf, sfree, sbf, obj_pfns,
                            pte_pfn, pte_flags),
              _W_PENDING, (pending, oid, order, int(copying), tblock, tbase, sblock, sbase, pgoff, npages))
    return table


def set_fused_vma(table: ArrayTable, obj_pfns: np.ndarray, pgoff: int, npages: int, pte_pfn: np.ndarray,
                  pte_flags: np.ndarray) -> None:
    """The VMA's part of a :func:`fused_table`: its object's slots, its first object page and size, its page
    table."""
    table.set(T_OBJ_PFNS, (obj_pfns, pte_pfn, pte_flags), _W_PGOFF, (pgoff, npages))


def _fused_batch(table, rings, prev_lo, prev_hi, nxt_lo, nxt_hi, seq):
    """One step of a long migration under the machine lock, as one call: the move pass of batch ``prev``
    (entries ``positions[prev_lo:prev_hi]``), whose copy is made (:func:`move_one_vma`; a DMA copy marks its
    entries fresh first; old frames back to the source node's allocator), then the unmap pass of batch ``nxt``
    (``positions[nxt_lo:nxt_hi]``; :func:`unmap_one_vma`, destinations of the table's order from the target
    node's allocator) and the start of its copy: where the migrating thread copies, the reference check that
    comes before its copy (``to_copy``), which the caller makes outside the lock; else the submission of its
    pages to the rings, stamped ``seq`` (:func:`dmamig.dma.ring.submit_table` over ``rings``, their route's
    table, the caller holding them). Everything else comes from ``table`` (:func:`fused_table`); its scratch
    ``work`` (:func:`fused_work`) has parts (:func:`work_views`) that tell the caller what happened: ``acc``
    adds up what the calls did (``ACC_*``).

    Returns ``(FUSED_*, runs submitted or the rings' SUBMIT_* code, pages listed, frames taken from the target
    node, frames given back to the source node)``. It stops at the first case that is not the common one and
    leaves the rest as it is, for the general path (see ``FUSED_*``); ``rc``, ``freed`` and ``acc``'s last
    move then tell where it stopped, as after :func:`unmap_one_vma` and :func:`move_one_vma`. Passes are
    counted in ``acc`` for batches that went through whole: a submitted batch's unmap pass (with its TLB flush
    and its pass), a move pass that moved every folio.
    """
    positions = table_array1(table, T_POSITIONS, np.int64)
    prev = positions[prev_lo:prev_hi]
    nxt = positions[nxt_lo:nxt_hi]
    status = table_array1(table, T_STATUS, np.int32)
    src = table_array1(table, T_SRC, np.int64)
    ints = table_array2(table, T_INTS, np.int64)
    bools = table_array2(table, T_BOOLS, np.bool_)
    state = table_array1(table, T_STATE, np.uint8)
    obj_pfns = table_array1(table, T_OBJ_PFNS, np.int64)
    pte_pfn = table_array1(table, T_PTE_PFN, np.int64)
    pte_flags = table_array1(table, T_PTE_FLAGS, np.uint8)
    oid = table[_W_OID]
    pgoff = table[_W_PGOFF]
    npages = table[_W_NPAGES]
    copying = table[_W_COPYING] != 0
    rc, listed, freed, acc, ts = _work_views(table_array1(table, T_WORK, np.int64))
    t0 = now_ns(ts)
    freed_frames = 0
    if prev.size:
        if not copying:
            fresh = bools[ROW_FRESH]
            for i in range(prev.size):
                fresh[prev[i]] = True
        nfreed, thp, large, no_copy, dead, nbusy, bad = _move_one_vma(
            prev, status, src, ints, bools, state, oid, obj_pfns, pgoff, npages, pte_pfn, pte_flags, rc, freed,
            table_array1(table, T_SFREE, np.bool_), table_array1(table, T_SBLOCK_FREE, np.int64), table[_W_SBLOCK],
            table[_W_SBASE])
        t1 = now_ns(ts)
        acc[ACC_MOVE_NS] += t1 - t0
        t0 = t1
        if nbusy or dead or bad >= 0:
            last = acc[ACC_LAST_MOVE:]
            last[0], last[1], last[2], last[3], last[4], last[5], last[6] = nfreed, thp, large, no_copy, dead, \
                nbusy, bad
            return FUSED_MOVE_LEFT, 0, 0, 0, 0
        freed_frames = nfreed
        acc[ACC_MOVES] += 1
        acc[ACC_PAGES] += nfreed
        acc[ACC_THP] += thp
        acc[ACC_LARGE] += large
        acc[ACC_NO_COPY] += no_copy
        acc[ACC_MOVED] += prev.size
    if nxt.size == 0:
        return FUSED_MOVED, 0, 0, 0, freed_frames
    bad, taken, n = _unmap_one_vma(nxt, status, table[_W_PENDING], src, ints, bools, state, oid, pgoff, npages,
                                   pte_pfn, pte_flags, table_array1(table, T_TFREE, np.bool_),
                                   table_array1(table, T_TBLOCK_FREE, np.int64), table[_W_TBLOCK], table[_W_TBASE],
                                   table[_W_ORDER], rc, listed)
    t1 = now_ns(ts)
    acc[ACC_UNMAP_NS] += t1 - t0
    if taken < 0:
        return FUSED_NO_FRAMES, 0, 0, 0, freed_frames
    if bad or n == 0:
        return FUSED_UNMAP_LEFT, 0, n, taken, freed_frames
    if copying:
        # folio_migrate_mapping's reference check comes before the copy, so a busy folio is not copied.
        expected = ints[ROW_EXPECTED]
        _, _, _, _, _, _, _, refcount, _, _, _, _ = page_fields(state)
        for i in range(nxt.size):
            if refcount[src[nxt[i]]] != expected[nxt[i]]:
                return FUSED_UNMAPPED, 0, n, taken, freed_frames
        acc[ACC_UNMAPS] += 1
        return FUSED_TO_COPY, 0, n, taken, freed_frames
    # Unchecked, as the engine's own first try of a batch: destinations out of order go the long way.
    nr = submit_table(rings, listed[0, :n], listed[1, :n], False, seq)
    acc[ACC_SUBMIT_NS] += now_ns(ts) - t1
    if nr < 0:
        return FUSED_UNMAPPED, nr, n, taken, freed_frames
    acc[ACC_UNMAPS] += 1
    return FUSED_SUBMITTED, nr, n, taken, freed_frames


if HAVE_NUMBA:
    from numba import njit

    from ..page_loops import (  # noqa: F401
        alloc_frames0,
        alloc_frames_order,
        done_folios,
        first_slot,
        free_folio_frames,
        free_frames,
        install_entries,
        install_in_order,
        move_head_state,
        page_fields,
        prep_new_folios,
        trylock_folios,
    )

    _move_pages = njit(nogil=True, cache=True, inline="always")(_move_pages)
    _move_in_order = njit(nogil=True, cache=True)(_move_in_order)
    _entry_rows = njit(nogil=True, cache=True, inline="always")(_entry_rows)
    _copy_current = njit(nogil=True, cache=True)(_copy_current)
    to_copy = njit(nogil=True, cache=True)(_to_copy)
    stale_base_pfns = njit(nogil=True, cache=True)(_stale_base_pfns)
    cut_batches = njit(nogil=True, cache=True)(_cut_batches)
    init_entries = njit(nogil=True, cache=True)(_init_entries)
    _work_views = njit(nogil=True, cache=True, inline="always")(work_views)
    fill_status = njit(nogil=True, cache=True)(_fill_status)
    fill_moved_status = njit(nogil=True, cache=True)(_fill_moved_status)
    alloc_one_order = njit(nogil=True, cache=True)(_alloc_one_order)
    unmap_one_vma = njit(nogil=True, cache=True)(_unmap_one_vma)
    move_one_vma = njit(nogil=True, cache=True)(_move_one_vma)
    _unmap_one_vma, _move_one_vma = unmap_one_vma, move_one_vma  # as fused_batch calls them
else:  # pragma: no cover
    unmap_one_vma = move_one_vma = to_copy = alloc_one_order = stale_base_pfns = cut_batches = None
    init_entries = fill_status = fill_moved_status = None

#: Why the fused batches cannot run here (``None`` where they can): they need the rings and a compiled clock.
FUSED_ERROR: str | None = "numba is not importable" if not HAVE_NUMBA else (RING_ERROR or SPIN_ERROR)
if FUSED_ERROR is None:
    from ..array_table import table_array1, table_array2  # noqa: F401
    from ..backends.cpu.spin import now_ns  # noqa: F401
    from ..dma.ring import submit_table  # noqa: F401

    fused_batch = njit(nogil=True, cache=True)(_fused_batch)
else:  # pragma: no cover
    fused_batch = None
