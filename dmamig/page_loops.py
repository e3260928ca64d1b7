"""Compiled per-page loops of the migration core (numba), used when numba imports.

Each loop does in one pass what the numpy code in ``vma.py``, ``migrate/state.py`` and ``pages.py`` does in many
array operations; those numpy versions stay as the reference (the tests check both agree) and as the path
where numba is missing. The loops are ``nogil`` so a migrating thread never holds the GIL while it walks
its batch, and ``cache=True`` so they compile once per machine. ("Kernels" in dmamig are CUDA sources only.)
"""

from __future__ import annotations

import numpy as np

from .flags import (
    EACCES,
    EBUSY,
    EFAULT,
    ENOENT,
    MIGRATE_COPIED_FLAGS,
    MIGRATE_MOVED_FLAGS,
    MIGRATION_ENTRY_KEPT,
    PageFlag,
    PteFlag,
)

__all__ = ["HAVE_NUMBA", "PAGE_BYTES", "PAGE_FIELDS", "alloc_frames0", "alloc_frames_order", "any_bits",
           "collect_folios", "collect_slots", "done_folios", "expand_folios", "first_at", "first_outside",
           "first_slot", "first_unwritable", "free_folio_frames", "free_frames", "install_entries",
           "install_in_order", "locate_entries",
           "move_folio_state", "move_head_state", "move_object_slots", "on_nodes", "one_node", "one_node_pair",
           "page_fields", "page_slots", "prep_new_folios", "remove_entries", "reset_pages", "same_values",
           "slots_within", "stamp_folios", "trylock_folios"]

try:
    from numba import carray, njit

    from .array_table import pointer

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - numba is a dependency; this keeps the numpy path usable without it
    HAVE_NUMBA = False

#: The shared zero page's pfn in a page table (as vma.ZERO_PFN: it maps no frame).
ZERO_PFN = -2
_PRESENT = int(PteFlag.PRESENT)
# Present PTEs and device-private entries both map a page that try_to_migrate turns into a migration entry.
_MAPPED = int(PteFlag.PRESENT | PteFlag.DEVICE_PRIVATE)
_MIGRATION = int(PteFlag.MIGRATION)
_DIRTY_PTE = int(PteFlag.DIRTY)
_KEPT = int(MIGRATION_ENTRY_KEPT)
_PG_DIRTY = np.uint32(PageFlag.DIRTY)
_COPIED = np.uint32(MIGRATE_COPIED_FLAGS | PageFlag.SWAPBACKED)
_ACTIVE = np.uint32(PageFlag.ACTIVE)
_UNEVICTABLE = np.uint32(PageFlag.UNEVICTABLE)
_PRIVATE = np.uint32(PageFlag.PRIVATE)
_SWAPCACHE = np.uint32(PageFlag.SWAPCACHE)
_WRITEBACK = np.uint32(PageFlag.WRITEBACK)
_MOVED_ON_OLD = np.uint32(MIGRATE_MOVED_FLAGS)
_LRU = np.uint32(PageFlag.LRU)
_ISOLATED = np.uint32(PageFlag.ISOLATED)
# Pages from which a folio's contiguous pages are filled per array rather than page by page.
_FILL_MIN = 16

# Indexing: a loop over a contiguous range indexes a view from 0 (``v = a[lo:hi]``, then ``v[i]`` for ``i`` in
# ``range(v.size)``), not ``a[lo + i]`` or ``a[i]`` for ``i`` in ``range(lo, hi)``. numba wraps a negative index
# around the end, and where the compiler cannot prove an index non-negative that test stays in the loop: it keeps
# a reduction or a copy from being vectorised, and costs every access a compare and a select.

#: PageArray's per-pfn fields, in their order in its one state buffer: ``(name, dtype, free-state value)``, the
#: widest first so that each field's part is aligned for its dtype; ``head`` starts as each pfn itself (None).
#: A compiled call takes the buffer as one argument and finds the fields with :func:`page_fields` (each array
#: argument costs the call its own unboxing, and a batch's calls take a dozen of them).
PAGE_FIELDS = (("mapping", np.int64, -1), ("index", np.int64, 0), ("private", np.int64, 0),
               ("head", np.int64, None), ("write_seq", np.int64, 0), ("mark", np.int64, -1),
               ("flags", np.uint32, 0), ("refcount", np.int32, 0), ("mapcount", np.int32, 0),
               ("last_cpupid", np.int32, -1), ("memcg", np.int32, 0), ("order", np.int8, 0))
#: Bytes of the state buffer per slot (a pfn's entry in every field).
PAGE_BYTES = sum(np.dtype(dtype).itemsize for _name, dtype, _free in PAGE_FIELDS)
# Each field has a few slots more than pfns (see page_slots): so many that a field's part starts 320 bytes (five
# cache lines) further into a 4 KiB page than the part before it. One pfn's entries in the fields then fall in
# different cache sets; with parts a multiple of 4 KiB long they would all fall in one, and a loop over a batch's
# pages, which reads a dozen fields at each, would evict its own lines.
_SLOT_ALIGN = 512
_SLOT_SKEW = 40


def page_slots(nr_pfns: int) -> int:
    """Slots per field in a PageArray state buffer for ``nr_pfns`` pfns: at least as many, and 40 past a
    multiple of 512 (an int64 field then ends 320 bytes past a 4 KiB boundary)."""
    return nr_pfns + (_SLOT_SKEW - nr_pfns) % _SLOT_ALIGN


def _page_fields(state):
    """The field arrays of a PageArray state buffer (bytes), in :data:`PAGE_FIELDS` order: views, no copies,
    each of the buffer's slots (:func:`page_slots`: a few more than pfns, which no caller indexes).

    The numpy path's, where numba is missing; a compiled caller takes :func:`_page_fields_at` as ``page_fields``
    (a test checks its fields are PageArray's own arrays).
    """
    n = state.size // PAGE_BYTES
    a, b = 8 * n, 4 * n
    mapping = state[0:a].view(np.int64)
    index = state[a:2 * a].view(np.int64)
    private = state[2 * a:3 * a].view(np.int64)
    head = state[3 * a:4 * a].view(np.int64)
    write_seq = state[4 * a:5 * a].view(np.int64)
    mark = state[5 * a:6 * a].view(np.int64)
    o = 6 * a
    flags = state[o:o + b].view(np.uint32)
    refcount = state[o + b:o + 2 * b].view(np.int32)
    mapcount = state[o + 2 * b:o + 3 * b].view(np.int32)
    last_cpupid = state[o + 3 * b:o + 4 * b].view(np.int32)
    memcg = state[o + 4 * b:o + 5 * b].view(np.int32)
    order = state[o + 5 * b:o + 5 * b + n].view(np.int8)
    return (mapping, index, private, head, write_seq, mark, flags, refcount, mapcount, last_cpupid, memcg,
            order)


def _page_fields_at(state):
    """:func:`_page_fields` for compiled callers: each field an array over the buffer's own memory at its offset,
    as the views are. A view costs a compiled call checks of its own, for every field, in each of the several
    calls of a batch that take the buffer apart; these cost nothing. They hold no reference to ``state``: valid
    while it is, as it is for every caller, which has it as an argument."""
    n = state.size // PAGE_BYTES
    at = state.ctypes.data
    # The fields in PAGE_FIELDS order: six int64 ones, flags (uint32), four int32 ones, order (int8).
    wide = carray(pointer(at, np.int64), (6, n))
    flags = carray(pointer(at + 48 * n, np.uint32), n)
    narrow = carray(pointer(at + 52 * n, np.int32), (4, n))
    order = carray(pointer(at + 68 * n, np.int8), n)
    return (wide[0], wide[1], wide[2], wide[3], wide[4], wide[5], flags, narrow[0], narrow[1], narrow[2], narrow[3],
            order)


# install_entries and remove_entries below repeat the same slot lookup (the rmap walk of one page) inline: a shared
# helper for it, even with numba's inline="always", measured 30-50% slower in the unmap phase.


def _first_slot(mapping, index, first, nr, oid, pgoff, npages):
    """Where the ``nr`` base pages from pfn ``first`` are consecutive pages of object ``oid`` whose slots are all
    within a VMA of ``npages`` slots from object page ``pgoff``: the VMA slot of the first, else -1. A large
    folio mapped in order (every one a fault or a migration put in place) is; a loop over its pages may then
    index views of its slots from 0, without a branch per page (:func:`install_in_order`)."""
    if nr < 1:
        return -1
    ix = index[first]
    s = ix - pgoff
    if s < 0 or s + nr > npages:
        return -1
    run_mapping = mapping[first:first + nr]  # views indexed from 0 (see the note on indexing above)
    run_index = index[first:first + nr]
    in_order = True
    for j in range(nr):  # no branch, so that it vectorises
        in_order &= (run_mapping[j] == oid) & (run_index[j] == ix + j)
    return s if in_order else -1


def _install_in_order(first, nr, h, s0, mapcount, refcount, flags, pte_pfn, pte_flags):
    """:func:`install_entries` for the ``nr`` base pages from pfn ``first``, all of the folio headed by ``h``, whose
    slots are in order from VMA slot ``s0`` (:func:`first_slot`): the same steps, each a select instead of a
    branch, over views of the slots; the folio's reference and dirty bit settled once, after its pages."""
    run_mapcount = mapcount[first:first + nr]
    slot_pfn = pte_pfn[s0:s0 + nr]
    slot_flags = pte_flags[s0:s0 + nr]
    unmapped = 0
    dirty = False
    for j in range(nr):
        f = slot_flags[j]
        hit = (slot_pfn[j] == first + j) & ((f & _MAPPED) != 0)
        slot_flags[j] = ((f & _KEPT) | _MIGRATION) if hit else f
        dirty |= hit & ((f & _DIRTY_PTE) != 0)
        run_mapcount[j] -= hit
        unmapped += hit
    if dirty:
        flags[h] |= _PG_DIRTY
    refcount[h] -= unmapped


def _install_entries(pfns, mapping, index, head, mapcount, refcount, flags, oid, pgoff, npages, pte_pfn,
                     pte_flags):
    """try_to_migrate over one VMA: each present PTE or device-private entry of ``pfns`` becomes a migration
    entry."""
    for i in range(pfns.size):
        p = pfns[i]
        if mapping[p] != oid:
            continue
        s = index[p] - pgoff
        if s < 0 or s >= npages or pte_pfn[s] != p:
            continue
        f = pte_flags[s]
        if (f & _MAPPED) == 0:
            continue
        pte_flags[s] = (f & _KEPT) | _MIGRATION
        h = head[p]
        if f & _DIRTY_PTE:
            flags[h] |= _PG_DIRTY
        mapcount[p] -= 1
        refcount[h] -= 1


def _remove_entries(old, new, mapping, index, head, mapcount, refcount, oid, pgoff, npages, pte_pfn,
                    pte_flags):
    """remove_migration_ptes over one VMA: each migration entry of ``old[i]`` maps ``new[i]``."""
    for i in range(old.size):
        p = old[i]
        if mapping[p] != oid:
            continue
        s = index[p] - pgoff
        if s < 0 or s >= npages or pte_pfn[s] != p:
            continue
        f = pte_flags[s]
        if (f & _MIGRATION) == 0:
            continue
        q = new[i]
        pte_pfn[s] = q
        pte_flags[s] = (f & _KEPT) | _PRESENT
        mapcount[q] += 1
        refcount[head[q]] += 1


def _move_head_state(o, n, flags, refcount, private, last_cpupid, memcg):
    """folio_migrate_flags and the reference hand-over of ``folio_migrate_mapping`` for one folio pair: the state
    kept on the head (see state.py)."""
    of = flags[o]
    nf = flags[n] | (of & _COPIED)
    if of & _ACTIVE:
        nf |= _ACTIVE
    elif of & _UNEVICTABLE:
        nf |= _UNEVICTABLE
    nf |= of & _SWAPCACHE
    if of & _PRIVATE:
        nf |= _PRIVATE
        private[n] = private[o]
    private[o] = 0
    flags[n] = nf & ~_WRITEBACK
    flags[o] = of & ~_MOVED_ON_OLD
    last_cpupid[n] = last_cpupid[o]
    last_cpupid[o] = -1
    memcg[n] = memcg[o]
    memcg[o] = 0
    refcount[n] += refcount[o] - 1  # keeps references taken on the new folio since its allocation
    refcount[o] = 1


def _move_folio_state(old, new, nr, flags, refcount, mapping, index, private, last_cpupid, memcg):
    """folio_migrate_mapping + folio_migrate_flags for each (old, new) folio pair (see state.py)."""
    for i in range(old.size):
        o = old[i]
        n = new[i]
        move_head_state(o, n, flags, refcount, private, last_cpupid, memcg)
        if nr[i] < _FILL_MIN:
            for k in range(nr[i]):
                mapping[n + k] = mapping[o + k]
                index[n + k] = index[o + k]
        else:
            mapping[n:n + nr[i]] = mapping[o:o + nr[i]]
            index[n:n + nr[i]] = index[o:o + nr[i]]


def _move_object_slots(old, new, nr, mapping, index, oid, obj_pfns):
    """The object's slots (the xarray) that hold an old page now hold its new page."""
    for i in range(old.size):
        for k in range(nr[i]):
            p = old[i] + k
            if mapping[p] == oid:
                j = index[p]
                if obj_pfns[j] == p:
                    obj_pfns[j] = new[i] + k


def _clear_page(p, h, flags, refcount, mapcount, mapping, index, private, last_cpupid, memcg, order, head):
    """Free-page state for base pfn ``p``, as part of the folio headed by ``h`` (``p`` itself when freed)."""
    flags[p] = 0
    refcount[p] = 0
    mapcount[p] = 0
    mapping[p] = -1
    index[p] = 0
    private[p] = 0
    last_cpupid[p] = -1
    memcg[p] = 0
    order[p] = 0
    head[p] = h


def _clear_range(a, b, h, flags, refcount, mapcount, mapping, index, private, last_cpupid, memcg, order, head):
    """Free-page state for base pfns ``a`` to ``b``, as parts of the folio headed by ``h`` (each its own head
    where ``h`` < 0): one fill per array, for a large folio (block stores, where a page-by-page pass over ten
    arrays is not; a small folio is cleared page by page, since a fill and a call have set-up costs of their
    own)."""
    flags[a:b] = 0
    refcount[a:b] = 0
    mapcount[a:b] = 0
    mapping[a:b] = -1
    index[a:b] = 0
    private[a:b] = 0
    last_cpupid[a:b] = -1
    memcg[a:b] = 0
    order[a:b] = 0
    if h < 0:
        heads = head[a:b]  # a view indexed from 0 (see the note on indexing above)
        for j in range(heads.size):
            heads[j] = a + j
    else:
        head[a:b] = h


def _reset_pages(pfns, flags, refcount, mapcount, mapping, index, private, last_cpupid, memcg, order, head):
    """PageArray.reset: free-page state for each base pfn."""
    for i in range(pfns.size):
        p = pfns[i]
        _clear_page(p, p, flags, refcount, mapcount, mapping, index, private, last_cpupid, memcg, order, head)


def _prep_new_folios(heads, order, head_flag, flags, refcount, order_arr, head):
    """PageArray.prep_new: a fresh folio of ``2**order`` pages at each head, refcount 1 on the head.

    The frames come from an allocator, which holds only frames in the free state (every path that frees
    resets them first, as ``free_pages_prepare`` checks a freed page is clean; :func:`dmamig.check.check_machine`
    checks it): what is left to set is the head's order, reference and flag and each tail's head
    (``prep_compound_page``), not the other state arrays a second time.
    """
    nr = 1 << order
    for i in range(heads.size):
        h = heads[i]
        if nr < _FILL_MIN:
            for k in range(1, nr):
                head[h + k] = h
        else:
            head[h + 1:h + nr] = h
        order_arr[h] = order
        refcount[h] = 1
        if order:
            flags[h] = head_flag


def _alloc_frames0(free, block_free, block, count, out):
    """FrameAllocator order-0 allocation: partly used pageblocks first, then whole free ones; both in address
    order. Marks the frames used and returns how many it found (up to ``count``)."""
    got = 0
    for whole in (False, True):
        for b in range(block_free.size):
            bf = block_free[b]
            if bf == 0 or (bf == block) != whole:
                continue
            base = b * block
            for k in range(block):
                if free[base + k]:
                    free[base + k] = False
                    out[got] = base + k
                    got += 1
                    bf -= 1
                    if got == count:
                        break
            block_free[b] = bf
            if got == count:
                return got
    return got


def _alloc_frames_order(free, block_free, block, size, count, out):
    """FrameAllocator order-k allocation (``size`` = 2**k frames, naturally aligned): blocks from partly used
    pageblocks first, then whole free ones, each in address order; marks them used, returns how many."""
    got = 0
    for whole in (False, True):
        for b in range(block_free.size):
            bf = block_free[b]
            if bf < size or (bf == block) != whole:
                continue
            base = b * block
            # A whole free pageblock (block_free counts its free frames) needs no frame-by-frame look: its
            # starts are taken in order, so each one is free until taken.
            whole_free = bf == block
            for start in range(base, base + block, size):
                if not whole_free:
                    ok = True
                    for k in range(size):
                        if not free[start + k]:
                            ok = False
                            break
                    if not ok:
                        continue
                free[start:start + size] = False
                bf -= size
                out[got] = start
                got += 1
                if got == count:
                    break
            block_free[b] = bf
            if got == count:
                return got
    return got


def _free_frames(free, block_free, block, frames):
    """FrameAllocator.free: return frames to the pool; on a double free change nothing and return its index."""
    for i in range(frames.size):
        if free[frames[i]]:
            return i
    for i in range(frames.size):
        f = frames[i]
        free[f] = True
        block_free[f // block] += 1
    return -1


def _free_folio_frames(free, block_free, block, heads, nr, base):
    """``free_frames`` for whole folios: every frame of the folio at pfn ``heads[i]`` (``nr[i]`` frames; the
    allocator's frames start at pfn ``base``). On a double free change nothing and return the frame's position
    in the folios' frames listed in order; else -1."""
    k = 0
    for i in range(heads.size):
        a = heads[i] - base
        frames = free[a:a + nr[i]]
        seen = False
        for j in range(frames.size):  # no branch, so that it vectorises; the rare hit is found below
            seen |= frames[j]
        if seen:
            for j in range(frames.size):
                if frames[j]:
                    return k + j
        k += nr[i]
    for i in range(heads.size):
        a = heads[i] - base
        n = nr[i]
        if n < _FILL_MIN or a // block != (a + n - 1) // block:
            for j in range(n):
                free[a + j] = True
                block_free[(a + j) // block] += 1
        else:  # a large folio within one pageblock: one fill, one count
            free[a:a + n] = True
            block_free[a // block] += n
    return -1


def _in_order(pfns, i, k, p):
    """Whether ``pfns[i:i + k]`` are ``p``, ``p + 1``, ... (over a view indexed from 0, without a branch)."""
    run = pfns[i:i + k]
    ok = True
    for j in range(run.size):
        ok &= run[j] == p + j
    return ok


def _fill_run(status, entry, i, k, st, e):
    """``status[i:i + k]`` and ``entry[i:i + k]`` become ``st`` and ``e`` (views indexed from 0)."""
    sv = status[i:i + k]
    ev = entry[i:i + k]
    for j in range(sv.size):
        sv[j] = st
        ev[j] = e


def _collect_folios(pfns, node_lo, node_hi, state, refuse_shared, status, entry, heads):
    """collect_folios + isolate_folios in one pass (see migrate/isolate.py for the numpy reference), over the
    page state of PageArray's ``state`` buffer.

    Per page: ``status`` 0 (already on the node), -ENOENT (no page, or free), -EFAULT (the zero page), -EACCES
    (mapped by another process, with ``refuse_shared``), -EBUSY (off the LRU or isolated by someone else) or 1
    (the core's pending state; ``entry`` is its folio's index in ``heads``). Each folio is isolated once, in
    first-occurrence order; ``mark`` (one slot per pfn, all -1) remembers this call's folios and is reset.
    """
    _mapping, _index, _private, head, _ws, mark, flags, refcount, mapcount, _cpupid, _memcg, order = \
        page_fields(state)
    n = 0
    size = pfns.size
    run_end = -1  # the folio of the page before ends at this pfn: a page that follows it inside is settled
    i = 0
    while i < size:
        p = pfns[i]
        if p < run_end and i and p == pfns[i - 1] + 1:
            # The next page of the same folio (a folio's pages are consecutive pfns): the same outcome, without
            # looking its folio up again.
            status[i] = status[i - 1]
            entry[i] = entry[i - 1]
            i += 1
            continue
        run_end = -1
        if p < 0:
            status[i] = EFAULT if p == ZERO_PFN else ENOENT
            entry[i] = -1
            i += 1
            continue
        h = head[p]
        nr = 1 << order[h]
        run_end = h + nr
        e = mark[h]  # -1 unless this call has the folio already
        if h >= node_lo and h < node_hi:
            st, e = 0, -1
        elif e >= 0:
            st = 1
        elif refcount[h] <= 0:
            st = ENOENT
        else:
            st = 1
            if refuse_shared:
                for k in range(nr):
                    if mapcount[h + k] > 1:
                        st = EACCES
                        break
            if st == 1:
                f = flags[h]
                if (f & _LRU) == 0 or (f & _ISOLATED) != 0:
                    st = EBUSY
                else:
                    flags[h] = (f | _ISOLATED) & ~_LRU
                    refcount[h] += 1
                    mark[h] = n
                    heads[n] = h
                    e = n
                    n += 1
        # The rest of a large folio mapped in order (a THP's 512 slots) is settled at once: one vectorised look
        # that the pages follow, one fill.
        k = run_end - p
        if k > 1 and i + k <= size and _in_order(pfns, i, k, p):
            _fill_run(status, entry, i, k, st, e)
            i += k
            run_end = -1
            continue
        status[i] = st
        entry[i] = e
        i += 1
    for k in range(n):
        mark[heads[k]] = -1
    return n


def _collect_slots(pte_pfn, pte_flags, s0, s1, node_lo, node_hi, state, refuse_shared, pfns, status, entry,
                   heads):
    """A range's collection where one VMA maps it, slots ``s0`` to ``s1``: -1, and nothing done, where a slot
    holds a migration entry (the caller waits for that migration to finish); else the pfns of the slots copied
    to ``pfns`` and :func:`collect_folios` over them (its return value)."""
    if _any_bits(pte_flags, s0, s1, _MIGRATION):  # Vma.has_migration_entries' own test
        return -1
    n = s1 - s0
    pfns[:n] = pte_pfn[s0:s1]
    # The slots' pfns only: collect_folios goes over every pfn it is given, and the rest of ``pfns`` is not set.
    return _collect_folios(pfns[:n], node_lo, node_hi, state, refuse_shared, status, entry, heads)


def _locate_entries(pfns, head, src, mark, entry):
    """The entry (position in ``src``, the folio heads of a call, each once) of the folio of each base pfn of
    ``pfns`` into ``entry``, -1 for a page of no listed folio. ``mark`` (one slot per pfn, all -1) is scratch
    and is reset."""
    for k in range(src.size):
        mark[src[k]] = k
    for i in range(pfns.size):
        entry[i] = mark[head[pfns[i]]]
    for k in range(src.size):
        mark[src[k]] = -1


def _one_node(pfns, node_table, bases, frames):
    """The node of every pfn of ``pfns``, each pfn's frame within it written to ``frames``; -1 when they span
    nodes (``frames`` is then partly written). NodeMap.locate for pfns on one node, in one pass."""
    if pfns.size == 0:
        return -1
    n = node_table[pfns[0]]
    base = bases[n]
    for i in range(pfns.size):
        if node_table[pfns[i]] != n:
            return -1
        frames[i] = pfns[i] - base
    return n


def _one_node_pair(src, dst, node_table, bases, order, out):
    """``(s, d)``: the node of every pfn of ``src`` and the node of every pfn of ``dst`` (:func:`_one_node` on each
    side, their frames into ``out[0]`` and ``out[1]``), and to ``out[2]`` the size of the folio each pfn of ``src``
    heads (``1 << order[pfn]``, 1 each where ``order`` is empty: base pages); ``(-1, -1)`` when a side spans nodes
    (``out`` is then partly written). NodeMap.locate for a copy's two sides."""
    s = _one_node(src, node_table, bases, out[0])
    d = _one_node(dst, node_table, bases, out[1]) if s >= 0 else -1
    if d < 0:
        return -1, -1
    sized = order.size > 0
    for i in range(src.size):
        out[2, i] = (1 << order[src[i]]) if sized else 1
    return s, d


def _first_outside(values, hi):
    """The index of the first of ``values`` outside ``[0, hi)``, or -1 (the range check of every entry point that
    takes pfns, in one pass without temporaries)."""
    for i in range(values.size):
        if values[i] < 0 or values[i] >= hi:
            return i
    return -1


def _first_at(values, lo, hi, x):
    """The first index in ``[lo, hi)`` where ``values`` holds ``x``, or -1."""
    for i in range(lo, hi):
        if values[i] == x:
            return i
    return -1


def _first_unwritable(pte_pfn, pte_flags, lo, hi, write):
    """The first slot in ``[lo, hi)`` that maps no page or lacks the ``write`` bit (a write faults there), or
    -1."""
    for i in range(lo, hi):
        if pte_pfn[i] < 0 or (pte_flags[i] & write) == 0:
            return i
    return -1


def _on_nodes(pfns, node_table, mask, out):
    """The pfns of ``pfns`` (negative ones are no page) whose node ``mask`` selects, in order, into ``out``;
    returns how many."""
    k = 0
    for i in range(pfns.size):
        p = pfns[i]
        if p >= 0 and mask[node_table[p]]:
            out[k] = p
            k += 1
    return k


def _slots_within(addrs, start, end, page_size, pte_pfn, slots, pfns):
    """Whether every address of ``addrs`` lies in ``[start, end)`` (one VMA's range); if so, each one's slot
    and the pfn its PTE holds are in ``slots`` and ``pfns`` (partly written otherwise)."""
    for i in range(addrs.size):
        a = addrs[i]
        if a < start or a >= end:
            return False
        s = (a - start) // page_size
        slots[i] = s
        pfns[i] = pte_pfn[s]
    return True


def _same_values(a, b):
    """Whether ``a`` and ``b`` (of one length) hold the same values in the same order."""
    for i in range(a.size):
        if a[i] != b[i]:
            return False
    return True


def _any_bits(flags, lo, hi, bits):
    """Whether any of ``flags[lo:hi]`` has one of ``bits`` set (no temporary). The flags are or-ed together
    without a branch, over a view indexed from 0, so that the compiler vectorises the loop (see the note on
    indexing at the top of this module)."""
    view = flags[lo:hi]
    seen = flags.dtype.type(0)
    for i in range(view.size):
        seen |= view[i]
    return (seen & bits) != 0


def _trylock_folios(heads, flags, locked, writeback, rc):
    """The ASYNC unmap's lock step: take each free folio lock; a busy lock is -EAGAIN (rc 1, retried next pass)
    and a folio under writeback -EBUSY (its lock given back). Returns how many did not lock."""
    bad = 0
    for i in range(heads.size):
        h = heads[i]
        f = flags[h]
        if f & locked:
            rc[i] = 1
            bad += 1
        elif f & writeback:
            rc[i] = EBUSY
            bad += 1
        else:
            flags[h] = f | locked
            rc[i] = 0
    return bad


def _done_folios(old, new, nr, putback_clear, lru, flags, refcount, mapcount, mapping, index, private, last_cpupid,
                 memcg, order, head, out):
    """migrate_folio_done for moved folios: the new folio back on the LRU without the isolation reference; every
    base page of the old folio reset to free state and listed in ``out`` for the allocator. Returns how many new
    folios lost their last reference (their mappings went away during the migration)."""
    dead = 0
    k = 0
    for i in range(old.size):
        n = new[i]
        flags[n] = (flags[n] & putback_clear) | lru
        refcount[n] -= 1
        if refcount[n] <= 0:
            dead += 1
        o = old[i]
        if nr[i] < _FILL_MIN:
            for j in range(nr[i]):
                p = o + j
                _clear_page(p, p, flags, refcount, mapcount, mapping, index, private, last_cpupid, memcg, order,
                            head)
                out[k] = p
                k += 1
        else:
            _clear_range(o, o + nr[i], -1, flags, refcount, mapcount, mapping, index, private, last_cpupid,
                         memcg, order, head)
            listed = out[k:k + nr[i]]
            for j in range(listed.size):
                listed[j] = o + j
            k += nr[i]
    return dead


def _expand_folios(heads, page_order):
    """Every base pfn of the folios whose heads are given, folio by folio (PageArray.expand)."""
    total = 0
    for i in range(heads.size):
        total += 1 << page_order[heads[i]]
    out = np.empty(total, dtype=np.int64)
    k = 0
    for i in range(heads.size):
        h = heads[i]
        for j in range(1 << page_order[h]):
            out[k] = h + j
            k += 1
    return out


def _stamp_folios(heads, page_order, write_seq, seq):
    """``write_seq`` of every base page of the folios whose heads are given becomes ``seq``."""
    for i in range(heads.size):
        h = heads[i]
        for j in range(1 << page_order[h]):
            write_seq[h + j] = seq


if HAVE_NUMBA:
    _jit = njit(nogil=True, cache=True)
    page_fields = njit(nogil=True, cache=True, inline="always")(_page_fields_at)
    move_head_state = njit(nogil=True, cache=True, inline="always")(_move_head_state)
    expand_folios = _jit(_expand_folios)
    stamp_folios = _jit(_stamp_folios)
    _clear_page = njit(nogil=True, cache=True, inline="always")(_clear_page)
    _clear_range = njit(nogil=True, cache=True)(_clear_range)
    done_folios = _jit(_done_folios)
    trylock_folios = _jit(_trylock_folios)
    alloc_frames0 = _jit(_alloc_frames0)
    alloc_frames_order = _jit(_alloc_frames_order)
    free_frames = _jit(_free_frames)
    free_folio_frames = _jit(_free_folio_frames)
    _in_order = njit(nogil=True, cache=True, inline="always")(_in_order)
    _fill_run = njit(nogil=True, cache=True, inline="always")(_fill_run)
    collect_folios = _collect_folios = _jit(_collect_folios)  # under its own name too: collect_slots calls it
    collect_slots = _jit(_collect_slots)
    locate_entries = _jit(_locate_entries)
    on_nodes = _jit(_on_nodes)
    one_node = _one_node = _jit(_one_node)  # under its own name too: one_node_pair calls it compiled
    one_node_pair = _jit(_one_node_pair)
    any_bits = _any_bits = _jit(_any_bits)  # under its own name too: collect_slots calls it
    first_at = _jit(_first_at)
    first_outside = _jit(_first_outside)
    first_unwritable = _jit(_first_unwritable)
    same_values = _jit(_same_values)
    slots_within = _jit(_slots_within)
    first_slot = _jit(_first_slot)
    install_in_order = _jit(_install_in_order)
    install_entries = _jit(_install_entries)
    remove_entries = _jit(_remove_entries)
    move_folio_state = _jit(_move_folio_state)
    move_object_slots = _jit(_move_object_slots)
    reset_pages = _jit(_reset_pages)
    prep_new_folios = _jit(_prep_new_folios)
else:  # pragma: no cover
    page_fields = _page_fields  # the views serve the numpy path as well
    move_head_state = expand_folios = stamp_folios = on_nodes = one_node = one_node_pair = any_bits = None
    first_at = first_outside = first_unwritable = same_values = slots_within = None
    alloc_frames0 = alloc_frames_order = free_frames = free_folio_frames = collect_folios = locate_entries = None
    collect_slots = None
    done_folios = trylock_folios = install_entries = install_in_order = first_slot = None
    remove_entries = move_folio_state = None
    move_object_slots = reset_pages = prep_new_folios = None
