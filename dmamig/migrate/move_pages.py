"""The move_pages(2) side of migration: ``AddressSpace.migrate`` over a range and ``AddressSpace.move_pages``.

As the kernel's ``do_pages_move`` and ``add_folio_for_migration``, each page is looked up in the page tables
and then, in this order: no mapping -> ``-EFAULT``; nothing populated -> ``-ENOENT``; the zero page ->
``-EFAULT`` (there is nothing to move); already on the target node -> done; mapped by another process
without ``move_all`` (``MPOL_MF_MOVE_ALL``) -> ``-EACCES``; else isolated and handed to the migration core
(:func:`~dmamig.migrate.core.collect_folios` and :func:`~dmamig.migrate.core.run_migration`). Pages left
alone are not migration failures: ``pgmigrate_fail`` does not count them.

A folio counts as mapped by another process when any of its base pages has a mapcount above one (the
kernel's ``folio_maybe_mapped_shared`` estimate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validate import check_node
from ..errors import InvalidArgument
from ..flags import EFAULT, MigrateMode
from ..vma import ZERO_PFN
from .core import check_mode, collect_folios, run_migration
from .options import MigrateOptions

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..machine import Machine
    from ..mm import AddressSpace
    from .core import MigrateResult

__all__ = ["MovePagesResult", "migrate_range", "move_pages"]


@dataclass
class MovePagesResult:
    """What ``AddressSpace.move_pages`` did.

    Attributes
    ----------
    status : numpy.ndarray
        One int32 per address: the node its page is on after the call, or ``-errno``.
    results : dict
        The :class:`~dmamig.MigrateResult` of the core's run for each target node (empty for a query).
    """

    status: np.ndarray
    results: dict[int, MigrateResult] = field(default_factory=dict)

    @property
    def nr_succeeded(self) -> int:
        """Base pages the core migrated, over every target node."""
        return sum(r.nr_succeeded for r in self.results.values())

    @property
    def nr_failed(self) -> int:
        """Base pages the core tried and could not migrate (the syscall's return value counts these)."""
        return sum(r.nr_failed for r in self.results.values())


def _check_engine(m: Machine, engine: Any, mode: MigrateMode) -> MigrateMode:
    if engine is None:
        return mode
    from ..dma import DmaEngine

    if not isinstance(engine, DmaEngine) or engine is not m.dma:
        raise InvalidArgument("engine must be this machine's DMA engine (m.dma) or None")
    return mode | MigrateMode.NO_COPY


def migrate_range(mm: AddressSpace, addr: int, length: int, node: int, mode: MigrateMode,
                  engine: DmaEngine | None, options: MigrateOptions | None, move_all: bool) -> MigrateResult:
    """``AddressSpace.migrate``: every page of a range to one node."""
    t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    mm._check_open()
    addr, length = mm._check_range(addr, length, aligned=True)
    m = mm.machine
    node = check_node(m, "node", node)
    mode = _check_engine(m, engine, check_mode(mode, allow_no_copy=False))
    options = MigrateOptions.coerce(options)
    with m.changed:
        segs = mm._wait_migrations(addr, length)
        pfns = np.concatenate([v.pte_pfn[s0:s1] for v, s0, s1 in segs])  # a copy: the tables change
        # The zero page (-EFAULT) and, without move_all, pages other processes map (-EACCES) are left alone.
        status, heads = collect_folios(m, pfns, node, move_all=bool(move_all))
    return run_migration(m, heads, node, mode, engine, None, pfns, status, t_thread, t_wall, options)


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


def _lookup(mm: AddressSpace, addrs: np.ndarray) -> tuple[np.ndarray, list]:
    """The pfn of each address (``-1`` where unmapped too) and, per VMA hit, ``(vma, positions, slots)``."""
    ps = mm.machine.page_size
    vmas = mm.vmas
    pfns = np.full(addrs.size, -1, dtype=np.int64)
    hits = []
    if not vmas:
        return pfns, hits
    starts = np.array([v.start for v in vmas], dtype=np.int64)
    ends = np.array([v.end for v in vmas], dtype=np.int64)
    i = np.searchsorted(starts, addrs, side="right") - 1
    inside = (i >= 0) & (addrs < ends[np.maximum(i, 0)])
    for k in np.unique(i[inside]).tolist():
        pos = np.flatnonzero(inside & (i == k))
        slots = (addrs[pos] - vmas[k].start) // ps
        pfns[pos] = vmas[k].pte_pfn[slots]
        hits.append((vmas[k], pos, slots))
    return pfns, hits


def _lookup_settled(mm: AddressSpace, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pfns, mapped)`` once no addressed slot holds a migration entry (caller holds ``machine.changed``)."""
    from ..flags import PteFlag

    while True:
        pfns, hits = _lookup(mm, addrs)
        if not any((v.pte_flags[slots] & np.uint8(PteFlag.MIGRATION)).any() for v, _p, slots in hits):
            mapped = np.zeros(addrs.size, dtype=bool)
            for _v, pos, _s in hits:
                mapped[pos] = True
            return pfns, mapped
        mm.machine.changed.wait()


def _where(m: Machine, pfns: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """``do_pages_stat``: node of each page, ``-ENOENT`` if not populated, ``-EFAULT`` if unmapped or zero."""
    from ..flags import ENOENT

    status = np.where(pfns >= 0, m.nodemap.node_of(np.maximum(pfns, 0)), ENOENT).astype(np.int32)
    status[(pfns == ZERO_PFN) | ~mapped] = EFAULT
    return status


def move_pages(mm: AddressSpace, addrs: Any, nodes: Any, mode: MigrateMode, engine: DmaEngine | None,
               move_all: bool, options: MigrateOptions | None) -> MovePagesResult:
    """``AddressSpace.move_pages``: validate, then run the core once per target node, in order of first use.

    The kernel flushes its page list whenever the target node changes from one address to the next; grouping
    every address of a node into one run places the pages the same way with fewer passes. Statuses are read
    back from the page tables at the end, so a page named twice reports where it finally is. An address whose
    page is under migration is waited for, as ``migrate`` waits, where the kernel's page walk would skip the
    migration entry and report ``-ENOENT``.
    """
    mm._check_open()
    m = mm.machine
    addrs = _as_addrs(addrs)
    if nodes is None:
        with m.changed:
            return MovePagesResult(_where(m, *_lookup_settled(mm, addrs)))
    targets = _as_nodes(m, nodes, addrs.size)
    mode = _check_engine(m, engine, check_mode(mode, allow_no_copy=False))
    options = MigrateOptions.coerce(options)
    status = np.zeros(addrs.size, dtype=np.int32)
    errors = np.zeros(addrs.size, dtype=np.int32)  # per-address -errno that the final lookup cannot see
    results: dict[int, MigrateResult] = {}
    _, first = np.unique(targets, return_index=True)
    for node in targets[np.sort(first)].tolist():
        t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
        sel = np.flatnonzero(targets == node)
        with m.changed:
            pfns, mapped = _lookup_settled(mm, addrs[sel])
            st, heads = collect_folios(m, np.where(mapped, pfns, ZERO_PFN), node, move_all=bool(move_all))
        res = run_migration(m, heads, node, mode, engine, None, pfns, st, t_thread, t_wall, options)
        res.status[~mapped] = EFAULT
        results[node] = res
        failed = (res.status < 0) & (res.status != EFAULT)
        errors[sel[failed]] = res.status[failed]
        errors[sel[~failed]] = 0
    with m.changed:
        status[:] = _where(m, *_lookup_settled(mm, addrs))
    # Where the page is wins, except for pages the call could not move: they report why.
    keep = (errors != 0) & (status >= 0)
    status[keep] = errors[keep]
    return MovePagesResult(status, results)
