"""mprotect and mremap, after the kernel's ``mm/mprotect.c`` and ``mm/mremap.c``.

Both work on VMAs whose pages may be under migration right now, and neither waits for it, as in the kernel:

- ``mprotect_fixup`` leaves a VMA whose rights do not change alone: no split, no page-table walk. The others
  are split at the range's ends, their PTE bits rewritten in place (``change_pte_range``), and VMAs that
  continue each other are merged again (``vma_merge``). Dropping write access clears the write bit of
  present PTEs. A writable migration entry becomes a readable (exclusive) one on any change of rights, write
  kept or not (``make_readable_exclusive_migration_entry``: the walk does not check the new rights against
  the entry), so a migration that finishes afterwards maps its new page read-only until a write fault.
  Granting write access sets no bit: the next write faults, and the fault reuses or copies the page as
  copy-on-write demands.
- ``move_vma`` moves a VMA, page table and all, to a new address. The rmap finds a page by its object and
  index, never by its address, so pages keep their frames and a migration in flight still finds its
  migration entries to restore. Shrinking unmaps the tail without waiting for migrations there: its
  migration entries are dropped (``zap_pte_range``), and those migrations finish with no PTE to restore.
  A private mapping grows with untouched pages; a shared one maps more pages of its memory object, and may
  not grow past the object's end (where the kernel would raise SIGBUS on access).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AddressFault, InvalidArgument
from .flags import Prot, PteFlag
from .mmap import get_unmapped_area, unmap_range
from .vma import Vma

if TYPE_CHECKING:
    from .mm_struct import MmStruct

__all__ = ["change_protection", "move_vma"]

_NOT_WRITE = np.uint8(~np.uint8(PteFlag.WRITE))
_MIGRATION = np.uint8(PteFlag.MIGRATION)


def _check_prot(prot: Any) -> Prot:
    if isinstance(prot, bool) or not isinstance(prot, (int, np.integer)) or not 0 <= int(prot) <= 3:
        raise InvalidArgument(f"prot must be Prot.NONE, Prot.READ, Prot.WRITE or Prot.READ | Prot.WRITE "
                              f"(0 to 3), got {prot!r}")
    return Prot(int(prot))


def _split_range(mm: MmStruct, addr: int, end: int, prot: Prot | None = None) -> list[Vma]:
    """Split VMAs so that ``[addr, end)`` is covered by whole VMAs; return them (caller holds the lock).

    With ``prot``, VMAs that have those rights already are neither split nor returned (``mprotect_fixup``).
    Raises AddressFault, with nothing split, when part of the range is not mapped.
    """
    segs = mm.segments(addr, end - addr)
    out = []
    for v, s0, s1 in segs:
        if prot is not None and v.prot == prot:
            continue
        if s0 == 0 and s1 == v.npages:
            out.append(v)
            continue
        inner = v.slice(s0, s1)
        mm.replace(v, [p for p in ([v.slice(0, s0)] if s0 else []) + [inner]
                        + ([v.slice(s1, v.npages)] if s1 < v.npages else [])])
        out.append(inner)
    return out


def change_protection(mm: MmStruct, addr: int, length: int, prot: Any) -> None:
    """``AddressSpace.mprotect``: set the rights of every VMA of the range, splitting VMAs at its ends."""
    mm.check_open()
    addr, length = mm.check_range(addr, length, aligned=True)
    prot = _check_prot(prot)
    ps = mm.machine.page_size
    end = addr + -(-length // ps) * ps
    with mm.machine.changed:
        vmas = _split_range(mm, addr, end, prot)
        if not vmas:
            return  # mprotect_fixup: no VMA's rights change
        for v in vmas:
            v.prot = prot
            _change_pte_range(v, prot)
        _merge_around(mm, addr, end)
        mm.machine.changed.notify_all()


def _change_pte_range(v: Vma, prot: Prot) -> None:
    """``change_pte_range`` over a whole VMA whose rights changed to ``prot``."""
    if not prot & Prot.WRITE:
        v.pte_flags &= _NOT_WRITE
        return
    # Write stays allowed, but a writable migration entry still becomes readable: the walk makes every one
    # readable rather than check the new rights. The migrated page is mapped read-only; a write faults and,
    # the page being exclusive, gets its write bit back without a copy.
    flags = v.pte_flags
    entries = (flags & _MIGRATION) != 0
    flags[entries] &= _NOT_WRITE


def _mergeable(a: Vma, b: Vma) -> bool:
    """``is_mergeable_vma``: ``b`` continues ``a`` in address, object, offset and rights."""
    return (a.end == b.start and a.obj is b.obj and a.chain == b.chain and a.prot == b.prot
            and a.pgoff + a.npages == b.pgoff)


def _merge_around(mm: MmStruct, addr: int, end: int) -> None:
    """``vma_merge``: join the VMAs of ``[addr, end)`` and their neighbours that continue each other."""
    near = [v for v in mm.vmas if v.end >= addr and v.start <= end]
    run = near[:1]
    for v in near[1:] + [None]:
        if v is not None and _mergeable(run[-1], v):
            run.append(v)
            continue
        if len(run) > 1:
            first = run[0]
            merged = Vma(mm, first.start, sum(r.npages for r in run), first.obj, first.pgoff,
                         np.concatenate([r.pte_pfn for r in run]), np.concatenate([r.pte_flags for r in run]),
                         first.prot, first.chain)
            for r in run[1:]:
                mm.replace(r, [])
            mm.replace(first, [merged])
        run = [v]


def _check_len(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise InvalidArgument(f"{name} must be a positive integer (bytes), got {v!r}")
    return int(v)


def move_vma(mm: MmStruct, old_addr: int, old_len: int, new_len: int, may_move: bool) -> int:
    """``AddressSpace.mremap``: shrink, grow in place, or move the range to a fresh address."""
    mm.check_open()
    old_addr, old_len = mm.check_range(old_addr, old_len, aligned=True)
    new_len = _check_len("new_len", new_len)
    m = mm.machine
    ps = m.page_size
    old_n, new_n = -(-old_len // ps), -(-new_len // ps)
    with m.changed:
        segs = mm.segments(old_addr, old_n * ps)
        if len(segs) != 1:
            raise AddressFault(f"mremap: [{old_addr:#x}, {old_addr + old_n * ps:#x}) spans {len(segs)} "
                               f"mappings; it must lie inside one")
        if new_n < old_n:
            unmap_range(mm, old_addr + new_n * ps, old_addr + old_n * ps, wait=False)
            m.changed.notify_all()
            return old_addr
        if new_n == old_n:
            return old_addr
        old_end = old_addr + old_n * ps
        v = segs[0][0]
        if v.shared and v.pgoff + (old_addr - v.start) // ps + new_n > v.obj.pfns.size:
            raise InvalidArgument(f"mremap: a shared mapping cannot grow past the end of its memory object "
                                  f"({v.obj.pfns.size} pages): {new_len} bytes from {old_addr:#x} would")
        in_place = old_end == segs[0][0].end and _free(mm, old_end, old_end + (new_n - old_n) * ps)
        if not in_place and not may_move:
            raise InvalidArgument(f"mremap: cannot grow {old_addr:#x} to {new_len} bytes in place (the "
                                  f"addresses after it are mapped); pass may_move=True to let it move")
        (vma,) = _split_range(mm, old_addr, old_end)
        if in_place:
            _resize(mm, vma, new_n)
            return old_addr
        # The page table moves with the VMA: same slots, same pfns, same migration entries.
        mm.relocate(vma, get_unmapped_area(mm, new_n, vma.obj.order))
        _resize(mm, vma, new_n)
        m.changed.notify_all()
        return vma.start


def _free(mm: MmStruct, start: int, end: int) -> bool:
    """Whether no VMA overlaps ``[start, end)``, leaving a guard page after it."""
    guard = end + mm.machine.page_size
    return not any(v.start < guard and v.end > start for v in mm.vmas)


def _resize(mm: MmStruct, vma: Vma, npages: int) -> None:
    """Grow ``vma`` to ``npages`` slots, the new ones empty; a private VMA's object grows to cover them."""
    extra = npages - vma.npages
    vma.pte_pfn = np.concatenate([vma.pte_pfn, np.full(extra, -1, np.int64)])
    vma.pte_flags = np.concatenate([vma.pte_flags, np.zeros(extra, np.uint8)])
    vma.npages = npages
    vma.obj.grow(vma.pgoff + npages)
    mm.highest_vm_end = max(mm.highest_vm_end, vma.end + mm.machine.page_size)
