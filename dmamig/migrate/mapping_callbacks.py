"""The migrate callbacks of mappings: ``address_space_operations.migrate_folio`` and ``movable_operations``.

Each mapping migrates its folios through its own callback, which decides, before the folio's mapping and state
move, whether it can move now: ``0``, ``-EAGAIN`` (retry on the next pass), or a permanent ``-EBUSY`` /
``-EINVAL``. Every callback also says whether it supports a no-copy migration (``MIGRATE_SYNC_NO_COPY``):
balloon and zsmalloc pages (non-LRU ``movable_ops``) refuse it with ``-EINVAL``, as the kernel's did, and so
does every callback for the folios of a filesystem that writes folios without the folio lock, unless the
experiment setting ``MigrateOptions(unaudited_no_copy=True)`` allows it.

The callbacks here are those of file folios (page-cache folios of a :class:`~dmamig.filemap.File`);
anonymous and shared-memory folios keep the core's compiled path, which is ``migrate_folio``.

=============================== =================================================================================
``migrate_folio``               anonymous memory and shmem: the core moves mapping and state
``filemap_migrate_folio``       the folio's private data moves to the new folio with it
``buffer_migrate_folio``        buffer heads: a locked buffer is ``-EAGAIN`` in ASYNC, waited for in sync modes
``buffer_migrate_folio_norefs`` the same, and a buffer head someone holds (``get_bh``) is ``-EAGAIN``
``fallback_migrate_folio``      no callback: a dirty folio is written out in SYNC (then ``-EAGAIN``) and
                                ``-EBUSY`` otherwise; private data that cannot be released is ``-EAGAIN`` in SYNC,
                                ``-EBUSY`` otherwise
``movable_ops``                 non-LRU movable pages (balloon, zsmalloc): no no-copy (``-EINVAL``)
=============================== =================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..array_ops import distinct
from ..balloon import Balloon
from ..filemap import BH_LOCKED, BH_REF, File
from ..flags import EAGAIN, EBUSY, EINVAL, MigrateMode, PageFlag

if TYPE_CHECKING:
    from ..machine import Machine
    from .options import MigrateOptions

__all__ = ["CALLBACKS", "MigrateCallback", "callback_of", "mapping_migrate_check"]

_DIRTY = np.uint32(PageFlag.DIRTY)
_PRIVATE = np.uint32(PageFlag.PRIVATE)

#: ``check(m, file, heads, mode)``: per folio 0 or -errno, before the folio's mapping moves (lock held).
Check = Callable[["Machine", Any, np.ndarray, MigrateMode], np.ndarray]


@dataclass(frozen=True)
class MigrateCallback:
    """One mapping kind's migrate callback.

    Attributes
    ----------
    name : str
        The kernel function it models.
    no_copy : bool
        Whether it supports a no-copy migration (``MIGRATE_SYNC_NO_COPY``); if not, such a migration of its
        folios fails with ``-EINVAL``.
    check : callable
        ``check(m, file, heads, mode)``: 0 or ``-errno`` per folio (caller holds the lock).
    """

    name: str
    no_copy: bool
    check: Check


def migrate_folio(m: Machine, f: File, heads: np.ndarray, mode: MigrateMode) -> np.ndarray:
    """``migrate_folio``: nothing to decide; the reference check and the move follow."""
    return np.zeros(heads.size, dtype=np.int32)


def filemap_migrate_folio(m: Machine, f: File, heads: np.ndarray, mode: MigrateMode) -> np.ndarray:
    """``filemap_migrate_folio``: ``folio_migrate_mapping``, then the private data is detached from the old
    folio and attached to the new one (``folio_migrate_flags`` moves ``PG_private``, ``private`` and, through
    the reference transfer, the reference it holds)."""
    return np.zeros(heads.size, dtype=np.int32)


def _buffer_migrate(m: Machine, heads: np.ndarray, mode: MigrateMode, check_refs: bool) -> np.ndarray:
    """``__buffer_migrate_folio``: lock the buffers (ASYNC only tries: ``-EAGAIN``), and with ``check_refs``
    refuse buffer heads someone holds (``-EAGAIN``)."""
    pages = m.pages
    rc = np.zeros(heads.size, dtype=np.int32)
    with_buffers = (pages.flags[heads] & _PRIVATE) != 0
    locked = with_buffers & ((pages.private[heads] & BH_LOCKED) != 0)
    if locked.any():
        if mode == MigrateMode.ASYNC:
            rc[locked] = EAGAIN  # buffer_migrate_lock_buffers: trylock only
        else:
            while ((pages.private[heads[locked]] & BH_LOCKED) != 0).any():  # lock_buffer sleeps
                m.changed.wait()
    if check_refs:
        # Busy buffer heads, still busy after invalidate_bh_lrus().
        rc[(rc == 0) & with_buffers & (pages.private[heads] >= BH_REF)] = EAGAIN
    return rc


def buffer_migrate_folio(m: Machine, f: File, heads: np.ndarray, mode: MigrateMode) -> np.ndarray:
    """``buffer_migrate_folio``: buffers locked for the move (sync modes wait, ASYNC gets ``-EAGAIN``)."""
    return _buffer_migrate(m, heads, mode, check_refs=False)


def buffer_migrate_folio_norefs(m: Machine, f: File, heads: np.ndarray, mode: MigrateMode) -> np.ndarray:
    """``buffer_migrate_folio_norefs``: as :func:`buffer_migrate_folio`, and busy buffer heads are refused."""
    return _buffer_migrate(m, heads, mode, check_refs=True)


def fallback_migrate_folio(m: Machine, f: File, heads: np.ndarray, mode: MigrateMode) -> np.ndarray:
    """``fallback_migrate_folio``: for a mapping without a migrate callback.

    A dirty folio is written out by the migrating thread in SYNC mode (``writeout``), and the folio is tried
    again on the next pass (``-EAGAIN``); in ASYNC and SYNC_LIGHT it is ``-EBUSY``. Private data must be
    released first (``filemap_release_folio``, i.e. ``try_to_free_buffers``): buffers that are locked or held
    cannot be, which is ``-EAGAIN`` in SYNC and ``-EBUSY`` otherwise. Then ``migrate_folio``.
    """
    pages = m.pages
    rc = np.zeros(heads.size, dtype=np.int32)
    dirty = (pages.flags[heads] & _DIRTY) != 0
    if dirty.any():
        if mode == MigrateMode.SYNC:
            err = m.page_cache.write_folios(f, heads[dirty])
            rc[dirty] = EBUSY if err else EAGAIN
        else:
            rc[dirty] = EBUSY
    private = (rc == 0) & ((pages.flags[heads] & _PRIVATE) != 0)
    if private.any():
        held = private & (pages.private[heads] != 0)
        rc[held] = EAGAIN if mode == MigrateMode.SYNC else EBUSY
        free = heads[private & ~held]
        # try_to_free_buffers: the buffers go, and the reference they held with them.
        pages.clear(free, PageFlag.PRIVATE)
        pages.refcount[free] -= 1
    return rc


def movable_ops(m: Machine, balloon: Balloon, heads: np.ndarray, mode: MigrateMode) -> np.ndarray:
    """``movable_operations.migrate_page`` of balloon and zsmalloc pages (``balloon_page_migrate``): the driver
    moves its page to the new one (the core moves the slot); no-copy is refused before it is called."""
    return np.zeros(heads.size, dtype=np.int32)


#: Every migrate callback by the name of the kernel function it models (``None``: no callback, the fallback).
CALLBACKS: dict[str | None, MigrateCallback] = {
    "migrate_folio": MigrateCallback("migrate_folio", True, migrate_folio),
    "filemap_migrate_folio": MigrateCallback("filemap_migrate_folio", True, filemap_migrate_folio),
    "buffer_migrate_folio": MigrateCallback("buffer_migrate_folio", True, buffer_migrate_folio),
    "buffer_migrate_folio_norefs": MigrateCallback("buffer_migrate_folio_norefs", True,
                                                   buffer_migrate_folio_norefs),
    None: MigrateCallback("fallback_migrate_folio", True, fallback_migrate_folio),
    "movable_ops": MigrateCallback("movable_ops", False, movable_ops),
}


def callback_of(f: File) -> MigrateCallback:
    """The migrate callback of ``f``'s filesystem."""
    return CALLBACKS[f.fs.migrate_folio]


def mapping_migrate_check(m: Machine, heads: np.ndarray, mode: MigrateMode, no_copy: np.ndarray,
                          options: MigrateOptions) -> np.ndarray:
    """Run each folio's mapping callback (caller holds the lock): 0 or ``-errno`` per folio of ``heads``.

    ``no_copy`` says, per folio, whether its data was copied before the move by someone else (a DMA engine, or
    the caller of a ``NO_COPY`` migration) rather than by the migrating thread after it. A callback without
    no-copy support, or a filesystem that writes folios without the folio lock, refuses that with
    ``-EINVAL`` (the latter unless ``options.unaudited_no_copy``). A folio whose file is gone (truncated
    while it was isolated) is ``-EAGAIN``: its migration ends with its last pass.
    """
    rc = np.full(heads.size, EAGAIN, dtype=np.int32)
    mapping = m.pages.mapping[heads]
    for oid in distinct(mapping):
        f = m.object_or_none(oid) if oid >= 0 else None
        if isinstance(f, Balloon):
            cb, audited = CALLBACKS["movable_ops"], True
        elif isinstance(f, File):
            cb, audited = callback_of(f), f.fs.locks_folios or options.unaudited_no_copy
        else:
            continue
        sel = np.flatnonzero(mapping == oid)
        refuse = no_copy[sel] & (not cb.no_copy or not audited)
        rc[sel[refuse]] = EINVAL
        go = sel[~refuse]
        if go.size:
            rc[go] = cb.check(m, f, heads[go], mode)
    return rc
