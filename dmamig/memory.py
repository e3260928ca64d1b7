"""Page faults, after the kernel's ``mm/memory.c``: what a CPU access does to a VMA's page table.

- A read fault on an untouched slot of a private mapping maps the shared zero page (``do_anonymous_page``):
  a present, read-only, special PTE with pfn ``ZERO_PFN``. It takes no frame, no reference and no mapcount,
  so node accounting does not change; reads return zeros.
- A write fault on an untouched or zero-page slot allocates a zeroed page (whole large folios where the folio
  lies inside the VMA and none of its slots holds a page), as ``do_anonymous_page`` and the zero-page COW do.
- A write fault on a present private page without the write bit is ``do_wp_page``: the page is reused (the
  write bit comes back) when this PTE is its only user; otherwise it is copied into a new page for the writer
  alone (``wp_page_copy``) and the others keep the old one. Fork leaves private pages this way in both
  processes.
- Shared mappings look pages up in their object's page cache and never copy (``do_shared_fault``).

Every function here runs with ``machine.lock`` held, on slots that hold no migration entry (the caller
waited), and is vectorized over a slot range.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from . import page_loops
from .errors import AddressFault, OutOfMemory
from .filemap import File, vma_file
from .flags import MigrateMode, MigrateReason, MigrateVmaSelect, PageFlag, PteFlag
from .migrate.core import MigrationRequest, run_migration
from .migrate.device import MigrateVma
from .migrate.isolate import collect_folios
from .mm_struct import segment_pfns
from .vma import NO_PFN, ZERO_PFN, folio_free_swap, forget_anon_slots, free_swap_cache, map_pages

if TYPE_CHECKING:
    from .machine import Machine
    from .mm_struct import MmStruct
    from .vma import Vma

__all__ = ["DEFAULT_MEMCG", "MIGRATE_TO_RAM_TRIES", "access_pfns", "check_access", "device_pfns",
           "do_device_private_fault", "fault", "fault_absent", "fault_device_private", "migrate_to_ram",
           "read_pages", "wp_pages", "write_pages"]

#: memcg id given to pages faulted by address spaces (one cgroup for the emulated machine).
DEFAULT_MEMCG = 1
# Flags of a freshly faulted anonymous or shared-memory page.
_NEW_PAGE_FLAGS = PageFlag.UPTODATE | PageFlag.LRU | PageFlag.SWAPBACKED
_ZERO_PTE = np.uint8(PteFlag.PRESENT | PteFlag.YOUNG | PteFlag.SPECIAL)
_WRITE = np.uint8(PteFlag.WRITE)


def check_access(vma: Vma, addr: int, write: bool) -> None:
    """Raise AddressFault when ``vma``'s rights forbid the access (the kernel's SIGSEGV, ``-EFAULT``)."""
    if write and not vma.writable:
        raise AddressFault(f"write at {addr:#x}: the mapping {vma.start:#x}-{vma.end:#x} is not writable "
                           f"(prot {vma.prot!r}); mprotect it with Prot.WRITE first")
    if not vma.readable:
        raise AddressFault(f"access at {addr:#x}: the mapping {vma.start:#x}-{vma.end:#x} has prot "
                           f"{vma.prot!r}; mprotect it with Prot.READ first")


def fault(mm: MmStruct, vma: Vma, s0: int, s1: int, node: int, write: bool) -> None:
    """Handle a fault on every slot of ``[s0, s1)`` that needs one; new pages go on ``node``.

    ``write`` asks for pages this VMA owns alone (a write, a pin, populate of a writable mapping): absent and
    zero-page slots get new pages and copy-on-write pages are broken. The write bit is granted only where the
    VMA is writable. Raises OutOfMemory when ``node`` is short of frames: no page is half made, though slots
    faulted before the shortage (absent ones, when copy-on-write pages then find no frame) stay mapped.
    """
    if vma.shared:
        fault_absent(mm, vma, s0 + np.flatnonzero(vma.pte_pfn[s0:s1] == NO_PFN), node)
        if write and vma.writable:
            # Shared pages are never copied: a write fault only restores the write bit (wp_page_shared).
            vma.pte_flags[s0:s1] |= np.where(vma.pte_pfn[s0:s1] >= 0, _WRITE, np.uint8(0)).astype(np.uint8)
        return
    pfns = vma.pte_pfn[s0:s1]
    file = vma_file(vma) if mm.machine.page_cache.files else None
    if file is not None:
        # A private file mapping reads the page cache: its pages are mapped read-only, and a write copies
        # them below like any copy-on-write page (do_read_fault, then do_cow_fault's copy).
        empty = s0 + np.flatnonzero(pfns == NO_PFN)
        if empty.size:
            idx = vma.pgoff + empty
            file.check_index(idx, f"fault at {vma.start + int(empty[0]) * mm.machine.page_size:#x}")
            map_pages(mm.machine, vma, empty, file.find_or_read(idx, node))
            vma.pte_flags[empty] &= ~_WRITE
            mm.machine.count_event("pgfault", empty.size)
            pfns = vma.pte_pfn[s0:s1]
        if not write:
            return
    if not write:
        if page_loops.HAVE_NUMBA and page_loops.first_at(vma.pte_pfn, s0, s1, NO_PFN) < 0:
            return  # every slot maps something: a read faults nowhere (the usual access)
        empty = s0 + np.flatnonzero(pfns == NO_PFN)
        if empty.size:
            vma.pte_pfn[empty] = ZERO_PFN
            vma.pte_flags[empty] = _ZERO_PTE
            mm.machine.count_event("pgfault", empty.size)
        return
    if page_loops.HAVE_NUMBA and page_loops.first_unwritable(vma.pte_pfn, vma.pte_flags, s0, s1, _WRITE) < 0:
        return  # every slot maps a page it may write: a write faults nowhere (the usual access)
    absent = s0 + np.flatnonzero(pfns < 0)
    wp = s0 + np.flatnonzero((pfns >= 0) & ((vma.pte_flags[s0:s1] & _WRITE) == 0))
    if absent.size:
        fault_absent(mm, vma, absent, node)
    if wp.size:
        wp_pages(mm, vma, wp, node)


def fault_absent(mm: MmStruct, vma: Vma, slots: np.ndarray, node: int) -> None:
    """Fault in ``slots`` (empty or zero-page): page-cache hits for shared memory, else new zeroed pages."""
    if slots.size == 0:
        return
    m, pages, obj = mm.machine, mm.machine.pages, vma.obj
    if isinstance(obj, File):
        # A shared file mapping: the page cache has every page, read from disk where it had none.
        obj.check_index(vma.pgoff + slots, f"fault at {vma.start + int(slots[0]) * m.page_size:#x}")
        obj.find_or_read(vma.pgoff + slots, node)
    if obj.shared:
        cached = obj.pfns[vma.pgoff + slots]
        hit = cached >= 0
        if hit.any():
            map_pages(mm.machine, vma, slots[hit], cached[hit])
        slots = slots[~hit]
        if slots.size == 0:
            return
    idx = vma.pgoff + slots
    folio_heads, base_idx = _plan_folios(vma, idx)
    order = obj.order
    big = m.frames.alloc_folios(node, folio_heads.size, order) if folio_heads.size else np.empty(0, np.int64)
    # Folios that found no contiguous block fall back to base pages, as a THP fault does.
    fallback = folio_heads[big.size:]
    if fallback.size:
        base_idx = np.sort(np.concatenate([base_idx, (fallback[:, None] + np.arange(1 << order)).ravel()]))
    small = m.frames.alloc_folios(node, base_idx.size, 0)
    if small.size < base_idx.size:
        m.frames.free_folios(np.concatenate([big, small]))
        raise OutOfMemory(f"node {node} is out of free pages: {base_idx.size + (big.size << order)} needed "
                          f"for a fault at {vma.start + int(slots[0]) * m.page_size:#x}, "
                          f"{m.nodes[node].free_pages} free")
    new_idx = np.concatenate([(folio_heads[: big.size, None] + np.arange(1 << order)).ravel(), base_idx]) \
        if big.size else base_idx
    new_pfns = np.concatenate([pages.expand(big), small]) if big.size else small
    heads = np.concatenate([big, small])
    m.frames.zero_pfns(new_pfns)
    _prep_pages(mm, vma, new_pfns, heads, new_idx)
    if obj.shared:
        m.page_cache.shmem_added(new_pfns)  # nr_file_pages and nr_shmem of their nodes
    # The allocation reference becomes the page cache's (one per base page) for shared memory; for
    # anonymous memory the PTEs' references are the only ones.
    pages.refcount[heads] = pages.nr_pages(heads) if obj.shared else 0
    m.count_event("pgfault", new_pfns.size)
    map_pages(mm.machine, vma, new_idx - vma.pgoff, new_pfns)


def _prep_pages(mm: MmStruct, vma: Vma, pfns: np.ndarray, heads: np.ndarray, idx: np.ndarray) -> None:
    """Make new pages ``pfns`` (folio ``heads``) pages ``idx`` of the VMA's own object."""
    pages, obj = mm.machine.pages, vma.obj
    pages.mapping[pfns] = obj.id
    pages.index[pfns] = idx
    pages.set(heads, _NEW_PAGE_FLAGS)
    pages.memcg[heads] = DEFAULT_MEMCG
    obj.pfns[idx] = pfns


def _plan_folios(vma: Vma, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split missing object indices into whole large folios (their first index) and base pages.

    A folio is allocated whole when it lies inside the VMA and none of its slots holds a page (empty and
    zero-page slots both qualify); the page cache decides for shared memory.
    """
    order = vma.obj.order
    if order == 0:
        return np.empty(0, np.int64), idx
    nr = 1 << order
    first = np.unique(idx >> order) << order
    inside = (first >= vma.pgoff) & (first + nr <= vma.pgoff + vma.npages)
    first = first[inside]
    if first.size:
        members = first[:, None] + np.arange(nr)
        if vma.shared:
            empty = (vma.obj.pfns[members] == NO_PFN).all(axis=1)
        else:
            empty = (vma.pte_pfn[members - vma.pgoff] < 0).all(axis=1)
        first = first[empty]
    in_folio = np.isin(idx >> order, first >> order)
    return first, idx[~in_folio]


def wp_pages(mm: MmStruct, vma: Vma, slots: np.ndarray, node: int) -> None:
    """``do_wp_page`` on present private pages without the write bit: reuse where exclusive, else copy."""
    m, pages = mm.machine, mm.machine.pages
    old = vma.pte_pfn[slots]
    reuse = pages.mapcount[old] == 1
    if reuse.any():
        cand = np.flatnonzero(reuse)
        ok = _only_ptes_and_own_pins(mm, pages.head[old[cand]])
        reuse[cand] = ok
        # wp_can_reuse_anon_folio: a page the writer alone holds leaves the swap cache (folio_free_swap).
        folio_free_swap(m, pages.head[old[cand[ok]]])
    if vma.writable:
        vma.pte_flags[slots[reuse]] |= _WRITE
    slots, old = slots[~reuse], old[~reuse]
    if slots.size == 0:
        return
    new = m.frames.alloc_folios(node, slots.size, 0)
    if new.size < slots.size:
        m.frames.free_folios(new)
        raise OutOfMemory(f"node {node} is out of free pages: {slots.size} needed to copy shared pages for a "
                          f"write at {vma.start + int(slots[0]) * m.page_size:#x}, {m.nodes[node].free_pages} "
                          f"free")
    m.frames.copy_pages(old, new)
    _prep_pages(mm, vma, new, new, vma.pgoff + slots)
    pages.refcount[new] = 0  # the PTE's reference, taken below, is the only one
    # The old page loses this PTE; the other mappers keep it (and free it when the last one goes).
    np.subtract.at(pages.mapcount, old, 1)
    forget_anon_slots(m, old)
    free_swap_cache(m, pages.head[old])
    m.frames.put_folios(pages.head[old])
    vma.pte_pfn[slots] = NO_PFN
    map_pages(mm.machine, vma, slots, new)
    m.count_event("pgfault", slots.size)


def _only_ptes_and_own_pins(mm: MmStruct, heads: np.ndarray) -> np.ndarray:
    """Whether each folio's references are its PTEs', this address space's pins and the swap cache's, nothing
    else.

    An extra reference (a migration's isolation, a speculative ``get_page``) may be a reader the writer must
    not disturb, so such a page is copied, as ``wp_can_reuse_anon_folio`` refuses it. So is a locked folio in
    the swap cache, which cannot leave it now.
    """
    pages = mm.machine.pages
    u, inv = np.unique(heads, return_inverse=True)
    nr = pages.nr_pages(u)
    if (nr == 1).all():
        mapped = pages.mapcount[u].astype(np.int64)
    else:
        starts = np.concatenate(([0], np.cumsum(nr)[:-1]))
        mapped = np.add.reduceat(pages.mapcount[pages.expand(u)].astype(np.int64), starts)
    pinned = np.zeros(u.size, dtype=np.int64)
    if mm.pins:
        keys = np.fromiter(mm.pins.keys(), dtype=np.int64, count=len(mm.pins))
        vals = np.fromiter(mm.pins.values(), dtype=np.int64, count=len(mm.pins))
        ph = pages.head[keys]
        pos = np.minimum(np.searchsorted(u, ph), u.size - 1)
        hit = u[pos] == ph
        np.add.at(pinned, pos[hit], vals[hit])
    swap = pages.test(u, PageFlag.SWAPCACHE)
    if not swap.any():
        return (pages.refcount[u] - mapped == pinned)[inv]
    ok = (pages.refcount[u] - mapped == pinned + np.where(swap, nr, 0)) & ~(swap & pages.test(u, PageFlag.LOCKED))
    return ok[inv]


# -- the access path of read and write ---------------------------------------------------------------------------
#: How many times an access tries to bring device pages back before accessing them in place.
MIGRATE_TO_RAM_TRIES = 3


def access_pfns(mm: MmStruct, addr: int, length: int, write: bool) -> np.ndarray:
    """Fault the range in on the host and bring device pages back (``migrate_to_ram``); return its pfns.

    A read maps the zero page where nothing is mapped (``ZERO_PFN`` in the result); a write gets pages of its
    own. A device-private page is a non-present entry: the CPU fault on it runs its owner's ``migrate_to_ram``
    (:func:`do_device_private_fault`) before anything else is done to the slot, as ``do_swap_page`` does.
    Device-coherent pages that cannot come back (pinned, host full) are accessed in place; device-private
    ones cannot be, and the access fails (the kernel's ``SIGBUS``). The caller holds ``machine.changed``, and
    on return the range holds no migration entry.
    Raises AddressFault when the mapping's rights forbid the access or a device-private page cannot come back.
    """
    m = mm.machine
    for attempt in range(MIGRATE_TO_RAM_TRIES + 1):
        segs = mm.wait_migrations(addr, length)
        for v, _s0, _s1 in segs:
            check_access(v, max(addr, v.start), write)
        if m.device_private:
            remote = device_pfns(m, segment_pfns(segs))
            if remote.size:
                if attempt == MIGRATE_TO_RAM_TRIES:
                    _cannot_come_back(m, addr, remote)
                fault_device_private(mm, segs)
                continue
        for v, s0, s1 in segs:
            fault(mm, v, s0, s1, 0, write)
        pfns = segment_pfns(segs)
        remote = device_pfns(m, pfns)
        if remote.size == 0 or m.device_private:
            return pfns
        if attempt == MIGRATE_TO_RAM_TRIES:
            return pfns
        migrate_to_ram(mm, remote)
    return pfns


def device_pfns(m: Machine, pfns: np.ndarray) -> np.ndarray:
    """The pfns of ``pfns`` that are device pages."""
    if page_loops.HAVE_NUMBA:  # every access asks: one pass, not five numpy steps
        out = np.empty(pfns.size, dtype=np.int64)
        return out[:page_loops.on_nodes(pfns, m.nodemap.node_table, m.device_node_mask, out)]
    return pfns[(pfns >= 0) & m.device_node_mask[m.nodemap.node_of(np.maximum(pfns, 0))]]


def _cannot_come_back(m: Machine, addr: int, pfns: np.ndarray) -> None:
    raise AddressFault(f"access at {addr:#x}: {pfns.size} device-private pages could not migrate back to host "
                       f"memory ({m.nodes[0].free_pages} host pages free); the CPU cannot address device-private "
                       f"memory, so the access fails (SIGBUS)")


def fault_device_private(mm: MmStruct, segs: list[tuple[Vma, int, int]]) -> int:
    """CPU faults on every device-private entry of ``segs``, one fault per page, in address order.

    Returns how many of the faulting pages came back. The lock is held once on entry and on exit.
    """
    m = mm.machine
    back = 0
    for v, s0, s1 in segs:
        slots = s0 + np.flatnonzero(v.pte_pfn[s0:s1] >= 0)
        slots = slots[m.device_node_mask[m.nodemap.node_of(v.pte_pfn[slots])]]
        for slot in slots.tolist():
            # An earlier fault may have changed this slot (a whole folio came back, or the VMA went).
            if v not in mm.vmas or v.pte_pfn[slot] < 0:
                continue
            back += do_device_private_fault(mm, v.start + slot * m.page_size)
    return back


def do_device_private_fault(mm: MmStruct, addr: int) -> int:
    """``do_swap_page`` on a device-private entry: run the page owner's ``migrate_to_ram`` on the faulting page.

    As the kernel, the handler takes the page lock with a trylock (a page locked by someone else, such as a
    migration, makes the fault return without doing anything: the access faults again) and a reference on the
    page, then calls the owner's ``migrate_to_ram``: here the test driver's (``dmirror_devmem_fault``), a
    :class:`~dmamig.MigrateVma` of the one faulting page to host memory with ``fault_page`` set, selecting
    device-private pages of that owner. It is device migration (``migrate_device.c``): it counts
    ``migrate_vma_success`` / ``migrate_vma_fail``, never ``pgmigrate_*``, and records no migration event.
    vmstat ``migrate_to_ram`` counts the faults that ran the handler. The lock is held once on entry and on
    exit and dropped while the migration runs. Returns 1 when the page came back, else 0.
    """
    m = mm.machine
    pages = m.pages
    ps = m.page_size
    ((v, slot, _s1),) = mm.segments(addr, ps)
    pfn = int(v.pte_pfn[slot])
    if pfn < 0 or not m.device_node_mask[int(m.nodemap.node_of(np.array([pfn]))[0])]:
        return 0
    head = int(pages.head[pfn])
    if v.shared or np.isin(pages.mapping[head], m.callback_object_ids):
        # The kernel never has a shared-memory or page-cache page in device-private memory (migrate_vma takes
        # anonymous memory only); this emulator's migrate_pages() can put one there, and brings it back the
        # same way (a private file mapping maps page-cache folios too, until it writes them).
        return int(migrate_to_ram(mm, pages.expand(np.array([head]))) > 0)
    if pages.test(np.array([head]), PageFlag.LOCKED)[0]:
        return 0  # trylock_page failed: the fault returns and the access retries
    pages.set(np.array([head]), PageFlag.LOCKED)
    pages.refcount[head] += 1  # get_page
    owner = m.nodes[int(m.nodemap.node_of(np.array([pfn]))[0])].owner
    start = addr - addr % ps
    end = start + ps
    flags = MigrateVmaSelect.DEVICE_PRIVATE
    if pages.order[head]:
        # A large device folio migrates whole where the VMA maps it whole (else setup() splits it first).
        start = max(start - (pfn - head) * ps, v.start)
        end = min(start + (int(pages.nr_pages(np.array([head]))[0]) * ps), v.end)
        flags |= MigrateVmaSelect.COMPOUND
    m.count_event("migrate_to_ram")
    mv = MigrateVma(mm, start, end, 0, flags=flags, pgmap_owner=owner, fault_page=head)
    m.lock.release()
    try:
        with mv:
            if mv.setup():  # nothing collected (pinned, gone): leaving the block ends the migration
                mv.alloc_and_copy()
                mv.pages()
                mv.finalize()
    finally:
        m.lock.acquire()
        pages.clear(np.array([head]), PageFlag.LOCKED)  # unlock_page
        m.frames.put_folios(np.array([head]))  # put_page: frees the source once it migrated
        m.changed.notify_all()
    return int(mv.status[(addr - start) // ps] == 0)


def migrate_to_ram(mm: MmStruct, pfns: np.ndarray, reason: MigrateReason | None = None) -> int:
    """Migrate the folios of device-coherent pages ``pfns`` back to host RAM with the ``migrate_pages()`` core.

    A CPU access to coherent device memory that brings it back (the emulator's choice: the kernel accesses
    coherent memory in place), or a long-term pin (``reason`` ``MR_LONGTERM_PIN``, a ``migrate_pages()``
    call in the kernel too). The lock is held once (not nested) on entry and on exit, and dropped while the
    migration runs. Every mapper's PTE follows the page (the rmap finds them all), so no ``move_all`` check
    applies. ``reason`` ``None`` records no migration event. Returns how many of ``pfns`` migrated.
    """
    m = mm.machine
    t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    status, heads = collect_folios(m, pfns, 0)
    m.count_event("migrate_to_ram", int(m.pages.nr_pages(heads).sum()) if heads.size else 0)
    m.lock.release()
    try:
        res = run_migration(m, MigrationRequest(heads=heads, node=0, mode=MigrateMode.SYNC, pfns=pfns, status=status,
                                                t_thread=t_thread, t_wall=t_wall, reason=reason))
    finally:
        m.lock.acquire()
    return int(res.nr_succeeded)


def write_pages(m: Machine, pfns: np.ndarray, off: int, buf: np.ndarray) -> None:
    """Store ``buf`` at byte ``off`` of the first of the frames ``pfns``, which it spans: pages it covers only
    in part are read first, so their other bytes stay (caller holds the lock)."""
    ps = m.page_size
    partial = off or (off + buf.size) % ps
    frames = m.frames.read_pfns(pfns) if partial else np.empty((pfns.size, ps), dtype=np.uint8)
    frames.reshape(-1)[off: off + buf.size] = buf
    m.frames.write_pfns(pfns, frames)


def read_pages(m: Machine, pfns: np.ndarray) -> np.ndarray:
    """Contents of ``pfns``, zero-page entries as zeros: ``(len(pfns), page_size)`` uint8."""
    if page_loops.HAVE_NUMBA and page_loops.first_outside(pfns, m.pages.nr_pfns) < 0:
        return m.frames.read_pfns(pfns)  # no zero-page entry: one pass says so
    real = pfns >= 0
    if real.all():
        return m.frames.read_pfns(pfns)
    out = np.zeros((pfns.size, m.page_size), dtype=np.uint8)
    if real.any():
        out[real] = m.frames.read_pfns(pfns[real])
    return out
