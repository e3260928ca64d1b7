"""Pins, after the kernel's ``mm/gup.c``: long-lived references on the pages of a range.

An address space records its pins per base pfn (``MmStruct.pins``) and holds one folio reference per
pin. A pinned private page is always the address space's own (``pin_user_pages`` unshares copy-on-write
pages and never pins the zero page), which is what lets fork copy it instead of sharing it.

A pin is long-term (``FOLL_LONGTERM``) unless asked otherwise. Any pin faults device-private pages back
first: their entries are not present, so GUP's ``faultin_page`` runs the fault, and ``do_swap_page`` the
owner's ``migrate_to_ram`` (:func:`~dmamig.memory.fault_device_private`). Device-coherent pages are present
and a short-term pin takes them where they are; they are not long-term pinnable
(``folio_is_longterm_pinnable()`` is false for ``ZONE_DEVICE`` pages), so a long-term pin migrates each one to
host memory first with ``migrate_device_coherent_folio``, as ``migrate_longterm_unpinnable_folios`` does.
Neither counts ``pgmigrate_*`` events. The retry rules follow ``__gup_longterm_locked``, which faults the
range in, migrates what is not pinnable and starts again while that returns ``-EAGAIN``:

- a page under a migration entry, or isolated by another thread's migration that has not unmapped it yet, is
  waited for (as ``migration_entry_wait`` and the folio lock make the kernel wait); waiting is not a retry,
  since a migration in flight always ends;
- otherwise device pages are brought back (faults, or device migrations of single folios) and the pin
  starts again. The kernel's loop has no bound while migrations succeed; here a try that brings no page back
  counts, and after :data:`LONGTERM_PIN_RETRIES` such tries (host memory full, a reference held elsewhere the
  whole time) the pin fails with OutOfMemory (the kernel's ``-ENOMEM``), pinning nothing. Pages that keep
  coming back and leaving again (other threads migrating them to devices) are bounded by
  :data:`LONGTERM_PIN_WAIT_S`, then MigrationStalled.

The machine lock is held from the last check to the pin, so no migration can move a page away in between.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgument, MigrationStalled, OutOfMemory
from .flags import MigrateReason, PageFlag
from .memory import check_access, device_pfns, fault, fault_device_private, migrate_to_ram, write_pages
from .migrate.device import migrate_device_coherent_folio
from .mm_struct import segment_pfns

if TYPE_CHECKING:
    from .mm_struct import MmStruct

__all__ = ["LONGTERM_PIN_RETRIES", "LONGTERM_PIN_WAIT_S", "drop_pins", "pin_range", "unpin_range", "write_pinned"]

#: Seconds a pin waits in all for other threads' migrations of its range to end before it raises
#: MigrationStalled, pinning nothing. The kernel waits without bound; here a driver that set up a MigrateVma
#: and never finalized it must not hang its caller.
LONGTERM_PIN_WAIT_S = 60.0
#: How many times a pin's migration of device pages back to host memory may bring none back before the pin gives
#: up (the kernel's ``__gup_longterm_locked`` loop has no bound of its own while it makes progress).
LONGTERM_PIN_RETRIES = 10
# How long a pin sleeps at most between looks at pages another thread's migration has isolated; the
# migration wakes it when it ends, the timeout only covers a wake-up lost to a path that does not notify.
_ISOLATED_POLL_S = 0.01


def pin_range(mm: MmStruct, addr: int, length: int, longterm: bool = True) -> None:
    """``AddressSpace.pin``: fault the range in as the address space's own host pages and pin each one.

    Device-private pages are faulted back first, by any pin (GUP's ``faultin_page`` meets a non-present
    entry and ``do_swap_page`` runs the owner's ``migrate_to_ram``). Device-coherent pages are present and
    pinned where they are, unless the pin is long-term (``longterm``, ``FOLL_LONGTERM``): then each migrates
    to host memory with ``migrate_device_coherent_folio`` (see the module notes for the retry rules). Raises
    AddressFault when the mapping is not readable, OutOfMemory when device pages cannot come back.
    """
    mm.check_open()
    addr, length = mm.check_range(addr, length, aligned=True)
    m = mm.machine
    pages = m.pages
    deadline = time.monotonic() + LONGTERM_PIN_WAIT_S
    with m.changed:
        tries = 0
        while True:
            segs = mm.wait_migrations(addr, length, timeout=max(deadline - time.monotonic(), 0.0))
            for v, _s0, _s1 in segs:
                check_access(v, max(addr, v.start), write=False)
            if not m.device_private:
                # A coherent device page is present: GUP unshares a copy-on-write one first (the copy goes to
                # host memory, the other mappers keep theirs).
                for v, s0, s1 in segs:
                    fault(mm, v, s0, s1, 0, write=True)
            pfns = segment_pfns(segs)
            remote = device_pfns(m, pfns)
            if remote.size == 0 or not (longterm or m.device_private):
                if m.device_private:
                    # No device-private entry is left: unshare what is shared, on the host. A shared mapping's
                    # fault may map a page its page cache holds on a device: fault that back, and look again.
                    for v, s0, s1 in segs:
                        fault(mm, v, s0, s1, 0, write=True)
                    pfns = segment_pfns(segs)
                    if device_pfns(m, pfns).size:
                        continue
                break
            if pages.test(pages.head[remote], PageFlag.ISOLATED).any():
                # Another migration has taken these pages and will unmap, move or put them back: wait for it
                # rather than fail to isolate them ourselves.
                if time.monotonic() >= deadline:
                    raise MigrationStalled(f"pin at {addr:#x}: {remote.size} device pages stayed isolated by "
                                           f"another migration for {LONGTERM_PIN_WAIT_S:g} s; nothing was pinned")
                m.changed.wait(_ISOLATED_POLL_S)
                continue
            if tries == LONGTERM_PIN_RETRIES:
                raise OutOfMemory(f"pin at {addr:#x}: {remote.size} device pages could not migrate back to host "
                                  f"memory in {tries} tries ({m.nodes[0].free_pages} host pages free, or the "
                                  f"pages are referenced elsewhere); a pin needs device-private pages there, "
                                  f"a long-term pin device-coherent ones too")
            if time.monotonic() >= deadline:
                raise MigrationStalled(f"pin at {addr:#x}: {remote.size} device pages kept going back to devices "
                                       f"for {LONGTERM_PIN_WAIT_S:g} s while the pin brought them to host memory; "
                                       f"nothing was pinned")
            # Both drop and retake the lock or change page tables: the range is looked at afresh.
            back = fault_device_private(mm, segs) if m.device_private else _migrate_coherent(mm, remote)
            if back == 0:
                # Nothing came back: a reference held elsewhere for now, or no host frames. Give the holder
                # time (a change of page state wakes us early) rather than spend every try at once.
                tries += 1
                m.changed.wait(_ISOLATED_POLL_S)
        np.add.at(pages.refcount, pages.head[pfns], 1)
        for p in pfns.tolist():
            mm.pins[p] = mm.pins.get(p, 0) + 1


def _migrate_coherent(mm: MmStruct, remote: np.ndarray) -> int:
    """``migrate_longterm_unpinnable_folios`` for device-coherent pages: ``migrate_device_coherent_folio``
    on each folio (large ones, which the kernel never has there, go through ``migrate_pages()`` with
    ``MR_LONGTERM_PIN``). Returns how many pages came back (caller holds the lock)."""
    m = mm.machine
    heads = np.unique(m.pages.head[remote])
    # migrate_device_coherent_folio takes a device page with no mapping of its own; a large folio, and a
    # folio of a file or a balloon (which the kernel never has in device memory: only this emulator's
    # migrate_pages() puts one there), goes through migrate_pages() and its mapping's callback instead.
    large = (m.pages.order[heads] > 0) | np.isin(m.pages.mapping[heads], m.callback_object_ids)
    back = sum(migrate_device_coherent_folio(m, h) == 0 for h in heads[~large].tolist())
    if large.any():
        back += migrate_to_ram(mm, m.pages.expand(heads[large]), MigrateReason.MR_LONGTERM_PIN)
    m.changed.notify_all()
    return back


def _pinned_pfns(mm: MmStruct, addr: int, length: int) -> np.ndarray:
    """The pfns behind the page-aligned range, present or under a migration entry (whose pfn is still the
    source: a pinned folio never passes a migration's reference freeze). Caller holds the lock."""
    segs = mm.segments(addr, length)
    return segment_pfns(segs)


def write_pinned(mm: MmStruct, addr: int, buf: np.ndarray) -> None:
    """``AddressSpace.write_pinned``: store ``buf`` at ``addr`` straight into the frames this address space
    has pinned, without a page-table walk; refuses a range with a page it has not pinned."""
    addr, length = mm.check_range(addr, buf.size, aligned=False)
    m = mm.machine
    ps = m.page_size
    first = addr - addr % ps
    end = -(-(addr + length) // ps) * ps
    with m.changed:
        pfns = _pinned_pfns(mm, first, end - first)
        unpinned = [p for p in pfns.tolist() if p < 0 or p not in mm.pins]
        if unpinned:
            raise InvalidArgument(f"write_pinned at {addr:#x}+{length:#x}: {len(unpinned)} of {pfns.size} pages "
                                  f"are not pinned by this address space; pin them with mm.pin first")
        write_pages(m, pfns, addr - first, buf)
        m.page_cache.mark_dirty(m.pages.head[pfns])  # a file folio's dirtiness is counted per node
        m.pages.set(m.pages.head[pfns], PageFlag.DIRTY)
        m.changed.notify_all()


def unpin_range(mm: MmStruct, addr: int, length: int) -> None:
    """``AddressSpace.unpin``: drop one pin on each page of the range; refuses pages it has not pinned."""
    mm.check_open()
    addr, length = mm.check_range(addr, length, aligned=True)
    m = mm.machine
    with m.changed:
        pfns = _pinned_pfns(mm, addr, length)
        need: dict[int, int] = {}
        for p in pfns.tolist():
            need[p] = need.get(p, 0) + 1
        missing = [p for p, n in need.items() if mm.pins.get(p, 0) < n]
        if missing:
            raise InvalidArgument(f"range {addr:#x}+{length:#x} holds pages this address space has not "
                                  f"pinned ({len(missing)} of {len(need)})")
        drop_pins(mm, need)
        m.changed.notify_all()


def drop_pins(mm: MmStruct, pins: dict[int, int]) -> None:
    """Drop ``pins`` (pfn -> count) of ``mm`` and their references (caller holds the lock)."""
    m = mm.machine
    for p, n in pins.items():
        left = mm.pins[p] - n
        if left:
            mm.pins[p] = left
        else:
            del mm.pins[p]
    if pins:
        pfns = np.fromiter(pins.keys(), dtype=np.int64, count=len(pins))
        refs = np.fromiter(pins.values(), dtype=np.int64, count=len(pins))
        m.frames.put_folios(m.pages.head[pfns], refs)
