"""Vectorized state transfer: the kernel's ``folio_migrate_mapping`` and ``folio_migrate_flags``.

Both run over a whole batch of (old, new) folio heads at once; no Python code runs per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import page_loops
from ..array_ops import distinct
from ..flags import MIGRATE_COPIED_FLAGS, MIGRATE_MOVED_FLAGS, PageFlag

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = ["COPIED_FLAGS", "migrate_folio", "migrate_folio_mapping", "migrate_folio_states"]

#: Flags copied from the old folio to the new one as they are (``folio_migrate_flags``).
COPIED_FLAGS = MIGRATE_COPIED_FLAGS
_MOVED_ON_OLD = MIGRATE_MOVED_FLAGS
#: Use the compiled loops of ``page_loops`` (numba); the numpy code below is the reference and the fallback.
USE_LOOPS = page_loops.HAVE_NUMBA


def _u32(flag: PageFlag) -> np.uint32:
    return np.uint32(int(flag))


def migrate_folio_mapping(m: Machine, old: np.ndarray, new: np.ndarray) -> None:
    """Move mapping, index and the object's slots (the xarray entries) from ``old`` to ``new`` folios.

    The new folio takes over the old one's references except those of its PTEs (which the migration
    entries dropped and ``remove_migration_entries`` adds back): the isolation reference and, for
    shared-memory pages, the page cache's.
    """
    pages = m.pages
    old_pfns = pages.expand(old)
    new_pfns = pages.expand(new)
    pages.mapping[new_pfns] = pages.mapping[old_pfns]
    pages.index[new_pfns] = pages.index[old_pfns]
    # The old folio's references replace the new one's allocation reference; references a pfn walker took on
    # the new folio since it was allocated stay (their holders will drop them).
    pages.refcount[new] += pages.refcount[old] - 1
    pages.refcount[old] = 1  # the migration core's own reference, dropped when the old folio is freed
    swapbacked = pages.test(old, PageFlag.SWAPBACKED)
    pages.set(new[swapbacked], PageFlag.SWAPBACKED)
    mapping = pages.mapping[old_pfns]
    for oid in distinct(mapping[mapping >= 0]):
        sel = mapping == oid
        obj = m.object(oid)
        idx = pages.index[old_pfns[sel]]
        # Only slots that still hold the old page move (a munmapped private slot stays empty).
        hit = obj.pfns[idx] == old_pfns[sel]
        obj.pfns[idx[hit]] = new_pfns[sel][hit]


def migrate_folio_states(m: Machine, old: np.ndarray, new: np.ndarray) -> None:
    """Transfer the page state of ``old`` folios to ``new`` ones (``folio_migrate_flags``).

    Copied: error, referenced, uptodate, workingset, checked, mappedtodisk, dirty, young, idle, mlocked,
    reclaim. Moved (test-and-clear on the old folio): active, else unevictable. ``last_cpupid`` is exchanged
    (the old folio gets -1), swapcache and private move to the new folio and are cleared on the old one (private
    data moves with ``PG_private``), writeback is ended on the new folio, and the memcg moves.
    """
    pages = m.pages
    of = pages.flags[old]
    nf = pages.flags[new] | (of & _u32(COPIED_FLAGS))
    active = (of & _u32(PageFlag.ACTIVE)) != 0
    unevictable = ~active & ((of & _u32(PageFlag.UNEVICTABLE)) != 0)
    nf[active] |= _u32(PageFlag.ACTIVE)
    nf[unevictable] |= _u32(PageFlag.UNEVICTABLE)
    private = (of & _u32(PageFlag.PRIVATE)) != 0
    nf[private] |= _u32(PageFlag.PRIVATE)
    nf |= of & _u32(PageFlag.SWAPCACHE)  # folio_migrate_mapping: the swap cache entry moves to the new folio
    nf &= ~_u32(PageFlag.WRITEBACK)
    pages.flags[new] = nf
    pages.private[new] = np.where(private, pages.private[old], pages.private[new])
    pages.private[old] = 0
    pages.flags[old] = of & ~_u32(_MOVED_ON_OLD)
    pages.last_cpupid[new] = pages.last_cpupid[old]
    pages.last_cpupid[old] = -1
    pages.memcg[new] = pages.memcg[old]
    pages.memcg[old] = 0


def migrate_folio(m: Machine, old: np.ndarray, new: np.ndarray, nr: np.ndarray) -> None:
    """Move mapping and state from ``old`` to ``new`` folios of ``nr`` base pages each (no data copy)."""
    if not USE_LOOPS:
        migrate_folio_mapping(m, old, new)
        migrate_folio_states(m, old, new)
        return
    pages = m.pages
    # The object slots first: they are found through the old pages' mapping and index.
    for oid in distinct(pages.mapping[old]):
        if oid >= 0:
            page_loops.move_object_slots(old, new, nr, pages.mapping, pages.index, oid, m.object(oid).pfns)
    page_loops.move_folio_state(old, new, nr, pages.flags, pages.refcount, pages.mapping, pages.index,
                              pages.private, pages.last_cpupid, pages.memcg)
