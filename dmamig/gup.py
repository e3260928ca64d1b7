"""Pins, after the kernel's ``mm/gup.c``: long-lived references on the pages of a range.

An address space records its pins per base pfn (``AddressSpace._pins``) and holds one folio reference per
pin. A pinned private page is always the address space's own (``pin_user_pages`` unshares copy-on-write
pages and never pins the zero page), which is what lets fork copy it instead of sharing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgument
from .memory import check_access, fault

if TYPE_CHECKING:
    from .mm import AddressSpace

__all__ = ["drop_pins", "pin_range", "unpin_range"]


def pin_range(mm: AddressSpace, addr: int, length: int) -> None:
    """``AddressSpace.pin``: fault the range in as the address space's own pages and pin each one."""
    mm._check_open()
    addr, length = mm._check_range(addr, length, aligned=True)
    m = mm.machine
    with m.changed:
        segs = mm._wait_migrations(addr, length)
        for v, _s0, _s1 in segs:
            check_access(v, max(addr, v.start), write=False)
        for v, s0, s1 in segs:
            fault(mm, v, s0, s1, 0, write=True)
        pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])
        np.add.at(m.pages.refcount, m.pages.head[pfns], 1)
        for p in pfns.tolist():
            mm._pins[p] = mm._pins.get(p, 0) + 1


def unpin_range(mm: AddressSpace, addr: int, length: int) -> None:
    """``AddressSpace.unpin``: drop one pin on each page of the range; refuses pages it has not pinned."""
    mm._check_open()
    addr, length = mm._check_range(addr, length, aligned=True)
    m = mm.machine
    with m.changed:
        segs = mm._wait_migrations(addr, length)
        pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])
        need: dict[int, int] = {}
        for p in pfns.tolist():
            need[p] = need.get(p, 0) + 1
        missing = [p for p, n in need.items() if mm._pins.get(p, 0) < n]
        if missing:
            raise InvalidArgument(f"range {addr:#x}+{length:#x} holds pages this address space has not "
                                  f"pinned ({len(missing)} of {len(need)})")
        drop_pins(mm, need)
        m.changed.notify_all()


def drop_pins(mm: AddressSpace, pins: dict[int, int]) -> None:
    """Drop ``pins`` (pfn -> count) of ``mm`` and their references (caller holds the lock)."""
    m = mm.machine
    for p, n in pins.items():
        left = mm._pins[p] - n
        if left:
            mm._pins[p] = left
        else:
            del mm._pins[p]
    if pins:
        pfns = np.fromiter(pins.keys(), dtype=np.int64, count=len(pins))
        refs = np.fromiter(pins.values(), dtype=np.int64, count=len(pins))
        m.put_folios(m.pages.head[pfns], refs)
