"""Taking folios for migration and giving them back: isolation, collection of a range, put-back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import page_loops
from ..array_ops import all_distinct, first_occurrences
from ..balloon import isolate_movable_folios
from ..errors import InvalidArgument
from ..flags import EACCES, EBUSY, EFAULT, ENOENT, PageFlag
from ..mm_struct import segment_pfns
from ..vma import ZERO_PFN
from .entries import PENDING

if TYPE_CHECKING:
    from ..machine import Machine
    from ..mm_struct import MmStruct

__all__ = ["check_dst", "collect_folios", "collect_located", "collect_lru_folios", "collect_range", "isolate_folios",
           "putback_folios"]


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


def putback_folios(m: Machine, heads: np.ndarray) -> None:
    """``putback_movable_pages``: back on the LRU, the isolation reference dropped (caller holds the lock).

    Non-LRU movable pages go back to their driver (``movable_ops->putback_page``), not on an LRU.
    """
    if heads.size == 0:
        return
    pages = m.pages
    pages.clear(heads, PageFlag.ISOLATED)
    if m.movable_object_ids.size:
        pages.set(heads[~np.isin(pages.mapping[heads], m.movable_object_ids)], PageFlag.LRU)
    else:
        pages.set(heads, PageFlag.LRU)
    m.frames.put_folios(heads, unique=True)


def collect_folios(m: Machine, pfns: np.ndarray, node: int,
                   move_all: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pick and isolate the folios of ``pfns`` for ``node`` (see :func:`collect_lru_folios`); non-LRU movable
    pages (a balloon's) are isolated through their driver (``isolate_movable_page``), after the others."""
    status, heads, _entry = collect_located(m, pfns, node, move_all)
    return status, heads


def collect_located(m: Machine, pfns: np.ndarray, node: int,
                    move_all: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`collect_folios`, and where collection knows it, the entry of each page (the position of its folio
    in the heads returned, -1 for a page whose folio is not taken), as ``Entries.locate`` would find it: one pass
    over the pages fewer for a call that builds its entries from these heads as they are. ``None`` where it does
    not know (the numpy path, or movable pages isolated after the others)."""
    status, heads, entry = collect_lru_folios(m, pfns, node, move_all)
    if m.movable_object_ids.size == 0:
        return status, heads, entry
    busy = np.flatnonzero(status == EBUSY)
    if busy.size == 0:
        return status, heads, entry
    cand = m.pages.head[pfns[busy]]
    movable = np.isin(m.pages.mapping[cand], m.movable_object_ids)
    busy, cand = busy[movable], cand[movable]
    first = np.unique(cand, return_index=True)[1]
    first.sort()
    taken = cand[first][isolate_movable_folios(m, cand[first]) == 0]
    status[busy[np.isin(cand, taken)]] = PENDING
    return status, np.concatenate([heads, taken]), None


def collect_range(mm: MmStruct, addr: int, length: int, node: int,
                  move_all: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The pfns of ``[addr, addr + length)`` once no migration entry is left in it
    (:meth:`~dmamig.mm_struct.MmStruct.wait_migrations`), and :func:`collect_located` over them: ``(pfns, status,
    heads, entry)`` (caller holds ``machine.changed``).

    Where one VMA maps the whole range, no migration entry stands in it and no driver's movable pages need their
    own isolation, one compiled pass does it all (the usual ``AddressSpace.migrate``); the steps one by one
    are the reference, and the way wherever there is something to wait for.
    """
    m = mm.machine
    if page_loops.HAVE_NUMBA and m.movable_object_ids.size == 0:
        segs = mm.segments(addr, length)
        if len(segs) == 1:
            v, s0, s1 = segs[0]
            nd = m.nodes[node]
            n = s1 - s0
            # Arrays of their own: unpacking the rows of one costs more than the allocations it saves.
            pfns = np.empty(n, dtype=np.int64)
            entry = np.empty(n, dtype=np.int64)
            heads = np.empty(n, dtype=np.int64)
            status = np.empty(n, dtype=np.int32)
            lo = nd.base_pfn
            k = page_loops.collect_slots(v.pte_pfn, v.pte_flags, s0, s1, lo, lo + nd.total_pages,
                                         m.pages.state, not move_all, pfns, status, entry, heads)
            if k >= 0:
                return pfns, status, heads[:k], entry
    pfns = segment_pfns(mm.wait_migrations(addr, length))
    status, heads, entry = collect_located(m, pfns, node, move_all)
    return pfns, status, heads, entry


def collect_lru_folios(m: Machine, pfns: np.ndarray, node: int,
                       move_all: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pick and isolate the folios of ``pfns`` (``-1`` = no page, ``ZERO_PFN`` = the zero page) for ``node``.

    ``move_all=False`` is move_pages(2) without ``MPOL_MF_MOVE_ALL``: a folio another process maps too (a page
    of it with mapcount > 1) stays, with ``-EACCES``, unless it is on ``node`` already. The zero page is
    ``-EFAULT``, as the syscall reports it.

    Caller holds the lock. Returns ``(status, heads, entry)``: a provisional per-page status (``0`` for pages
    already on ``node``, ``-errno`` for pages that cannot be taken, ``PENDING`` for the rest), the isolated heads,
    each folio once, in first-occurrence order, and the compiled loop's position in ``heads`` of each page's
    folio (-1 for the others; ``None`` from the numpy code). The compiled loop does it in one pass; the numpy
    code below is its reference.
    """
    nd = m.nodes[node]
    if page_loops.HAVE_NUMBA:
        pages = m.pages
        status = np.empty(pfns.size, dtype=np.int32)
        entry = np.empty(pfns.size, dtype=np.int64)
        heads = np.empty(pfns.size, dtype=np.int64)
        n = page_loops.collect_folios(pfns, nd.base_pfn, nd.base_pfn + nd.total_pages, pages.state, not move_all,
                                      status, entry, heads)
        return status, heads[:n], entry
    status = np.where(pfns == ZERO_PFN, EFAULT, ENOENT).astype(np.int32)
    present = pfns >= 0
    if present.all():
        heads_all = m.pages.head[pfns]
    else:
        heads_all = np.where(present, m.pages.head[np.where(present, pfns, 0)], -1)
    on_node = present & (heads_all >= nd.base_pfn) & (heads_all < nd.base_pfn + nd.total_pages)
    status[on_node] = 0
    want = present & ~on_node
    if not move_all and want.any():
        # A folio is shared when any of its base pages is mapped more than once.
        h = heads_all[want]
        nr = m.pages.nr_pages(h)
        shared = np.maximum.reduceat(m.pages.mapcount[m.pages.expand(h)], np.concatenate(([0], np.cumsum(nr)[:-1])))
        refused = np.flatnonzero(want)[shared > 1]
        status[refused] = EACCES
        want[refused] = False
    wanted = heads_all[want] if not want.all() else heads_all
    # Each folio once, in address order: runs stay contiguous for the DMA planner. A range populated in order
    # has non-decreasing heads, where the first page of each folio is a change from its predecessor.
    if wanted.size < 2 or bool((wanted[1:] >= wanted[:-1]).all()):
        first = np.ones(wanted.size, dtype=bool)
        if wanted.size > 1:
            first[1:] = wanted[1:] != wanted[:-1]
        heads = wanted[first] if not first.all() else wanted
        rc = isolate_folios(m, heads)
        status[want] = rc if heads.size == wanted.size else rc[np.cumsum(first) - 1]
    else:
        heads = wanted[first_occurrences(wanted, m.pages.nr_pfns)]
        rc = isolate_folios(m, heads)
        order = np.argsort(heads, kind="stable")
        status[want] = rc[order[np.searchsorted(heads[order], wanted)]]
    status[want & (status == 0)] = PENDING
    return status, heads[rc == 0], None


def check_dst(m: Machine, pfns: np.ndarray, dst: np.ndarray, node: int) -> np.ndarray:
    """Validate caller-supplied NO_COPY destinations: one distinct driver-owned folio per source folio."""
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
