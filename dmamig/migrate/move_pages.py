"""The move_pages(2) side of migration: ``AddressSpace.migrate`` over a range and ``AddressSpace.move_pages``.

As the kernel's ``do_pages_move`` and ``add_folio_for_migration``, each page is looked up in the page tables
and then, in this order: no mapping -> ``-EFAULT``; nothing populated -> ``-ENOENT``; the zero page ->
``-EFAULT`` (there is nothing to move); already on the target node -> done; mapped by another process
without ``move_all`` (``MPOL_MF_MOVE_ALL``) -> ``-EACCES``; else isolated and handed to the migration core
(:func:`~dmamig.migrate.isolate.collect_folios` and :func:`~dmamig.migrate.core.run_migration`). Pages left
alone are not migration failures: ``pgmigrate_fail`` does not count them.

A folio counts as mapped by another process when any of its base pages has a mapcount above one (the
kernel's ``folio_maybe_mapped_shared`` estimate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import check_node
from ..dma import DmaEngine
from ..errors import InvalidArgument
from ..flags import EBUSY, EFAULT, ENODEV, ENOENT, MigrateMode, MigrateReason, PteFlag
from ..vma import NO_PFN, ZERO_PFN
from .core import MigrationRequest, check_mode, check_reason, run_migration
from .isolate import collect_folios, collect_range, putback_folios
from .options import MigrateOptions

if TYPE_CHECKING:
    from ..machine import Machine
    from ..mm_struct import MmStruct
    from .result import MigrateResult

__all__ = ["MovePagesResult", "migrate_range", "move_pages"]


@dataclass
class MovePagesResult:
    """What ``AddressSpace.move_pages`` did.

    Attributes
    ----------
    status : numpy.ndarray
        One int32 per address: the target node once its page is there (migrated, or there already), or
        ``-errno``. Where the kernel writes no status (a group whose migration failed, and the addresses the
        call never reached after it), the entry says what happened to the page: the node it is on, or the
        ``-errno`` of its failure.
    results : list of (int, MigrateResult)
        One ``(node, MigrateResult)`` per group of pages the call migrated (each ``do_move_pages_to_node``),
        in order; empty for a query.
    rc : int
        The syscall's return value: ``0``; or, once a group failed to migrate some folios, their number plus
        the addresses after the group that were never tried (the call stops there); ``-ENOMEM`` when a
        group found no frame for a base page; or ``-ENODEV`` at a target node of device-private memory.
    """

    status: np.ndarray
    results: list[tuple[int, MigrateResult]] = field(default_factory=list)
    rc: int = 0

    @property
    def nr_succeeded(self) -> int:
        """Base pages the core migrated, over every group."""
        return sum(r.nr_succeeded for _node, r in self.results)

    @property
    def nr_failed(self) -> int:
        """Base pages the core tried and could not migrate."""
        return sum(r.nr_failed for _node, r in self.results)


#: ``mode | NO_COPY`` per mode seen: flag arithmetic on enums costs more than a dict lookup.
_NO_COPY_MODES: dict[MigrateMode, MigrateMode] = {}


def _check_engine(m: Machine, engine: Any, mode: MigrateMode) -> MigrateMode:
    if engine is None:
        return mode
    if not isinstance(engine, DmaEngine) or engine is not m.dma:
        raise InvalidArgument("engine must be this machine's DMA engine (m.dma) or None")
    no_copy = _NO_COPY_MODES.get(mode)
    if no_copy is None:
        no_copy = _NO_COPY_MODES[mode] = mode | MigrateMode.NO_COPY
    return no_copy


def migrate_range(mm: MmStruct, addr: int, length: int, node: int, mode: MigrateMode,
                  engine: DmaEngine | None, options: MigrateOptions | None, move_all: bool,
                  reason: MigrateReason = MigrateReason.MR_SYSCALL) -> MigrateResult:
    """``AddressSpace.migrate``: every page of a range to one node."""
    t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    reason = check_reason(reason)
    mm.check_open()
    addr, length = mm.check_range(addr, length, aligned=True)
    m = mm.machine
    node = check_node(m, "node", node)
    mode = _check_engine(m, engine, check_mode(mode, allow_no_copy=False))
    options = MigrateOptions.coerce(options)
    with m.lock:  # m.changed's lock, entered directly (collection waits on m.changed where it must)
        # The zero page (-EFAULT) and, without move_all, pages other processes map (-EACCES) are left alone.
        pfns, status, heads, entry = collect_range(mm, addr, length, node, move_all=bool(move_all))
    # The request's fields in order, positional: keywords cost a call of one folio measurably.
    return run_migration(m, MigrationRequest(heads, node, mode, pfns, status, t_thread, t_wall, engine,
                                             None,  # dst: the core allocates the destinations
                                             options, reason,
                                             False,  # kswapd
                                             entry))


def _as_addrs(addrs: Any) -> np.ndarray:
    arr = np.asarray(addrs)
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidArgument(f"addrs must be a non-empty 1-D sequence of addresses, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"addrs must hold integers, got dtype {arr.dtype}")
    if (arr < 0).any():
        raise InvalidArgument(f"addrs must be >= 0, got {int(arr[arr < 0][0])}")
    return arr.astype(np.int64)


def _as_nodes(m: Machine, nodes: Any, n: int) -> np.ndarray:
    arr = np.asarray(nodes)
    if arr.ndim != 1 or arr.size != n:
        raise InvalidArgument(f"nodes must give one target node per address: {n} addrs, nodes of shape "
                              f"{arr.shape} (pass nodes=None to query where the pages are)")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"nodes must hold integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= len(m.nodes))
    if bad.any():
        raise InvalidArgument(f"nodes[{int(np.flatnonzero(bad)[0])}] = {int(arr[bad][0])} is not a node; "
                              f"nodes are 0..{len(m.nodes) - 1}")
    return arr.astype(np.int64)


def _follow_pages(mm: MmStruct, addrs: np.ndarray) -> np.ndarray:
    """``follow_page`` of each address, waiting for nothing (caller holds the lock).

    The pfn of the page mapped there; ``ZERO_PFN`` (``-EFAULT``) for the zero page and where no VMA maps the
    address; ``-1`` (``-ENOENT``) where nothing is populated, and where a migration entry stands in the PTE:
    the page walk finds no page behind a non-present entry and reports it as absent, it does not wait.
    """
    found, hits = mm.lookup(addrs)
    pfns = np.full(addrs.size, ZERO_PFN, dtype=np.int64)  # no VMA maps the address
    for vma, pos, slots in hits:
        migrating = (vma.pte_flags[slots] & np.uint8(PteFlag.MIGRATION)) != 0
        pfns[pos] = np.where(migrating, NO_PFN, found[pos])
    m = mm.machine
    if m.device_private:
        # A device-private entry is not present either: folio_walk_start finds no page behind it.
        mapped = pfns >= 0
        dev = np.zeros(pfns.size, dtype=bool)
        dev[mapped] = m.device_node_mask[m.nodemap.node_of(pfns[mapped])]
        pfns[dev] = NO_PFN
    return pfns


def _pages_stat(m: Machine, pfns: np.ndarray) -> np.ndarray:
    """``do_pages_stat_array``: the node of each page, ``-ENOENT`` where none, ``-EFAULT`` for the zero page
    or no mapping."""
    status = np.where(pfns >= 0, m.nodemap.node_of(np.maximum(pfns, 0)), ENOENT).astype(np.int32)
    status[pfns == ZERO_PFN] = EFAULT
    return status


def _add_folios_for_migration(mm: MmStruct, addrs: np.ndarray, node: int,
                              move_all: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``add_folio_for_migration`` over a run of addresses with one target node, up to the first one that is
    not queued (caller holds the lock).

    Returns ``(k, pfns, status, heads)``: ``addrs[:k]`` are queued (``pfns`` and the provisional ``status`` of
    those pages, their isolated ``heads``); ``status[k]``, when ``k < addrs.size``, is the page that ended the
    group: ``0`` (on ``node`` already) or why it was not queued. A folio named a second time in a group is
    already isolated, so that address is ``-EBUSY``.
    """
    m = mm.machine
    pfns = _follow_pages(mm, addrs)
    status, heads = collect_folios(m, pfns, node, move_all=move_all)
    queued = status > 0  # collect_folios: positive for a page whose folio it isolated, 0 or -errno otherwise
    k = addrs.size if queued.all() else int(np.argmin(queued))  # the first page not queued
    # ``heads`` lists each folio once, in order: up to the first repeat of a folio it matches the pages' heads.
    # A repeat is where the kernel's isolation fails, the folio being isolated already.
    want, got = m.pages.head[pfns[:k]], heads[:k]
    if got.size < k or not np.array_equal(got, want):
        differ = np.flatnonzero(got != want[: got.size])
        k = int(differ[0]) if differ.size else got.size
    if k < addrs.size:
        if status[k] > 0:
            status[k] = EBUSY
        # Only the pages before ``k`` were taken: the kernel never reached the rest of the run yet.
        putback_folios(m, heads[k:])
        heads = heads[:k]
    return k, pfns[:k], status[: k + 1], heads


#: Addresses looked up at once while a group grows (doubling while every one is queued): a group costs work in
#: proportion to its own length, not to what is left of its run.
_GROUP_WINDOW = 64


def _queue_group(mm: MmStruct, addrs: np.ndarray, node: int,
                 move_all: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_add_folios_for_migration` over a run, a window at a time until a page is not queued."""
    m = mm.machine
    pfns, st, heads = [], [], []
    lo, w = 0, _GROUP_WINDOW
    while True:
        hi = min(addrs.size, lo + w)
        with m.changed:
            # A folio queued by an earlier window is isolated already: -EBUSY here, as in the kernel.
            k, p, s, h = _add_folios_for_migration(mm, addrs[lo:hi], node, move_all)
        pfns.append(p)
        st.append(s)
        heads.append(h)
        if k < hi - lo or hi == addrs.size:
            return lo + k, np.concatenate(pfns), np.concatenate(st), np.concatenate(heads)
        lo, w = hi, 2 * w


def move_pages(mm: MmStruct, addrs: Any, nodes: Any, mode: MigrateMode, engine: DmaEngine | None,
               move_all: bool, options: MigrateOptions | None) -> MovePagesResult:
    """``AddressSpace.move_pages``: validate, then ``do_pages_move`` (or ``do_pages_stat`` for a query).

    As the kernel, pages are queued in order, and the queue is migrated (one ``migrate_pages()`` call)
    whenever the target node changes and after every page that was not queued (already on its node, or
    not movable: its status says why). A group that fails to migrate some folios stops the call: the
    return value counts them and every address after the group, untried. An address whose page is under
    migration reports ``-ENOENT`` at once, as the kernel's page walk does; so does a device-private page
    (a non-present entry). Device-private memory is not an ``N_MEMORY`` node: a target on it ends the call
    with ``-ENODEV`` (``rc``), the addresses from there on untried.
    """
    mm.check_open()
    m = mm.machine
    addrs = _as_addrs(addrs)
    if nodes is None:
        with m.changed:
            return MovePagesResult(_pages_stat(m, _follow_pages(mm, addrs)))
    targets = _as_nodes(m, nodes, addrs.size)
    mode = _check_engine(m, engine, check_mode(mode, allow_no_copy=False))
    options = MigrateOptions.coerce(options)
    return _do_pages_move(mm, addrs, targets, mode, engine, bool(move_all), options)


def _do_pages_move(mm: MmStruct, addrs: np.ndarray, targets: np.ndarray, mode: MigrateMode,
                   engine: DmaEngine | None, move_all: bool, options: MigrateOptions) -> MovePagesResult:
    """``do_pages_move``: group, migrate each group (``do_move_pages_to_node``), store statuses, stop on failure."""
    m = mm.machine
    n = addrs.size
    status = np.zeros(n, dtype=np.int32)
    results: list[tuple[int, MigrateResult]] = []
    run_end = np.empty(n, dtype=np.int64)  # where the run of equal targets holding each address ends
    cuts = np.flatnonzero(np.diff(targets)) + 1
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
        run_end[a:b] = b
    i = 0
    rc = 0
    while i < n:
        node = int(targets[i])
        if m.device_private and m.device_node_mask[node]:
            # Device-private memory is ZONE_DEVICE, not an N_MEMORY node: do_pages_move fails with -ENODEV
            # there, after the groups before it were migrated; the addresses from here on are untried.
            rc = ENODEV
            break
        t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
        k, pfns, st, heads = _queue_group(mm, addrs[i:run_end[i]], node, move_all)
        nxt = i + k + 1 if k < run_end[i] - i else int(run_end[i])  # the first address not accounted for
        if nxt == i + k + 1:
            status[i + k] = node if st[k] == 0 else st[k]
        if heads.size:
            res = run_migration(m, MigrationRequest(heads=heads, node=node, mode=mode, pfns=pfns, status=st[:k],
                                                    t_thread=t_thread, t_wall=t_wall, engine=engine, options=options))
            results.append((node, res))
            group = status[i:i + k]
            if res.rc == 0:
                group[:] = node
            else:
                # move_pages_and_store_status stores nothing for a failed group; its pages say what happened.
                group[:] = np.where(res.status == 0, node, res.status)
                rc = res.rc + (n - nxt) if res.rc > 0 else res.rc
                i = nxt
                break
        i = nxt
    if i < n:
        # Never reached: where the pages are.
        with m.changed:
            status[i:] = _pages_stat(m, _follow_pages(mm, addrs[i:]))
    return MovePagesResult(status, results, rc)
