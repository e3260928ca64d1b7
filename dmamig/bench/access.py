"""Device-access scenarios: a device reads (and, in the stencil, writes) host memory through faults, UVM-style.

Each scenario runs in copy mode (the faulting thread copies) and no-copy mode (the DMA engine copies), through
:class:`~dmamig.uvm.DeviceAccessor` with UVM's defaults (density prefetch, LRU eviction) and the kernel's
migration batching:

- ``stream``: the device reads the whole working set in order, in place (``touch``), at every fault batch size
  of the sweep: the fault-servicing figure;
- ``random``: 4 KiB reads of a random quarter of the pages, in random order (``read_pages``);
- ``strided``: reads of every 16th page (``read_pages``);
- ``stencil``: tile by tile (2 MiB), each tile read with its neighbours' edge pages and written back changed,
  over a device holding ``1 / oversubscription`` of the working set, in its steady state (after an untimed
  sweep; a device that holds it all faults no more, one that does not migrates and evicts every sweep).

Every timed access is followed, in the same round, by its ceiling: the same access once the range is on the
device (the range pre-migrated: for the reads, by the faulting access itself; for the stencil, on a second
machine whose device holds the whole range, prefetched). Every byte an access read is checked against what
was written, the ceiling must not fault, and no frame may leak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..sweep.tasks import ProgressFn, Task
from ..uvm.options import DEFAULT_FAULT_BATCH_SIZE, VA_BLOCK_SIZE, UvmOptions
from .access_figures import Sample, access_record
from .parsing import PAGE_SIZE, parse_int_list
from .scenarios import BenchSettings
from .verify import check, random_bytes, verify_no_leak

__all__ = [
    "ACCESS_PATTERNS",
    "AccessScenario",
    "access_scenarios",
    "access_tasks",
    "parse_fault_batches",
    "parse_oversubscription",
    "run_access",
    "stream_batches",
]

#: Access patterns, in sweep order.
ACCESS_PATTERNS = ("stream", "random", "strided", "stencil")
#: The strided pattern reads every STRIDE_PAGES-th page.
STRIDE_PAGES = 16
#: The random pattern reads one page in RANDOM_SHARE, each once, in random order.
RANDOM_SHARE = 4
#: Pages of one stencil tile: one 2 MiB virtual block, the unit UVM services and evicts.
TILE_PAGES = VA_BLOCK_SIZE // PAGE_SIZE
_WORDS = {"stream": "streaming read", "random": f"random 4K reads (1/{RANDOM_SHARE} of the pages)",
          "strided": f"strided read (every {STRIDE_PAGES}th page)", "stencil": "stencil"}


@dataclass(frozen=True)
class AccessScenario:
    """One device-access scenario in one mode: what :func:`run_access` runs for an ``"access"`` task.

    Attributes
    ----------
    pattern : str
        One of :data:`ACCESS_PATTERNS`.
    mode : str
        ``"copy"`` or ``"nocopy"``.
    fault_batch : int
        ``UvmOptions.fault_batch_size``.
    working_bytes : int
        The range the device accesses.
    channels : int or None
        DMA channels (``None`` in copy mode).
    oversubscription : float or None
        Stencil only: working set over device memory.
    """

    pattern: str
    mode: str
    fault_batch: int
    working_bytes: int
    channels: int | None
    oversubscription: float | None = None

    @property
    def id(self) -> str:
        """A stable id, e.g. ``access/stream/b256/nocopy/ch2`` or ``access/stencil/2x/b256/copy``."""
        over = f"/{self.oversubscription:g}x" if self.oversubscription is not None else ""
        ch = f"/ch{self.channels}" if self.mode == "nocopy" else ""
        return f"access/{self.pattern}{over}/b{self.fault_batch}/{self.mode}{ch}"

    @property
    def name(self) -> str:
        """In words, e.g. ``device access, streaming read, fault batch 256, no-copy, 2 DMA channels``."""
        what = _WORDS[self.pattern]
        if self.oversubscription is not None:
            what += f" over {self.oversubscription:g}x device memory"
        how = "copy" if self.mode == "copy" else \
            f"no-copy, {self.channels} DMA channel" + ("" if self.channels == 1 else "s")
        return f"device access, {what}, fault batch {self.fault_batch}, {how}"

    @property
    def working_pages(self) -> int:
        """Base pages of the working set."""
        return self.working_bytes // PAGE_SIZE

    @property
    def touched_pages(self) -> int:
        """Distinct pages one access (or one stencil sweep) reads or writes."""
        if self.pattern == "random":
            return max(1, self.working_pages // RANDOM_SHARE)
        if self.pattern == "strided":
            return -(-self.working_pages // STRIDE_PAGES)
        return self.working_pages

    @property
    def device_pages(self) -> int | None:
        """Frames of the stencil's device node (``None``: room for the whole working set)."""
        if self.oversubscription is None:
            return None
        return max(1, int(self.working_pages / self.oversubscription))

    def uvm_options(self) -> UvmOptions:
        """UVM's defaults with this scenario's fault batch and mode."""
        return UvmOptions(fault_batch_size=self.fault_batch, no_copy=self.mode == "nocopy")


# -- the sweep ---------------------------------------------------------------------------------------------------

def access_scenarios(settings: BenchSettings) -> list[AccessScenario]:
    """The device-access scenarios of ``settings``, each in copy then no-copy mode (empty without ``access``).

    Streaming runs at UVM's batch size (256) and every size of ``settings.fault_batches``; the random and
    strided reads and the stencils run at 256; the stencil at every factor of ``settings.oversubscription``.
    No-copy uses the sweep's largest channel count.
    """
    if not settings.access:
        return []
    ch = max(settings.channels)
    size = settings.access_bytes
    plan: list[tuple[str, int, float | None]] = [("stream", b, None) for b in stream_batches(settings)]
    plan += [("random", DEFAULT_FAULT_BATCH_SIZE, None), ("strided", DEFAULT_FAULT_BATCH_SIZE, None)]
    plan += [("stencil", DEFAULT_FAULT_BATCH_SIZE, float(f)) for f in sorted(set(settings.oversubscription))]
    return [AccessScenario(p, mode, b, size, ch if mode == "nocopy" else None, f)
            for p, b, f in plan for mode in ("copy", "nocopy")]


def stream_batches(settings: BenchSettings) -> list[int]:
    """Fault batch sizes of the streaming read: UVM's (256) and every size of ``settings.fault_batches``."""
    return sorted({DEFAULT_FAULT_BATCH_SIZE, *settings.fault_batches})


def _reps(sc: AccessScenario, settings: BenchSettings) -> tuple[int, int]:
    # The stencil is measured in its steady state: at least one untimed sweep first.
    warmup = max(1, settings.warmup) if sc.pattern == "stencil" else settings.warmup
    return warmup, settings.repeat


def access_tasks(settings: BenchSettings) -> list[Task]:
    """One task per :func:`access_scenarios` entry. They need no direction ceiling: each measures its own
    (the same access, pre-migrated) in the same round."""
    return [Task(sc.id, sc.name, "access", sum(_reps(sc, settings)), (), sc, 3000 + i)
            for i, sc in enumerate(access_scenarios(settings))]


def parse_fault_batches(text: str) -> list[int]:
    """Parse a comma-separated list of fault batch sizes (``32,256,1024``), each in 1..65536.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a size out of range.
    """
    return parse_int_list(text, "fault batch size", 1, 1 << 16, "32,256,1024")


def parse_oversubscription(text: str) -> list[float]:
    """Parse a comma-separated list of oversubscription factors (``0.5,1,1.5,2``), each in (0, 16].

    Raises
    ------
    ValueError
        On an empty list, a value that is not a number, or one out of range.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("expected a comma-separated list of oversubscription factors, e.g. 0.5,1,2")
    out: dict[str, tuple[float, str]] = {}
    for item in items:
        try:
            v = float(item)
        except ValueError:
            v = float("nan")
        if not 0 < v <= 16:  # also false for nan
            raise ValueError(f"{item!r} is not an oversubscription factor; use numbers in (0, 16] (working set "
                             f"over device memory), e.g. 0.5,1,2")
        # A scenario's id names its factor in 6 significant digits: two factors that read alike would give two
        # scenarios one id (one record hiding the other, a resume skipping the second).
        label = f"{v:g}"
        if label in out and out[label][0] != v:
            raise ValueError(f"{out[label][1]!r} and {item!r} are one oversubscription factor ({label}x) in the "
                             f"scenario ids; give factors that differ within 6 significant digits")
        out.setdefault(label, (v, item))
    return sorted(v for v, _ in out.values())


# -- running one scenario ----------------------------------------------------------------------------------------

def run_access(payload: AccessScenario, settings: BenchSettings, progress: ProgressFn,
               seed: int) -> list[dict[str, Any]]:
    """Run one device-access scenario (an ``"access"`` task) and return its record.

    Raises
    ------
    VerificationError
        When a byte read differs from the byte written, a page could not come to the device, the ceiling
        faulted, or a frame leaked.
    """
    run = _run_stencil if payload.pattern == "stencil" else _run_reads
    samples = run(payload, settings, progress, seed)
    return [access_record(payload, samples)]


def _machine(settings: BenchSettings, sc: AccessScenario, device_pages: int) -> Any:
    from ..machine import Machine

    # Whole 2 MiB blocks of host memory plus a spare one, as the migration scenarios' machines have.
    host = (-(-sc.working_pages // TILE_PAGES) + 1) * TILE_PAGES
    return Machine(host_pages=host, device_pages=device_pages, devices=1, page_size=PAGE_SIZE,
                   backend=settings.backend, channels=sc.channels or 1, dma_poll_us=settings.machine_poll())


def _read_plan(sc: AccessScenario, seed: int) -> np.ndarray | None:
    """Page indexes a read scenario reads, in access order (``None``: the whole range, in order)."""
    pages = sc.working_pages
    if sc.pattern == "random":
        return np.random.default_rng(seed).permutation(pages)[: sc.touched_pages]
    if sc.pattern == "strided":
        return np.arange(0, pages, STRIDE_PAGES)
    return None


def _run_reads(sc: AccessScenario, settings: BenchSettings, progress: ProgressFn, seed: int) -> list[Sample]:
    """Stream, random and strided reads: each repetition starts with the range on the host (every page faults),
    then repeats the access with the pages resident (the ceiling)."""
    from ..uvm import DeviceAccessor

    pages, nbytes = sc.working_pages, sc.working_bytes
    idx = _read_plan(sc, seed)
    touched = pages if idx is None else idx.size
    warmup, repeat = _reps(sc, settings)
    out: list[Sample] = []
    m = _machine(settings, sc, (-(-pages // TILE_PAGES) + 1) * TILE_PAGES)
    try:
        mm = m.address_space()
        try:
            addr = mm.mmap(nbytes)
            data = random_bytes(nbytes, seed)
            mm.write(addr, data)
            rows = data.reshape(pages, PAGE_SIZE)
            if idx is None:
                def access(acc: Any) -> np.ndarray | None:
                    acc.touch(addr, nbytes)  # in place, every byte: checked by the read below
                    return None
            else:
                addrs = addr + idx.astype(np.int64) * PAGE_SIZE
                want = rows[idx]

                def access(acc: Any) -> np.ndarray | None:
                    return acc.read_pages(addrs)
            with DeviceAccessor(mm, 1, sc.uvm_options()) as acc:
                for rep in range(warmup + repeat):
                    what = f"{sc.name} ({sc.id}), repetition {rep + 1}"
                    res = mm.migrate(addr, nbytes, 0)  # back to host memory: every page faults again
                    check(res.nr_failed == 0, what, f"{res.nr_failed} pages did not go back to host memory")
                    acc.reset_stats()
                    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                    got = access(acc)
                    wall, cpu = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
                    st = acc.reset_stats()
                    t0 = time.perf_counter_ns()
                    again = access(acc)
                    ceiling = time.perf_counter_ns() - t0
                    cst = acc.reset_stats()
                    if idx is None:  # the touch returns nothing: read what it read, now resident
                        got = again = acc.read(addr, nbytes)
                        check(acc.reset_stats().batches == 0, what, "reading the resident range faulted")
                    for label, arr in (("access", got), ("pre-migrated access", again)):
                        bad = np.flatnonzero((arr.reshape(-1, PAGE_SIZE) != (rows if idx is None else want))
                                             .any(axis=1))
                        check(bad.size == 0, what, f"{label}: {bad.size} of {touched} pages read differ from "
                                                   f"the bytes written (first: page {bad[:1].tolist()})")
                    check(st.batches > 0 and st.pages_migrated >= touched and st.pages_remote == 0, what,
                          f"{st.pages_migrated} pages came to the device in {st.batches} fault batches and "
                          f"{st.pages_remote} were read remotely; expected all {touched} to come")
                    check(cst.batches == 0, what, f"the pre-migrated access faulted ({cst.batches} batches)")
                    if rep >= warmup:
                        out.append(Sample(wall, cpu, ceiling, st))
                    progress(sc.name, 1)
        finally:
            mm.close()
        verify_no_leak(m, sc.id)
    finally:
        m.close()
    return out


def _stencil_sweep(acc: Any, addr: int, pages: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One sweep, tile by tile: read the tile and its neighbours' edge pages, bump the first 8 bytes of every
    tile page, write the tile back. Returns the edge pages read (index, rows), checked once the sweep is timed."""
    halos = []
    for t in range(0, pages, TILE_PAGES):
        lo, hi = max(t - 1, 0), min(t + TILE_PAGES + 1, pages)
        rows = acc.read_pages(addr + np.arange(lo, hi, dtype=np.int64) * PAGE_SIZE)
        end = min(t + TILE_PAGES, pages)
        inner = rows[t - lo: end - lo]
        edge = [i for i in (lo, hi - 1) if not t <= i < end]
        halos.append((np.array(edge, dtype=np.int64), rows[[i - lo for i in edge]].copy()))
        inner[:, :8] += 1
        acc.write_pages(addr + np.arange(t, end, dtype=np.int64) * PAGE_SIZE, inner)
    return halos


def _bumped(rows: np.ndarray, idx: np.ndarray, times: np.ndarray | int) -> np.ndarray:
    """What pages ``idx`` hold after ``times`` sweeps bumped their first 8 bytes (uint8 wraps, as the sweep)."""
    out = rows[idx].copy()
    out[:, :8] += np.asarray(times, dtype=np.int64).astype(np.uint8).reshape(-1, 1)
    return out


def _run_stencil(sc: AccessScenario, settings: BenchSettings, progress: ProgressFn, seed: int) -> list[Sample]:
    """The stencil on a device of ``device_pages`` frames, each sweep followed by the same sweep on a second
    machine whose device holds the whole range, pre-migrated (the ceiling)."""
    from ..uvm import DeviceAccessor

    pages, nbytes = sc.working_pages, sc.working_bytes
    warmup, repeat = _reps(sc, settings)
    data = random_bytes(nbytes, seed)
    rows = data.reshape(pages, PAGE_SIZE)
    out: list[Sample] = []
    fits = (-(-pages // TILE_PAGES) + 1) * TILE_PAGES
    machines = [_machine(settings, sc, sc.device_pages or fits)]
    try:
        machines.append(_machine(settings, sc, fits))
        spaces, accs = [], []
        try:
            for i, m in enumerate(machines):
                mm = m.address_space()
                spaces.append(mm)
                addr = mm.mmap(nbytes)
                mm.write(addr, data)
                accs.append((DeviceAccessor(mm, 1, sc.uvm_options()), addr))
                if i == 1:
                    n = accs[1][0].prefetch(addr, nbytes)
                    check(n == pages, sc.id, f"the ceiling's device holds {n} of {pages} pages after prefetch")
            for rep in range(warmup + repeat):
                what = f"{sc.name} ({sc.id}), sweep {rep + 1}"
                walls = []
                for acc, addr in accs:
                    acc.reset_stats()
                    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                    halos = _stencil_sweep(acc, addr, pages)
                    walls.append((time.perf_counter_ns() - t0, time.thread_time_ns() - c0))
                    for edge, got in halos:
                        # Edge pages before the tile were written this sweep already; those after, not yet.
                        want = _bumped(rows, edge, np.where(edge % TILE_PAGES == TILE_PAGES - 1, rep + 1, rep))
                        bad = np.flatnonzero((got != want).any(axis=1))
                        check(bad.size == 0, what, f"edge pages {edge[bad].tolist()} read differ from the bytes "
                                                   f"written")
                st = accs[0][0].reset_stats()
                cst = accs[1][0].reset_stats()
                check(cst.batches == 0, what, f"the ceiling (whole range pre-migrated) faulted ({cst.batches} "
                                              f"batches)")
                if rep >= warmup:
                    out.append(Sample(walls[0][0], walls[0][1], walls[1][0], st))
                progress(sc.name, 1)
            want = _bumped(rows, np.arange(pages), warmup + repeat).reshape(-1)
            for mm, (acc, addr) in zip(spaces, accs, strict=True):
                acc.close()
                back = mm.read(addr, nbytes)
                bad = np.flatnonzero(back != want)
                check(bad.size == 0, sc.id, f"after {warmup + repeat} sweeps {bad.size} bytes differ from what the "
                                            f"sweeps wrote (first at offset {bad[:1].tolist()})")
        finally:
            for acc, _addr in accs:  # idempotent: after a failed sweep too, no accessor keeps listening
                acc.close()
            for mm in spaces:
                mm.close()
        for m in machines:
            verify_no_leak(m, sc.id)
    finally:
        for m in machines:
            m.close()
    return out
