"""Device-side access to an address space: a device node reads and writes virtual memory, UVM-style.

Pages resident on the device are accessed in place (on the CUDA backend by the ``page_access`` kernel on
that GPU's frames; on the CPU backend by its numpy reference). Other pages fault: the access runs in
order, and each time its non-resident pages fill a fault batch, the batch is serviced
(:class:`~dmamig.uvm.faults.FaultService`) and the access replays up to there. A page that cannot come
(pinned, no room anywhere) is accessed where it is, as a remote access.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import as_bytes, check_node
from ..array_ops import unique_ints
from ..errors import AddressFault, InvalidArgument
from ..flags import PteFlag
from ..memory import check_access
from .counters import AccessCounters
from .evict import migrate_device_pages
from .faults import FaultService
from .inplace import load, on_device, read_touch, store
from .options import UvmOptions, UvmStats

if TYPE_CHECKING:
    from ..mm import AddressSpace

__all__ = ["DeviceAccessor"]

_YOUNG = np.uint8(PteFlag.YOUNG)
_DIRTY = np.uint8(PteFlag.YOUNG | PteFlag.DIRTY)
_WRITE = np.uint8(PteFlag.WRITE)
_MIGRATION = np.uint8(PteFlag.MIGRATION)
#: Times an access services its own pages again when they left the device before it reached them.
REFAULT_TRIES = 2


class DeviceAccessor:
    """Device node ``node`` accessing ``mm``'s memory, faulting non-resident pages to itself.

    Parameters
    ----------
    mm : AddressSpace
        The address space the device works in (HMM/UVM share the process's page tables).
    node : int
        A device node of the machine.
    options : UvmOptions, optional
        Fault batching, prefetch, copy or no-copy servicing, eviction policy.

    Notes
    -----
    Every method is thread-safe as the address space is. Counters accumulate in :attr:`stats`; CPU faults
    that bring pages back are the machine's ``vmstat["migrate_to_ram"]``.
    """

    def __init__(self, mm: AddressSpace, node: int, options: UvmOptions | None = None):
        m = mm.machine
        node = check_node(m, "node", node)
        if m.nodes[node].kind != "device":
            raise InvalidArgument(f"node {node} is host memory; a DeviceAccessor needs a device node "
                                  f"(1..{len(m.nodes) - 1})")
        if options is None:
            options = UvmOptions()
        elif not isinstance(options, UvmOptions):
            raise InvalidArgument(f"options must be a UvmOptions or None, got {options!r}")
        self.mm, self.node, self.options = mm, node, options
        self.stats = UvmStats()
        self._svc = FaultService(mm, node, options, self.stats)
        t = options.access_counter_threshold
        self._counters = AccessCounters(t) if t else None

    # -- public API ----------------------------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> np.ndarray:
        """Read ``length`` bytes at ``addr`` on the device.

        Parameters
        ----------
        addr, length : int
            Any address and a positive length inside mapped, readable memory.

        Returns
        -------
        numpy.ndarray
            A host copy of the bytes (uint8). Non-resident pages faulted in on the device first.

        Raises
        ------
        AddressFault
            An address is not mapped, or its mapping is not readable.
        """
        addr, length = self.mm.mm_struct.check_range(addr, length, aligned=False)
        ps = self.mm.machine.page_size
        first = addr - addr % ps
        npages = -(-(addr + length - first) // ps)
        out = np.empty((npages, ps), dtype=np.uint8)

        def visit(lo: int, hi: int, pfns: np.ndarray) -> None:
            out[lo:hi] = load(self.mm.machine, self.node, pfns)

        self._run(first + np.arange(npages, dtype=np.int64) * ps, False, visit, contiguous=True)
        off = addr - first
        return out.reshape(-1)[off: off + length].copy()

    def write(self, addr: int, data: Any) -> None:
        """Write ``data`` at ``addr`` from the device.

        Parameters
        ----------
        addr : int
            Any address inside mapped, writable memory.
        data : bytes-like or numpy.ndarray
            The bytes (a uint8 array or anything with the buffer protocol), not empty.

        Notes
        -----
        Pages fault in on the device; a copy-on-write page gets a copy of its own there. Bytes of the first
        and last page outside ``data`` keep their content. Read duplicates of the pages are dropped first.
        """
        buf = as_bytes(data)
        addr, length = self.mm.mm_struct.check_range(addr, buf.size, aligned=False)
        ps = self.mm.machine.page_size
        first = addr - addr % ps
        npages = -(-(addr + length - first) // ps)
        rows = np.empty((npages, ps), dtype=np.uint8)
        off, end = addr - first, addr - first + length
        rows.reshape(-1)[off:end] = buf
        tail = npages * ps - end  # bytes of the last page after the data, kept as they are

        def visit(lo: int, hi: int, pfns: np.ndarray) -> None:
            chunk = rows[lo:hi]
            if lo == 0 and off:
                chunk[0, :off] = load(self.mm.machine, self.node, pfns[:1])[0, :off]
            if hi == npages and tail:
                chunk[-1, ps - tail:] = load(self.mm.machine, self.node, pfns[-1:])[0, ps - tail:]
            store(self.mm.machine, self.node, pfns, chunk)

        self._run(first + np.arange(npages, dtype=np.int64) * ps, True, visit, contiguous=True)

    def read_pages(self, addrs: Any) -> np.ndarray:
        """Read whole pages, a scattered page list.

        Parameters
        ----------
        addrs : array of int
            Page-aligned addresses, in any order; repeats are allowed (a repeat in one fault batch is a
            duplicate fault).

        Returns
        -------
        numpy.ndarray
            ``(len(addrs), page_size)`` uint8, row ``i`` the page at ``addrs[i]``.
        """
        addrs = self._as_page_addrs(addrs)
        out = np.empty((addrs.size, self.mm.machine.page_size), dtype=np.uint8)

        def visit(lo: int, hi: int, pfns: np.ndarray) -> None:
            out[lo:hi] = load(self.mm.machine, self.node, pfns)

        self._run(addrs, False, visit)
        return out

    def write_pages(self, addrs: Any, data: Any) -> None:
        """Write whole pages, a scattered page list.

        Parameters
        ----------
        addrs : array of int
            Page-aligned addresses, in any order.
        data : numpy.ndarray
            ``(len(addrs), page_size)`` uint8; row ``i`` goes to ``addrs[i]``. Where an address repeats, the
            last of its rows is what stays.
        """
        addrs = self._as_page_addrs(addrs)
        ps = self.mm.machine.page_size
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.shape != (addrs.size, ps):
            raise InvalidArgument(f"data must be a uint8 array of shape ({addrs.size}, {ps}), got "
                                  f"{data.dtype} {data.shape}")

        def visit(lo: int, hi: int, pfns: np.ndarray) -> None:
            p, rows = pfns, data[lo:hi]
            _, last = np.unique(p[::-1], return_index=True)
            keep = p.size - 1 - last
            store(self.mm.machine, self.node, p[keep], rows[keep])

        self._run(addrs, True, visit)

    def touch(self, addr: int, length: int, write: bool = False) -> int:
        """Access ``[addr, addr + length)`` without moving data to the host, as a kernel sweeping it would.

        Parameters
        ----------
        addr, length : int
            The range.
        write : bool
            A read touch reads every byte of every page on the device (the ``page_checksum`` kernel on CUDA,
            a compiled pass on the CPU backend); a write touch makes the pages writable and dirty in place.

        Returns
        -------
        int
            The number of pages touched.
        """
        addr, length = self.mm.mm_struct.check_range(addr, length, aligned=False)
        m = self.mm.machine
        ps = m.page_size
        first = addr - addr % ps
        npages = -(-(addr + length - first) // ps)

        def visit(lo: int, hi: int, pfns: np.ndarray) -> None:
            if not write:
                read_touch(self.mm.machine, self.node, pfns)

        self._run(first + np.arange(npages, dtype=np.int64) * ps, write, visit, contiguous=True)
        return npages

    def prefetch(self, addr: int, length: int) -> int:
        """Migrate ``[addr, addr + length)`` to the device now, with no fault (``cudaMemPrefetchAsync``).

        Block by block (2 MiB), evicting other blocks when the device is full; untouched pages get zeroed
        device pages. Returns the number of pages of the range resident on the device afterwards (those
        that could not come, pinned ones for instance, stay where they are).
        """
        addrs = self._range_pages(addr, length)
        bs = self._svc.block_size
        blocks = addrs // bs
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        for part in np.split(addrs, cuts):
            self._svc.prefetch_pages(part)
        return int(self._resident(addrs).sum())

    def evict(self, addr: int, length: int) -> int:
        """Send this device's pages of ``[addr, addr + length)`` back to host memory; return how many went.

        The bulk eviction of a range, through the same engine the faults use (``migrate_device_pages``).
        """
        addrs = self._range_pages(addr, length)
        m = self.mm.machine
        with m.changed:
            pfns, _ = self.mm.mm_struct.lookup_settled(addrs)
        on = on_device(self.mm.machine, self.node, pfns)
        if not on.any():
            return 0
        res = migrate_device_pages(m, pfns[on], self._svc.engine, options=self.options.migrate_options)
        n = int((res.status == 0).sum())
        self.stats.pages_evicted += n
        self.stats.bytes_evicted += n * m.page_size
        return n

    def _range_pages(self, addr: int, length: int) -> np.ndarray:
        self.mm.mm_struct.check_open()
        addr, length = self.mm.mm_struct.check_range(addr, length, aligned=False)
        ps = self.mm.machine.page_size
        first = addr - addr % ps
        npages = -(-(addr + length - first) // ps)
        addrs = first + np.arange(npages, dtype=np.int64) * ps
        with self.mm.machine.changed:
            _pfns, mapped = self.mm.mm_struct.lookup_settled(addrs)
        if not mapped.all():
            raise AddressFault(f"device access at {int(addrs[~mapped][0]):#x}: address not mapped")
        return addrs

    def _resident(self, addrs: np.ndarray) -> np.ndarray:
        with self.mm.machine.changed:
            pfns, _ = self.mm.mm_struct.lookup_settled(addrs)
            return on_device(self.mm.machine, self.node, pfns)

    def close(self) -> None:
        """Drop this device's read duplicates and stop listening to the address space. Idempotent.

        Pages the device holds stay where they are (they belong to the address space).
        """
        svc = self._svc
        if svc.dups is not None:
            with self.mm.machine.changed:
                self.stats.pages_collapsed += svc.dups.drop(0, 1 << 62)
            self.mm.unregister_notifier(svc.collapse)

    def __enter__(self) -> DeviceAccessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_stats(self) -> UvmStats:
        """Start the counters again; return the old ones."""
        old = self.stats
        self.stats = UvmStats()
        self._svc.stats = self.stats
        return old

    # -- the access loop -----------------------------------------------------------------------------------------
    def _as_page_addrs(self, addrs: Any) -> np.ndarray:
        arr = np.asarray(addrs)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise InvalidArgument(f"addrs must be a non-empty 1-D array of integers, got {arr.dtype} {arr.shape}")
        ps = self.mm.machine.page_size
        if (arr < 0).any() or (arr % ps).any():
            raise InvalidArgument(f"addrs must be page-aligned ({ps} bytes) and >= 0")
        return arr.astype(np.int64)

    def _run(self, addrs: np.ndarray, write: bool, visit: Callable[[int, int, np.ndarray], None],
             contiguous: bool = False) -> None:
        """Access page ``addrs[i]`` in order, calling ``visit(lo, hi, pfns)`` on each serviced stretch."""
        self.mm.mm_struct.check_open()
        m = self.mm.machine
        if contiguous:
            uniq, inv = addrs, np.arange(addrs.size, dtype=np.int64)
        else:
            uniq, inv = np.unique(addrs, return_inverse=True)
        with m.changed:
            pfns, mapped = self.mm.mm_struct.lookup_settled(uniq)
            if not mapped.all():
                raise AddressFault(f"device access at {int(uniq[~mapped][0]):#x}: address not mapped")
            for v, pos, _slots in self.mm.mm_struct.lookup(uniq)[1]:
                check_access(v, int(uniq[pos[0]]), write)
            if write and self._svc.dups is not None:
                # A write collapses every read duplicate of its pages, this device's and the others'.
                self.mm.mm_struct.notify(int(uniq[0]), int(uniq[-1]) + m.page_size)
            known = pfns >= 0
            known[known] = m.nodemap.node_of(pfns[known]) == self.node
            if not write:
                known |= self._svc.duplicated(uniq)
            elsewhere = (pfns >= 0) & ~known
        self.stats.accesses += 1
        self.stats.pages_resident += int(known[inv].sum())
        remote_ok = self._count_remote(uniq, inv, elsewhere, contiguous)
        known |= remote_ok
        k = self.options.faults_per_page if contiguous else 1
        per_batch = max(1, -(-self.options.fault_batch_size // k))
        n, ptr = inv.size, 0
        while ptr < n:
            end = self._batch_end(known, inv, ptr, per_batch)
            chunk = inv[ptr:end]
            fault_idx = chunk[~known[chunk]]
            if fault_idx.size:
                entries = uniq[fault_idx]
                done = self._svc.service_batch(np.repeat(entries, k) if k > 1 else entries,
                                               self._blocks(uniq[unique_ints(chunk)]), write)
                known[fault_idx] = True
                pos = np.searchsorted(uniq, done) if not contiguous else (done - uniq[0]) // m.page_size
                ok = (pos >= 0) & (pos < uniq.size)
                ok[ok] = uniq[pos[ok]] == done[ok]
                known[pos[ok]] = True
            self._access_chunk(uniq, chunk, ptr, end, write, visit, remote_ok)
            ptr = end

    def _count_remote(self, uniq: np.ndarray, inv: np.ndarray, elsewhere: np.ndarray,
                      contiguous: bool) -> np.ndarray:
        """Access-counter migration: which pages stay remote this time (bool over ``uniq``)."""
        remote_ok = np.zeros(uniq.size, dtype=bool)
        if self._counters is None or not elsewhere.any():
            return remote_ok
        times = np.ones(uniq.size, dtype=np.int64) if contiguous else np.bincount(inv, minlength=uniq.size)
        idx = np.flatnonzero(elsewhere)
        reached = self._counters.count(uniq[idx], times[idx])
        remote_ok[idx[~reached]] = True
        self.stats.pages_counter_migrated += int(reached.sum())
        return remote_ok

    @staticmethod
    def _batch_end(known: np.ndarray, inv: np.ndarray, ptr: int, per_batch: int) -> int:
        """End of the stretch from ``ptr`` whose non-resident entries fill one fault batch."""
        n = inv.size
        w = per_batch * 4
        while True:
            miss = np.flatnonzero(~known[inv[ptr: ptr + w]])
            if miss.size >= per_batch:
                return ptr + int(miss[per_batch - 1]) + 1
            if ptr + w >= n:
                return n
            w *= 4

    def _access_chunk(self, uniq: np.ndarray, chunk: np.ndarray, lo: int, hi: int, write: bool,
                      visit: Callable[[int, int, np.ndarray], None], remote_ok: np.ndarray) -> None:
        """Access entries ``[lo, hi)`` in place once their pages are on the device (or cannot come, or are
        left remote by access-counter migration)."""
        m, st = self.mm.machine, self.stats
        cu = unique_ints(chunk)
        addrs = uniq[cu]
        stay = remote_ok[cu]
        for attempt in range(REFAULT_TRIES + 1):
            t0 = time.perf_counter_ns()
            with m.changed:
                pfns, hits = self._settled(addrs)
                if sum(pos.size for _v, pos, _s in hits) != addrs.size:
                    mapped = np.zeros(addrs.size, dtype=bool)
                    for _v, pos, _s in hits:
                        mapped[pos] = True
                    raise AddressFault(f"device access at {int(addrs[~mapped][0]):#x}: unmapped during the "
                                       f"access")
                on = pfns >= 0
                on[on] = m.nodemap.node_of(pfns[on]) == self.node
                if not write and self._svc.dups is not None:
                    dup = self._svc.dups.lookup(addrs)
                    use = (dup >= 0) & ~on
                    pfns = np.where(use, dup, pfns)
                    on |= use
                st.service_ns["replay"] += time.perf_counter_ns() - t0
                if (on | stay).all() or attempt == REFAULT_TRIES:
                    t1 = time.perf_counter_ns()
                    if write:
                        self._svc.make_writable(addrs)
                        pfns, hits = self._settled(addrs)
                    st.pages_remote += int((~on).sum())
                    visit(lo, hi, pfns[np.searchsorted(cu, chunk)])
                    bits = _DIRTY if write else _YOUNG
                    for v, _pos, slots in hits:
                        v.pte_flags[slots] |= bits
                    self._svc.tracker.touch(self.mm, addrs[on] // self._svc.block_size)
                    st.access_ns += time.perf_counter_ns() - t1
                    return
                missing = addrs[~on & ~stay]
            # The pages left the device since they were serviced (evicted for a later batch, or taken by the
            # CPU or another device): they fault again, as a replayed access would.
            self._svc.service_batch(missing, self._blocks(addrs), write)

    def _blocks(self, addrs: np.ndarray) -> np.ndarray:
        return unique_ints(addrs // self._svc.block_size)

    def _settled(self, addrs: np.ndarray) -> tuple[np.ndarray, list]:
        """Pfns and per-VMA hits of ``addrs`` once none holds a migration entry (``changed`` held)."""
        while True:
            pfns, hits = self.mm.mm_struct.lookup(addrs)
            if not any((v.pte_flags[slots] & _MIGRATION).any() for v, _pos, slots in hits):
                return pfns, hits
            self.mm.machine.changed.wait()
