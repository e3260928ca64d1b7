"""The operations of ``dmamig stress``: regions with their byte models, shared counters, and the workers.

Bytes are modelled exactly: whoever writes a region (a writer, a pin holder, or the churn thread that owns
it) holds the region's lock while writing and updating the model, and a reader holds it while reading and
comparing. Migrations take no region lock: they must never change a byte, whenever they run. A pin holder
writes through its pin, not the page table, so its writes land on pages that migrations have unmapped.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AddressFault, InvalidArgument, OutOfMemory
from .flags import MigrateMode
from .migrate import MigrateVma

if TYPE_CHECKING:
    from .filemap import File
    from .machine import Machine
    from .migrate import MigrateOptions
    from .mm import AddressSpace

__all__ = ["ROLES", "Region", "Shared", "Worker", "region_bytes", "unaudited"]

#: Worker roles, dealt to threads round robin.
ROLES = ("writer", "reader", "migrator", "dma", "driver", "churn", "pinner")
#: Writes a pin holder makes through its pin before it drops it.
PINNER_WRITES = 8
_MODES = (MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC)


class Region:
    """A mapping of one address space and the model of its bytes; ``file``: the file it maps, from its start."""

    def __init__(self, mm: AddressSpace, addr: int, npages: int, shared: bool, order: int, churn: bool,
                 file: File | None = None):
        self.mm, self.addr, self.npages = mm, addr, npages
        self.shared, self.order, self.churn = shared, order, churn
        self.file = file
        self.lock = threading.Lock()
        self.model = np.zeros(npages * mm.machine.page_size, dtype=np.uint8)
        self.alive = True

    def __repr__(self) -> str:
        kind = ("shared" if self.shared else "private") + (f" order-{self.order}" if self.order else "")
        kind += f" file on {self.file.fs.name}" if self.file is not None else ""
        return f"region {self.addr:#x}+{self.npages} pages ({kind}{', churn' if self.churn else ''})"


def region_bytes(m: Machine, r: Region) -> np.ndarray:
    """The bytes a region holds now, read through its page tables without faulting anything in.

    A page absent from the page table reads as the page cache's page (shared memory) or zeros. Caller holds
    the machine's lock, with nothing in flight.
    """
    ps = m.page_size
    out = np.zeros(r.npages * ps, dtype=np.uint8)
    end = r.addr + r.npages * ps
    for v in r.mm.vmas:
        lo, hi = max(v.start, r.addr), min(v.end, end)
        if lo >= hi:
            continue
        s0, s1 = (lo - v.start) // ps, (hi - v.start) // ps
        pfns = v.pte_pfn[s0:s1].copy()
        if v.shared:
            absent = pfns < 0
            pfns[absent] = v.obj.pfns[v.pgoff + s0 + np.flatnonzero(absent)]
        have = np.flatnonzero(pfns >= 0)
        if have.size:
            pages = out[lo - r.addr: hi - r.addr].reshape(-1, ps)
            pages[have] = m.frames.read_pfns(pfns[have])
    return out


def unaudited(r: Region) -> bool:
    """Whether ``r`` maps a file of a filesystem that writes folios without the folio lock."""
    return r.file is not None and not r.file.fs.locks_folios



class Shared:
    """State shared by the workers: regions, address spaces, result sums and operation counts."""

    def __init__(self, m: Machine, report: Any, options: MigrateOptions | None = None):
        self.m = m
        self.report = report
        self.options = options  # every migration's; an experiment setting shows in the report
        # The un-audited filesystem's no-copy experiment is on: its lost writes are counted, not violations.
        self.losses_expected = options is not None and options.unaudited_no_copy
        self.lock = threading.Lock()
        self.regions: list[Region] = []
        self.files: list[File] = []
        self.spaces: list[AddressSpace] = []
        self.churn_spaces: list[AddressSpace] = []
        self.sums = {"success": 0, "fail": 0, "thp_success": 0, "thp_fail": 0, "vma_success": 0}
        self.op_counts: dict[str, int] = {}
        self.ops_done = 0
        self.progress = 0
        self.checked_at = -1  # ops_done at the last invariant check

    def add_region(self, r: Region) -> None:
        with self.lock:
            self.regions.append(r)

    def live_regions(self) -> list[Region]:
        with self.lock:
            return [r for r in self.regions if r.alive]

    def all_spaces(self) -> list[AddressSpace]:
        with self.lock:
            return self.spaces + self.churn_spaces

    def count(self, op: str) -> int:
        with self.lock:
            self.ops_done += 1
            self.op_counts[op] = self.op_counts.get(op, 0) + 1
            return self.ops_done

    def add_result(self, res: Any) -> None:
        with self.lock:
            self.sums["success"] += int(res.nr_succeeded)
            self.sums["fail"] += int(res.nr_failed)
            self.sums["thp_success"] += int(res.nr_thp_succeeded)
            self.sums["thp_fail"] += int(res.nr_thp_failed)

    def add_vma_success(self, n: int) -> None:
        with self.lock:
            self.sums["vma_success"] += int(n)


class Worker:
    """One stress thread: ``nops`` operations drawn from its roles, checked as they go."""

    def __init__(self, shared: Shared, name: str, roles: list[str], rng: np.random.Generator, nops: int,
                 stop: threading.Event, gate: Any, check_every: int):
        self.s, self.m = shared, shared.m
        self.name, self.roles, self.rng, self.nops = name, roles, rng, nops
        self.stop, self.gate, self.check_every = stop, gate, check_every
        self.doing = "starting"
        self.mm_churn: AddressSpace | None = None
        self.churn: list[Region] = []

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            for _ in range(self.nops):
                if self.stop.is_set():
                    return
                role = self.roles[int(self.rng.integers(len(self.roles)))]
                op = getattr(self, f"_{role}")
                self.doing = f"a {role} operation"
                try:
                    name = op()
                except Exception:
                    self.s.report.violations.append(f"{self.name}: {self.doing} raised:\n"
                                                    f"{traceback.format_exc()}")
                    self.stop.set()
                    return
                self.doing = "between operations"
                done = self.s.count(name)
                if done % self.check_every == 0:
                    self.gate.request()
                self.gate.arrive(self.stop)
        finally:
            self.doing = "finished"
            self.gate.leave()

    def _pick(self, churn_ok: bool = True) -> Region | None:
        regions = self.s.live_regions()
        if not churn_ok:
            regions = [r for r in regions if not r.churn]
        return regions[int(self.rng.integers(len(regions)))] if regions else None

    def _span(self, r: Region, max_pages: int = 64) -> tuple[int, int]:
        """A page-aligned sub-range of ``r``: ``(addr, npages)``; a large-folio region often whole folios."""
        ps = self.m.page_size
        n = int(self.rng.integers(1, min(max_pages, r.npages) + 1))
        first = int(self.rng.integers(0, r.npages - n + 1))
        return r.addr + first * ps, n

    # -- writers and readers ---------------------------------------------------------------------------------
    def _writer(self) -> str:
        if self.rng.random() < 0.3:
            return self._reader()
        r = self._pick()
        if r is None:
            return "idle"
        n = int(self.rng.integers(1, min(4 * self.m.page_size, r.model.size) + 1))
        off = int(self.rng.integers(0, r.model.size - n + 1))
        data = self.rng.integers(0, 256, n, dtype=np.uint8)
        self.doing = f"write {n} bytes at {r}+{off}"
        through_file = r.file is not None and r.shared and self.rng.random() < 0.5
        with r.lock:
            if not r.alive or off + n > r.model.size:  # unmapped or shrunk by the churn thread meanwhile
                return "idle"
            try:
                if through_file:
                    r.file.pwrite(data, off)  # the region maps the file from its start
                else:
                    r.mm.write(r.addr + off, data)
            except OutOfMemory:
                return "write-oom"  # nothing was written: the model stays as it is
            r.model[off: off + n] = data
        return "pwrite" if through_file else "write"

    def _reader(self) -> str:
        r = self._pick()
        if r is None:
            return "idle"
        n = int(self.rng.integers(1, min(4 * self.m.page_size, r.model.size) + 1))
        off = int(self.rng.integers(0, r.model.size - n + 1))
        self.doing = f"read {n} bytes at {r}+{off}"
        with r.lock:
            if not r.alive or off + n > r.model.size:
                return "idle"
            try:
                got = r.mm.read(r.addr + off, n)
            except OutOfMemory:
                return "read-oom"
            want = r.model[off: off + n]
            # The un-audited filesystem's lost writes, where the experiment allows them, are counted (and
            # checked against its unlocked writes) by the invariant check instead.
            if not np.array_equal(got, want) and not (self.s.losses_expected and unaudited(r)):
                bad = int(np.flatnonzero(got != want)[0])
                self.s.report.violations.append(f"{self.name}: read of {r} at offset {off + bad} returned "
                                                f"{int(got[bad])}, the model holds {int(want[bad])}")
                self.stop.set()
        with self.s.lock:
            self.s.report.bytes_verified += n
        return "read"

    def _pinner(self) -> str:
        """Pin a few pages, write them through the pin while migrations come and go, then drop the pin.

        The writes go straight to the pinned frames: a migration may have the pages unmapped, copied (by the
        DMA engine) and be retrying their move when one lands, and the pin may be dropped before its next
        pass. No write may be lost.
        """
        r = self._pick(churn_ok=False)
        if r is None:
            return "idle"
        ps = self.m.page_size
        addr, n = self._span(r, 4)
        self.doing = f"pin {n} pages of {r} at {addr:#x}"
        try:
            r.mm.pin(addr, n * ps)
        except OutOfMemory:
            return "pin-oom"
        try:
            base = addr - r.addr
            for _ in range(PINNER_WRITES):
                size = int(self.rng.integers(1, n * ps + 1))
                off = base + int(self.rng.integers(0, n * ps - size + 1))
                data = self.rng.integers(0, 256, size, dtype=np.uint8)
                self.doing = f"write {size} bytes through a pin at {r}+{off}"
                with r.lock:
                    r.mm.write_pinned(r.addr + off, data)
                    r.model[off: off + size] = data
                time.sleep(0)  # let migrations of these pages run between the writes
        finally:
            self.doing = f"unpin {n} pages of {r} at {addr:#x}"
            r.mm.unpin(addr, n * ps)
        return "pin-write"

    # -- migrations ------------------------------------------------------------------------------------------
    def _node(self) -> int:
        return int(self.rng.integers(len(self.m.nodes)))

    def _migrator(self, engine: Any = None) -> str:
        r = self._pick()
        if r is None:
            return "idle"
        addr, n = self._span(r, 512 if r.order else 64)
        node, mode = self._node(), _MODES[int(self.rng.integers(3))]
        kind = "dma" if engine is not None else "copy"
        if engine is None and self.rng.random() < 0.3:
            return self._migrate_pfns(r, addr, n, node, mode)
        self.doing = f"migrate ({kind}, {mode.name}) {n} pages of {r} at {addr:#x} to node {node}"
        try:
            res = r.mm.migrate(addr, n * self.m.page_size, node, mode=mode, engine=engine,
                               options=self.s.options)
        except (AddressFault, InvalidArgument) as exc:
            if r.churn:
                return f"migrate-{kind}-raced"  # the churn thread unmapped it meanwhile
            raise AssertionError(f"migration of a stable region raised {exc!r}") from exc
        if res.status.size != n or (res.status > 0).any():
            raise AssertionError(f"bad result: {res.status.size} statuses for {n} pages, {res.status[:8]}")
        self.s.add_result(res)
        return f"migrate-{kind}-{mode.name.lower()}"

    def _dma(self) -> str:
        return self._migrator(self.m.dma)

    def _migrate_pfns(self, r: Region, addr: int, n: int, node: int, mode: MigrateMode) -> str:
        self.doing = f"migrate_pages ({mode.name}) of {n} pfns of {r} to node {node}"
        try:
            pfns = r.mm.pfns_of(addr, n * self.m.page_size)
        except (AddressFault, InvalidArgument):
            if r.churn:
                return "migrate-pfns-raced"
            raise
        pfns = pfns[pfns >= 0]
        if pfns.size == 0:
            return "idle"
        # The pfns may be stale by now (migrated or freed meanwhile): whatever page they hold must survive.
        res = self.m.migrate_pages(pfns, node, mode=mode, options=self.s.options)
        self.s.add_result(res)
        return "migrate-pfns"

    def _driver(self) -> str:
        r = self._pick()
        if r is None or r.shared or r.file is not None:
            return "idle"
        addr, n = self._span(r, 64)
        node = 1 + int(self.rng.integers(len(self.m.nodes) - 1)) if len(self.m.nodes) > 1 else 0
        use_dma = bool(self.rng.random() < 0.7)
        self.doing = f"MigrateVma of {n} pages of {r} at {addr:#x} to node {node} ({'dma' if use_dma else 'cpu'})"
        mv = MigrateVma(r.mm, addr, addr + n * self.m.page_size, node)
        try:
            mv.setup()
        except (AddressFault, InvalidArgument):
            if r.churn:
                return "migrate-vma-raced"
            raise
        # Once set up, the steps must run to the end, or the range stays unmapped and locked.
        mv.alloc_and_copy(engine=self.m.dma if use_dma else None)
        mv.pages()
        mv.finalize()
        self.s.add_vma_success(int((mv.status == 0).sum()))
        return "migrate-vma"

    # -- fork, mmap and munmap churn -------------------------------------------------------------------------
    def _churn(self) -> str:
        m, ps = self.m, self.m.page_size
        if self.mm_churn is None:
            self.mm_churn = m.address_space()
            with self.s.lock:
                self.s.churn_spaces.append(self.mm_churn)
        self.churn = [r for r in self.churn if r.alive]
        pick = self.rng.random()
        if not self.churn or (pick < 0.3 and len(self.churn) < 4):
            return self._churn_mmap()
        r = self.churn[int(self.rng.integers(len(self.churn)))]
        if pick < 0.6:
            return self._churn_fork(r)
        self.doing = f"munmap of {r}"
        with r.lock:
            if r.npages > 1 and self.rng.random() < 0.5:
                keep = r.npages // 2
                r.mm.munmap(r.addr + keep * ps, (r.npages - keep) * ps)
                r.npages = keep
                r.model = r.model[: keep * ps].copy()
                return "munmap-part"
            r.mm.munmap(r.addr, r.npages * ps)
            r.alive = False
        return "munmap"

    def _churn_mmap(self) -> str:
        ps = self.m.page_size
        n = int(self.rng.integers(1, 33))
        shared = bool(self.rng.random() < 0.4)
        self.doing = f"mmap and fill {n} pages ({'shared' if shared else 'private'})"
        addr = self.mm_churn.mmap(n * ps, shared=shared)
        r = Region(self.mm_churn, addr, n, shared, 0, churn=True)
        data = self.rng.integers(0, 256, n * ps, dtype=np.uint8)
        try:
            self.mm_churn.write(addr, data)
            r.model[:] = data
        except OutOfMemory:
            pass  # the model stays zero, as the pages that did fault in
        self.churn.append(r)
        self.s.add_region(r)
        return "mmap"

    def _churn_fork(self, r: Region) -> str:
        ps = self.m.page_size
        self.doing = f"fork with {r}"
        # The region's lock is held from the fork on: writers of other threads must not change the parent
        # between the fork and the comparison.
        with r.lock:
            if not r.alive:
                return "idle"
            try:
                child = self.mm_churn.fork()
            except OutOfMemory:
                return "fork-oom"
            try:
                self.doing = f"check a forked child's copy of {r}"
                got = child.read(r.addr, r.npages * ps)
                if not np.array_equal(got, r.model):
                    bad = int(np.flatnonzero(got != r.model)[0])
                    raise AssertionError(f"a forked child sees other bytes than its parent in {r} (first at "
                                         f"offset {bad})")
                data = self.rng.integers(0, 256, ps, dtype=np.uint8)
                child.write(r.addr, data)
                after = self.mm_churn.read(r.addr, ps)
                if r.shared:
                    r.model[:ps] = data  # shared memory: the parent sees the child's write
                if not np.array_equal(after, r.model[:ps]):
                    raise AssertionError(f"after a child's write, the parent's {r} holds the wrong bytes "
                                         f"({'shared' if r.shared else 'private'} semantics broken)")
            except OutOfMemory:
                pass
            finally:
                self.doing = "close a forked child"
                child.close()
        return "fork"
