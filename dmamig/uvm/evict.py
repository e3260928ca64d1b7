"""Oversubscription: which device blocks go, and the bulk device-to-host migration that sends them back.

Each device node has one :class:`BlockTracker`, shared by every address space that touches it: the 2 MiB
virtual blocks holding device-resident pages, with their first and last access. An eviction policy orders
them (least recently used first by default, as UVM's ``block_evict``); the victims' device pages go back to
host memory through the migration core, with the DMA engine when the device services without copies.
:func:`migrate_device_range` is the driver's bulk call (the kernel's ``migrate_device_range``): every page
in use in a range of device frames goes back to host memory.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..arguments import check_node
from ..array_ops import unique_ints
from ..errors import InvalidArgument
from ..flags import ENOENT, MigrateMode
from ..migrate.core import MigrationRequest, run_migration
from ..migrate.isolate import collect_folios
from ..migrate.result import MigrateResult

if TYPE_CHECKING:
    from ..dma import DmaEngine
    from ..machine import Machine
    from ..migrate.options import MigrateOptions
    from ..mm import AddressSpace

__all__ = ["EVICTION_POLICIES", "BlockTracker", "migrate_device_pages", "migrate_device_range", "tracker_of"]

#: Eviction order of a block entry ``(first_use, last_use)``: smaller goes first.
EVICTION_POLICIES: dict[str, Callable[[tuple[int, int]], int]] = {
    "lru": lambda use: use[1],
    "fifo": lambda use: use[0],
}
_TRACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class BlockTracker:
    """Blocks with pages resident on one device node, keyed ``(address space, block number)``.

    Entries hold ``(first_use, last_use)`` ticks. An entry may outlive its pages (the CPU or another device
    took them back): eviction finds nothing to move there and drops it. One entry per 2 MiB block, never
    per page.
    """

    def __init__(self) -> None:
        self._use: dict[tuple[AddressSpace, int], tuple[int, int]] = {}
        self._tick = itertools.count(1)

    def __len__(self) -> int:
        return len(self._use)

    def touch(self, mm: AddressSpace, blocks: np.ndarray) -> None:
        """Record an access to ``blocks`` (block numbers) of ``mm`` now."""
        t = next(self._tick)
        use = self._use
        # Blocks of closed address spaces hold nothing any more (their pages were freed): drop them here, so
        # that the tracker never keeps a closed address space alive.
        for key in [k for k in use if k[0].mm_struct.closed]:
            del use[key]
        for b in unique_ints(blocks).tolist():
            key = (mm, b)
            old = use.get(key)
            use[key] = (t, t) if old is None else (old[0], t)

    def forget(self, mm: AddressSpace, block: int | None = None) -> None:
        """Drop one block of ``mm``, or all of them (its address space closed)."""
        if block is not None:
            self._use.pop((mm, block), None)
            return
        for key in [k for k in self._use if k[0] is mm]:
            del self._use[key]

    def victims(self, policy: str, exclude: set[tuple[AddressSpace, int]]) -> list[tuple[AddressSpace, int]]:
        """Blocks in eviction order under ``policy``, without ``exclude`` (the batch being serviced)."""
        order = EVICTION_POLICIES[policy]
        keys = [k for k in self._use if k not in exclude]
        keys.sort(key=lambda k: order(self._use[k]))
        return keys

    def blocks(self, mm: AddressSpace) -> list[int]:
        """Tracked block numbers of ``mm``, in address order."""
        return sorted(b for m, b in self._use if m is mm)


def tracker_of(m: Machine, node: int) -> BlockTracker:
    """The block tracker of device node ``node`` of ``m`` (made on first use)."""
    per_node = _TRACKERS.setdefault(m, {})
    t = per_node.get(node)
    if t is None:
        t = per_node[node] = BlockTracker()
    return t


def _empty_result(n: int) -> MigrateResult:
    return MigrateResult(status=np.zeros(n, dtype=np.int32))


def migrate_device_pages(m: Machine, pfns: np.ndarray, engine: DmaEngine | None = None,
                         mode: MigrateMode = MigrateMode.SYNC,
                         options: MigrateOptions | None = None) -> MigrateResult:
    """Send the device pages ``pfns`` that are in use back to host memory (node 0).

    Free frames and frames a driver owns (no mapping) are not in use: their status is ``-ENOENT``. The
    others go through the migration core, with ``engine`` copying (no-copy migration) or the calling thread.
    Per-page status: ``0`` or ``-errno``. The caller holds no lock.
    """
    pfns = np.asarray(pfns, dtype=np.int64)
    t_thread, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    if engine is not None:
        mode = mode | MigrateMode.NO_COPY
    with m.changed:
        pages = m.pages
        used = (pages.refcount[pages.head[pfns]] > 0) & (pages.mapping[pfns] >= 0)
        sel = pfns[used]
        if sel.size == 0:
            res = _empty_result(pfns.size)
            res.status[:] = ENOENT
            return res
        status, heads = collect_folios(m, sel, 0)
    res = run_migration(m, MigrationRequest(heads=heads, node=0, mode=mode, pfns=sel, status=status,
                                            t_thread=t_thread, t_wall=t_wall, engine=engine, options=options,
                                            reason=None))  # the driver's own migration: no mm_migrate_pages
    full = np.full(pfns.size, ENOENT, dtype=np.int32)
    full[used] = res.status
    res.status = full
    return res


def migrate_device_range(m: Machine, start_pfn: int, npages: int, engine: DmaEngine | None = None,
                         mode: MigrateMode = MigrateMode.SYNC) -> MigrateResult:
    """Evict ``npages`` device frames from ``start_pfn`` to host memory, like ``migrate_device_range``.

    Parameters
    ----------
    m : Machine
        The machine.
    start_pfn, npages : int
        A range of frames of one device node.
    engine : DmaEngine, optional
        ``m.dma`` for no-copy migration (the engine copies); ``None`` copies on the calling thread.
    mode : MigrateMode
        ``ASYNC``, ``SYNC_LIGHT`` or ``SYNC``.

    Returns
    -------
    MigrateResult
        Status per frame: ``0`` (sent back), ``-ENOENT`` (not in use), or the core's ``-errno``.

    Raises
    ------
    InvalidArgument
        The range is not inside one device node, or ``engine`` is not ``m.dma``.
    """
    start_pfn, npages = int(start_pfn), int(npages)
    if npages <= 0 or start_pfn < 0 or start_pfn + npages > m.pages.nr_pfns:
        raise InvalidArgument(f"pfn range {start_pfn}+{npages} is not inside the machine's {m.pages.nr_pfns} pfns")
    pfns = start_pfn + np.arange(npages, dtype=np.int64)
    nodes = m.nodemap.node_of(pfns)
    node = int(nodes[0])
    if (nodes != node).any() or m.nodes[node].kind != "device":
        raise InvalidArgument(f"pfn range {start_pfn}+{npages} must lie inside one device node")
    if engine is not None and engine is not m.dma:
        raise InvalidArgument("engine must be this machine's DMA engine (m.dma) or None")
    return migrate_device_pages(m, pfns, engine, mode)


def evict_block(mm: AddressSpace, block: int, block_size: int, node: int, engine: DmaEngine | None,
                options: MigrateOptions | None) -> tuple[int, MigrateResult | None]:
    """Send the pages of one virtual block of ``mm`` that sit on ``node`` back to host memory.

    Returns the number of base pages sent back and the core's result (None when nothing was there).
    """
    m = mm.machine
    check_node(m, "node", node)
    ps = m.page_size
    start = block * block_size
    addrs = start + np.arange(block_size // ps, dtype=np.int64) * ps
    with m.changed:
        if mm.mm_struct.closed:
            return 0, None
        pfns, mapped = mm.mm_struct.lookup_settled(addrs)
        on = mapped & (pfns >= 0)
        on[on] = m.nodemap.node_of(pfns[on]) == node
        if not on.any():
            return 0, None
    res = migrate_device_pages(m, pfns[on], engine, options=options)
    return int((res.status == 0).sum()), res
