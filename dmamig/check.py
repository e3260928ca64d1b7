"""Consistency checks of a whole machine: struct pages against page tables, frames against allocators.

:func:`check_machine` walks every address space's VMAs and rebuilds what each page's mapcount and each
folio's refcount must be (one per PTE, one per page-cache entry, pins, ``get_page`` references), checks that
every mapped page is reachable through the reverse map, and that every frame is either free in its node's
allocator or part of a live folio, never both and never neither. :func:`state_digest` fingerprints the
machine's state so a test can prove that a rejected call changed nothing.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from .filemap import File
from .flags import PageFlag, PteFlag
from .pages import NO_MAPPING
from .vma import rmap_walk

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["check_machine", "state_digest"]

_PRESENT = np.uint8(PteFlag.PRESENT)
_DEVICE_PRIVATE = np.uint8(PteFlag.DEVICE_PRIVATE)
_MIGRATION = np.uint8(PteFlag.MIGRATION)
# A special PTE (the shared zero page) maps no struct page: no frame, no reference, no mapcount.
_SPECIAL = np.uint8(getattr(PteFlag, "SPECIAL", 0))


def _first(pfns: np.ndarray, k: int = 8) -> list[int]:
    return np.asarray(pfns)[:k].tolist()


def check_machine(m: Machine, idle: bool = True) -> list[str]:
    """Check the machine's page state against its page tables; return the violations (empty: consistent).

    Parameters
    ----------
    m : Machine
        The machine to check; its lock is taken for the duration.
    idle : bool
        Nothing is in flight: no migration entry may remain, no folio may be locked or isolated, and every
        reference must be accounted for (PTEs, page caches, the swap cache, pins, ``get_page``). Pass ``False`` while
        migrations may run: only the checks that hold at every instant are made (mapcounts, frames, rmap).

    Returns
    -------
    list of str
        One line per kind of violation, naming the first pfns concerned.
    """
    out: list[str] = []
    with m.lock:
        pages = m.pages
        n = pages.nr_pfns
        exp_map = np.zeros(n, dtype=np.int64)
        exp_ref = np.zeros(n, dtype=np.int64)
        mapped: list[np.ndarray] = []
        ptes = 0
        for mm in m.address_spaces:
            for v in mm.vmas:
                flags, pfn = v.pte_flags, v.pte_pfn
                special = (flags & _SPECIAL) != 0
                if (special & (pfn >= 0)).any():
                    out.append(f"{v}: special PTEs (the zero page) that map a real frame")
                # A device-private entry is not present, but it maps its page as a present PTE does.
                present = ((flags & (_PRESENT | _DEVICE_PRIVATE)) != 0) & ~special
                if m.device_private:
                    dev = np.zeros(pfn.size, dtype=bool)
                    dev[pfn >= 0] = m.device_node_mask[m.nodemap.node_of(pfn[pfn >= 0])]
                    wrong = present & (dev != ((flags & _DEVICE_PRIVATE) != 0))
                    if wrong.any() or ((flags & _PRESENT) != 0)[(flags & _DEVICE_PRIVATE) != 0].any():
                        out.append(f"{v}: a device page mapped by a present PTE, or a device-private entry "
                                   f"naming a host page")
                migration = (flags & _MIGRATION) != 0
                if (present & (pfn < 0)).any() or (present & migration).any():
                    out.append(f"{v}: PTEs marked present without a page, or present and migration at once")
                if ((pfn >= 0) & ~present & ~migration).any():
                    out.append(f"{v}: PTEs hold a pfn but are neither present nor migration entries")
                if idle and migration.any():
                    out.append(f"{v}: {int(migration.sum())} migration entries left with nothing in flight")
                live = pfn[present & (pfn >= 0)]
                ptes += live.size
                np.add.at(exp_map, live, 1)
                np.add.at(exp_ref, pages.head[live], 1)
                mapped.append(live)
            for p, c in mm.mm_struct.pins.items():
                exp_ref[pages.head[p]] += c
        for obj in m.objects:
            if obj.shared:
                cached = obj.pfns[obj.pfns >= 0]
                np.add.at(exp_ref, pages.head[cached], 1)
                if isinstance(obj, File):  # a file folio's private data holds a reference (folio_attach_private)
                    exp_ref[cached[pages.test(cached, PageFlag.PRIVATE)]] += 1
        for h, c in m.page_controls.page_refs.items():
            exp_ref[h] += c
        swap = np.flatnonzero((pages.flags & np.uint32(PageFlag.SWAPCACHE)) != 0)
        swap = swap[pages.head[swap] == swap]
        exp_ref[swap] += pages.nr_pages(swap)  # the swap cache's, one per base page

        bad = np.flatnonzero(pages.mapcount != exp_map)
        if bad.size:
            out.append(f"mapcount differs from the page tables on {bad.size} pages, e.g. pfns {_first(bad)}: "
                       f"mapcount {_first(pages.mapcount[bad])}, PTEs {_first(exp_map[bad])}")
        heads = np.flatnonzero(pages.head == np.arange(n))
        live_heads = heads[pages.refcount[heads] > 0]
        if idle:
            bad = heads[pages.refcount[heads] != exp_ref[heads]]
            if bad.size:
                out.append(f"refcount differs from the references found on {bad.size} folios, e.g. pfns "
                           f"{_first(bad)}: refcount {_first(pages.refcount[bad])}, expected "
                           f"{_first(exp_ref[bad])}")
            busy = live_heads[pages.test(live_heads, PageFlag.LOCKED | PageFlag.ISOLATED)]
            if busy.size:
                out.append(f"{busy.size} folios still locked or isolated with nothing in flight, e.g. pfns "
                           f"{_first(busy)}")
        else:
            # Migrations in flight only add references (isolation) or drop a PTE's together with the PTE.
            bad = heads[pages.refcount[heads] < exp_ref[heads]]
            if bad.size:
                out.append(f"{bad.size} folios hold fewer references than their PTEs, caches and pins, e.g. "
                           f"pfns {_first(bad)}")
        neg = np.flatnonzero((pages.refcount < 0) | (pages.mapcount < 0))
        if neg.size:
            out.append(f"negative refcount or mapcount on pfns {_first(neg)}")
        dead = np.flatnonzero((exp_map > 0) & (pages.refcount[pages.head] <= 0))
        if dead.size:
            out.append(f"{dead.size} mapped pages belong to freed folios, e.g. pfns {_first(dead)}")
        out.extend(_check_frames(m, live_heads))
        if mapped:
            out.extend(_check_rmap(m, np.concatenate(mapped), ptes))
    return out


def _check_frames(m: Machine, live_heads: np.ndarray) -> list[str]:
    """Every frame is free in its allocator or in a live folio, never both, never neither."""
    out: list[str] = []
    pages = m.pages
    in_use = np.zeros(pages.nr_pfns, dtype=bool)
    in_use[pages.expand(live_heads)] = True
    for node in m.nodes:
        idx = np.arange(node.total_pages)
        used = in_use[node.base_pfn + idx]
        free = node.allocator.is_free(idx)
        both = np.flatnonzero(used & free)
        neither = np.flatnonzero(~used & ~free)
        if both.size:
            out.append(f"node {node.id}: {both.size} frames are free and in use at once, e.g. pfns "
                       f"{_first(both + node.base_pfn)}")
        if neither.size:
            out.append(f"node {node.id}: {neither.size} frames leaked (allocated, but no live folio holds "
                       f"them), e.g. pfns {_first(neither + node.base_pfn)}")
        # Allocation sets up only a folio's head and its tails' head pointers: every other field of a free
        # frame must already be in the free state (each path that frees resets first).
        pfns = node.base_pfn + np.flatnonzero(free)
        dirty = pfns[(pages.flags[pfns] != 0) | (pages.refcount[pfns] != 0) | (pages.mapcount[pfns] != 0)
                     | (pages.mapping[pfns] != NO_MAPPING) | (pages.index[pfns] != 0) | (pages.private[pfns] != 0)
                     | (pages.last_cpupid[pfns] != -1) | (pages.memcg[pfns] != 0) | (pages.order[pfns] != 0)
                     | (pages.head[pfns] != pfns)]
        if dirty.size:
            out.append(f"node {node.id}: {dirty.size} free frames hold state of a folio (not reset when freed), "
                       f"e.g. pfns {_first(dirty)}")
        if node.free_pages + int(used.sum()) != node.total_pages:
            out.append(f"node {node.id}: free {node.free_pages} + used {int(used.sum())} != size "
                       f"{node.total_pages}")
    return out


def _check_rmap(m: Machine, mapped: np.ndarray, ptes: int) -> list[str]:
    """The reverse map of every mapped page finds each of its PTEs (migration depends on it)."""
    uniq = np.unique(mapped)
    found = 0
    for _vma, slots, _pos in rmap_walk(m, uniq, int(PteFlag.PRESENT | PteFlag.DEVICE_PRIVATE)):
        found += slots.size
    if found != ptes:
        return [f"the reverse map finds {found} of the {ptes} present PTEs: some mapped pages cannot be "
                f"found from their mapping (or are found twice)"]
    return []


def state_digest(m: Machine) -> str:
    """A fingerprint of the machine's state: struct pages, page tables, free frames, frame bytes, vmstat.

    Two equal digests mean nothing observable changed (used to prove that a rejected call had no effect).
    """
    h = hashlib.blake2b(digest_size=16)
    with m.lock:
        pages = m.pages
        for name in ("flags", "refcount", "mapcount", "mapping", "index", "private", "last_cpupid", "memcg",
                     "order", "head"):
            h.update(getattr(pages, name).tobytes())
        for mm in m.address_spaces:
            h.update(repr(sorted(mm.mm_struct.pins.items())).encode())
            for v in mm.vmas:
                h.update(f"{v.start}:{v.npages}:{v.pgoff}:{v.obj.id}".encode())
                h.update(v.pte_pfn.tobytes())
                h.update(v.pte_flags.tobytes())
        for node in m.nodes:
            h.update(node.allocator.is_free(np.arange(node.total_pages)).tobytes())
            h.update(m.frames.read_pfns(node.base_pfn + np.arange(node.total_pages)).tobytes())
        h.update(repr(sorted(m.vmstat.items())).encode())
    return h.hexdigest()
