"""One compiled call per phase of a batch whose folios are mapped through a single VMA (the usual case).

``unmap_one_vma`` is the ASYNC unmap pass (trylock, writeback check, ``try_to_migrate``); ``move_one_vma`` is a
move pass (the reference-count freeze, ``folio_migrate_mapping`` + ``folio_migrate_flags``, the object's slots,
``remove_migration_ptes`` onto the new folios, ``migrate_folio_done``). Each strings together the per-phase
loops of :mod:`dmamig._kernels` inside one nogil call, so a batch costs a fixed handful of Python-level calls
whatever it holds. The general path in ``core.py`` (any number of VMAs, through ``vma.py`` and ``state.py``)
does the same work phase by phase and stays the reference: the tests run random migrations both ways and
compare every page, page table and object slot.
"""

from __future__ import annotations

import numpy as np

from .. import _kernels

__all__ = ["HAVE_NUMBA", "move_one_vma", "unmap_one_vma"]

HAVE_NUMBA = _kernels.HAVE_NUMBA


def _expand(heads, nr, total):
    out = np.empty(total, dtype=np.int64)
    k = 0
    for i in range(heads.size):
        for j in range(nr[i]):
            out[k] = heads[i] + j
            k += 1
    return out


def _unmap_one_vma(src, nr, locked, writeback, flags, refcount, mapcount, mapping, index, head, oid, pgoff,
                   npages, pte_pfn, pte_flags, rc):
    """Lock each folio (busy: rc 1; writeback: rc -EBUSY, lock given back) and install migration entries for
    the locked ones. Returns how many did not lock."""
    bad = trylock_folios(src, flags, locked, writeback, rc)
    ok = src if bad == 0 else src[rc == 0]
    okn = nr if bad == 0 else nr[rc == 0]
    total = 0
    for i in range(okn.size):
        total += okn[i]
    pfns = ok if total == ok.size else _expand(ok, okn, total)
    install_entries(pfns, mapping, index, head, mapcount, refcount, flags, oid, pgoff, npages, pte_pfn,
                    pte_flags)
    return bad


def _move_one_vma(old, new, nr, expected, putback_clear, lru, flags, refcount, mapcount, mapping, index,
                  private, last_cpupid, memcg, order, head, oid, obj_pfns, pgoff, npages, pte_pfn, pte_flags,
                  rc, freed):
    """Freeze-check, move and finish each folio pair; rc 0 moved, 1 busy (an extra reference: retry).

    Returns ``(frames freed into freed[:n], new folios that lost their last reference)``.
    """
    moved = 0
    total = 0
    for i in range(old.size):
        if refcount[old[i]] == expected[i]:
            rc[i] = 0
            moved += 1
            total += nr[i]
        else:
            rc[i] = 1
    if moved == 0:
        return 0, 0
    if moved == old.size:
        o, n, k = old, new, nr
    else:
        o, n, k = old[rc == 0], new[rc == 0], nr[rc == 0]
    move_object_slots(o, n, k, mapping, index, oid, obj_pfns)
    move_folio_state(o, n, k, flags, refcount, mapping, index, private, last_cpupid, memcg)
    if total == o.size:
        remove_entries(o, n, mapping, index, head, mapcount, refcount, oid, pgoff, npages, pte_pfn, pte_flags)
    else:
        remove_entries(_expand(o, k, total), _expand(n, k, total), mapping, index, head, mapcount, refcount,
                       oid, pgoff, npages, pte_pfn, pte_flags)
    dead = done_folios(o, n, k, putback_clear, lru, flags, refcount, mapcount, mapping, index, private,
                       last_cpupid, memcg, order, head, freed)
    return total, dead


if HAVE_NUMBA:
    from numba import njit

    from .._kernels import (  # noqa: F401
        done_folios,
        install_entries,
        move_folio_state,
        move_object_slots,
        remove_entries,
        trylock_folios,
    )

    _expand = njit(nogil=True, cache=True)(_expand)
    unmap_one_vma = njit(nogil=True, cache=True)(_unmap_one_vma)
    move_one_vma = njit(nogil=True, cache=True)(_move_one_vma)
else:  # pragma: no cover
    unmap_one_vma = move_one_vma = None
