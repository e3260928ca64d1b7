"""Bit flags mirroring the kernel's: page flags, PTE bits, migrate modes and migrate_vma pfn flags."""

from __future__ import annotations

import enum
import errno

__all__ = ["MigrateMode", "MigratePfn", "MigrateReason", "MigrateVmaSelect", "PageFlag", "Prot", "PteFlag"]

# Per-page status codes, as the kernel returns them (negative errno).
EAGAIN = -errno.EAGAIN
EBUSY = -errno.EBUSY
ENOMEM = -errno.ENOMEM
EIO = -errno.EIO
EFAULT = -errno.EFAULT
ENOENT = -errno.ENOENT
EINVAL = -errno.EINVAL
EPERM = -errno.EPERM
EACCES = -errno.EACCES
ENODEV = -errno.ENODEV


class PageFlag(enum.IntFlag):
    """struct page flags (``PG_*``), one bit each in ``PageArray.flags``."""

    LOCKED = 1 << 0
    REFERENCED = 1 << 1
    UPTODATE = 1 << 2
    DIRTY = 1 << 3
    LRU = 1 << 4
    ACTIVE = 1 << 5
    WORKINGSET = 1 << 6
    ERROR = 1 << 7
    WRITEBACK = 1 << 8
    PRIVATE = 1 << 9
    HEAD = 1 << 10
    MAPPEDTODISK = 1 << 11
    RECLAIM = 1 << 12
    SWAPBACKED = 1 << 13
    UNEVICTABLE = 1 << 14
    MLOCKED = 1 << 15
    CHECKED = 1 << 16
    YOUNG = 1 << 17
    IDLE = 1 << 18
    ISOLATED = 1 << 19
    SWAPCACHE = 1 << 20


class PteFlag(enum.IntFlag):
    """Bits of an emulated page-table entry."""

    PRESENT = 1 << 0
    WRITE = 1 << 1
    YOUNG = 1 << 2
    DIRTY = 1 << 3
    MIGRATION = 1 << 4  # a migration entry: not present, accessors wait for the migration to finish
    SPECIAL = 1 << 5  # maps no struct page: the shared zero page (pfn ``ZERO_PFN``), never writable
    # A device-private entry (``Machine(device_memory="private")``): a non-present, swap-style entry naming a
    # device page (it keeps write, young and dirty); a CPU access faults and the owner's ``migrate_to_ram``
    # brings the page back. Never set together with PRESENT.
    DEVICE_PRIVATE = 1 << 6


class Prot(enum.IntFlag):
    """Access rights of a mapping (``PROT_*`` of mmap(2) and mprotect(2)).

    ``NONE`` forbids every access, ``READ`` allows loads, ``WRITE`` stores (and loads, as on x86).
    """

    NONE = 0
    READ = 1
    WRITE = 2


class MigrateReason(enum.IntEnum):
    """Why pages migrate: the kernel's ``enum migrate_reason``, recorded with every call and deciding a few rules.

    ``MR_NUMA_MISPLACED`` (NUMA balancing moving a misplaced folio after a hint fault) never splits a large folio
    that finds no destination: it fails instead. ``MR_LONGTERM_PIN`` (a long-term pin moving pages off
    unpinnable memory) retries a large folio whose split failed with ``-EAGAIN`` on the next pass, instead of
    failing it. ``MR_DEMOTION`` and ``MR_NUMA_MISPLACED`` feed their own vmstat counters (``pgdemote_*``,
    ``numa_pages_migrated``, ``pgpromote_success``). ``mm.migrate`` and ``move_pages`` are ``MR_SYSCALL``, as
    ``migrate_pages(2)`` and ``move_pages(2)`` are.
    """

    MR_COMPACTION = 0
    MR_MEMORY_FAILURE = 1
    MR_MEMORY_HOTPLUG = 2
    MR_SYSCALL = 3
    MR_MEMPOLICY_MBIND = 4
    MR_NUMA_MISPLACED = 5
    MR_CONTIG_RANGE = 6
    MR_LONGTERM_PIN = 7
    MR_DEMOTION = 8
    MR_DAMON = 9


class MigrateMode(enum.Flag):
    """How hard a migration may block, plus the ``NO_COPY`` modifier.

    ``ASYNC`` never blocks (busy page lock -> ``-EAGAIN``, writeback -> ``-EBUSY``); ``SYNC_LIGHT`` blocks on
    page locks but not on writeback; ``SYNC`` blocks on both. ``NO_COPY`` moves page state only: the data was
    (or is being) copied by someone else, typically a DMA engine.
    """

    ASYNC = enum.auto()
    SYNC_LIGHT = enum.auto()
    SYNC = enum.auto()
    NO_COPY = enum.auto()

    # Enum hashes a member by its name, in Python: every dict keyed by a mode paid for it on each migration call.
    # Members (combinations included) are singletons compared by identity, so the identity's hash serves.
    __hash__ = object.__hash__


class MigratePfn(enum.IntFlag):
    """Flags in the low bits of ``MigrateVma.src``/``dst`` entries (``pfn << MIGRATE_PFN_SHIFT | flags``).

    ``COMPOUND`` marks the head entry of a PMD-sized folio migrated whole (``MigrateVmaSelect.COMPOUND``): the
    entry stands for ``2**HPAGE_PMD_ORDER`` pages and the entries of its other pages are 0.
    """

    VALID = 1 << 0
    MIGRATE = 1 << 1
    WRITE = 1 << 3
    COMPOUND = 1 << 4


class MigrateVmaSelect(enum.IntFlag):
    """Which pages ``MigrateVma`` collects: ``struct migrate_vma.flags`` (the kernel's ``MIGRATE_VMA_SELECT_*``).

    ``SYSTEM`` selects system (host) memory and the zero page; ``DEVICE_PRIVATE`` device-private pages and
    ``DEVICE_COHERENT`` device-coherent pages, each only where the device node's ``owner`` equals the caller's
    ``pgmap_owner``; ``COMPOUND`` collects a PMD-sized folio (and a PMD-sized hole) whole, as one
    ``MigratePfn.COMPOUND`` entry, instead of splitting it. Holes (nothing mapped) are collected whatever
    the flags, as ``migrate_vma_collect_hole`` collects them.
    """

    SYSTEM = 1 << 0
    DEVICE_PRIVATE = 1 << 1
    DEVICE_COHERENT = 1 << 2
    COMPOUND = 1 << 3


MIGRATE_PFN_SHIFT = 6

#: Page flags that ``folio_migrate_flags`` copies to the new folio as they are.
MIGRATE_COPIED_FLAGS = (PageFlag.ERROR | PageFlag.REFERENCED | PageFlag.UPTODATE | PageFlag.WORKINGSET
                        | PageFlag.CHECKED | PageFlag.MAPPEDTODISK | PageFlag.DIRTY | PageFlag.YOUNG
                        | PageFlag.IDLE | PageFlag.MLOCKED | PageFlag.RECLAIM)
#: PTE bits a migration entry keeps from the PTE it replaces, and gives to the PTE that replaces it.
MIGRATION_ENTRY_KEPT = PteFlag.WRITE | PteFlag.YOUNG | PteFlag.DIRTY
#: Page flags that move: set on the new folio, cleared on the old one.
MIGRATE_MOVED_FLAGS = PageFlag.ACTIVE | PageFlag.UNEVICTABLE | PageFlag.SWAPCACHE | PageFlag.PRIVATE
