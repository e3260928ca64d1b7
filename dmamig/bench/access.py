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

This module holds the whole kind: its scenarios and tasks, the runner, the records and the report's table
(throughput counts the distinct pages an access touches; fault-servicing figures come from the accessor's
:class:`~dmamig.uvm.UvmStats` of each timed access; ``bytes_migrated_per_byte_touched`` counts the bytes
migrated onto the device and those evicted back to make room, over the distinct bytes touched), and the plots
(as the migration plots: each title names the backend, the working set and the repetitions, rate axes start at
zero, and each ceiling is drawn beside what it bounds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..migrate.options import FAITHFUL
from ..sweep.tasks import ProgressFn, Task
from ..uvm.options import DEFAULT_FAULT_BATCH_SIZE, SERVICE_PHASES, VA_BLOCK_SIZE, UvmOptions, UvmStats
from .naming import format_number, format_rate, format_size
from .plots import BARS, EXTRA_COLORS, PHASE_COLORS, PHASE_LEGEND, pyplot, save_figure, spread_bars
from .settings import PAGE_SIZE, BenchSettings, parse_int_list
from .timing import median, timed_call, timing_fields
from .verify import check, random_bytes, verify_no_leak

__all__ = [
    "ACCESS_PATTERNS",
    "AccessScenario",
    "PATTERN_WORDS",
    "Sample",
    "access_record",
    "access_scenarios",
    "access_table",
    "access_tasks",
    "add_access_speedups",
    "parse_fault_batches",
    "parse_oversubscription",
    "plot_access_batches",
    "plot_oversubscription",
    "plot_service_breakdown",
    "run_access",
    "stream_batches",
    "write_access_plots",
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
                   backend=settings.backend, channels=sc.channels or 1, dma_poll_us=settings.machine_poll(),
                   dma_engine=settings.machine_dma_engine())


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
                    got, wall, cpu = timed_call(access, acc)
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
                    halos, wall, cpu = timed_call(_stencil_sweep, acc, addr, pages)
                    walls.append((wall, cpu))
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


#: Short names of the access patterns, for tables and plots.
PATTERN_WORDS = {"stream": "streaming read", "random": "random 4K reads", "strided": "strided read",
                 "stencil": "stencil"}


@dataclass
class Sample:
    """One timed repetition: wall and thread CPU time of the faulting access, wall time of its ceiling, and
    the accessor's counters of the faulting access."""

    wall: int
    cpu: int
    ceiling: int
    stats: UvmStats


# -- figures ---------------------------------------------------------------------------------------------------

def access_record(sc: Any, samples: list[Sample]) -> dict[str, Any]:
    """The record of an :class:`~dmamig.bench.access.AccessScenario` from its timed samples.

    The fields every bench record has (``gbps`` and ``pages_per_s`` count the distinct pages one access
    touches; ``phase_ns`` holds the fault-service phases, :data:`~dmamig.uvm.SERVICE_PHASES`), then the
    device-access figures, each the median over the repetitions.
    """
    pages = sc.touched_pages
    nbytes = pages * PAGE_SIZE
    walls = [s.wall for s in samples]
    wall = median(walls)
    ceiling = median([s.ceiling for s in samples])
    secs, csecs = wall / 1e9, ceiling / 1e9
    stats = [s.stats for s in samples]
    batches = median([st.batches for st in stats])
    per_batch = [st.service_total_ns / st.batches for st in stats if st.batches]
    phase_ns = {p: median([st.service_ns.get(p, 0) for st in stats]) for p in SERVICE_PHASES}
    phase_batch = {p: median([st.service_ns.get(p, 0) / st.batches for st in stats if st.batches])
                   for p in SERVICE_PHASES} if per_batch else {}
    service = median([st.service_total_ns for st in stats])
    ceiling_method = ("the same stencil on a device that holds the range, pre-migrated (same run)"
                      if sc.pattern == "stencil" else "the same access, range pre-migrated (same run)")
    timing = timing_fields(nbytes, pages, walls, [s.cpu for s in samples], [],
                           nbytes / csecs / 1e9 if csecs > 0 else 0.0, ceiling_method)
    # Phases are the fault-service phases, and outside them is the access itself and its bookkeeping.
    timing.update(phase_ns=phase_ns, phase_share={p: v / wall for p, v in phase_ns.items()} if wall > 0 else {},
                  outside_phases_ns=median([max(0, s.wall - s.stats.service_total_ns) for s in samples]))
    return {
        "id": sc.id,
        "name": sc.name,
        "kind": "access",
        "mode": sc.mode,
        "direction": "h2d",
        "direction_name": "host->device",
        "layout": "",
        "folio_bytes": PAGE_SIZE,
        "folio_order": 0,
        "channels": sc.channels,
        "options": FAITHFUL.as_dict(),
        "batching": "faithful",
        "bytes": nbytes,
        "pages": pages,
        **timing,
        "verified": True,
        "pattern": sc.pattern,
        "fault_batch_size": sc.fault_batch,
        "oversubscription": sc.oversubscription,
        "working_set_bytes": sc.working_bytes,
        "device_bytes": sc.device_pages * PAGE_SIZE if sc.device_pages else None,
        "uvm_options": sc.uvm_options().as_dict(),
        "ceiling_wall_ns": [int(s.ceiling) for s in samples],
        "ceiling_pages_per_s": pages / csecs if csecs > 0 else 0.0,
        "fault_batches": batches,
        "faults": median([st.faults for st in stats]),
        "fault_batches_per_s": batches / secs if secs > 0 else 0.0,
        "service_ns_per_batch": median(per_batch) if per_batch else None,
        "service_phase_ns_per_batch": phase_batch,
        "service_pages_per_s": pages / (service / 1e9) if service > 0 else None,
        "bytes_migrated": median([st.bytes_migrated for st in stats]),
        "bytes_evicted": median([st.bytes_evicted for st in stats]),
        "pages_prefetched": median([st.pages_prefetched for st in stats]),
        "pages_remote": median([st.pages_remote for st in stats]),
        "bytes_migrated_per_byte_touched": median([(st.bytes_migrated + st.bytes_evicted) / nbytes
                                                    for st in stats]),
    }


def add_access_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_copy`` (pages/s over the copy record's) of every no-copy access record.

    Like is compared with like: the copy record of the same pattern, fault batch and oversubscription.
    """
    def key(r: dict[str, Any]) -> tuple:
        return r.get("pattern"), r.get("fault_batch_size"), r.get("oversubscription")

    copies = {key(r): r for r in records if r["kind"] == "access" and r["mode"] == "copy"}
    for r in records:
        base = copies.get(key(r)) if r["kind"] == "access" and r["mode"] == "nocopy" else None
        if base is not None and base["pages_per_s"] > 0:
            r["speedup_vs_copy"] = r["speedup_vs_faithful_copy"] = r["pages_per_s"] / base["pages_per_s"]
            r["speedup_vs"] = base["id"]




def _split(rec: dict[str, Any], top: int = 4) -> str:
    # Microseconds per batch of the biggest phases, then the others together (every phase is in the CSV and
    # the JSON); a no-break space keeps each phase with its figure when the column wraps.
    per = rec.get("service_phase_ns_per_batch") or {}
    parts = sorted(((v / 1e3, p) for p, v in per.items() if v > 0), reverse=True)
    words = [f"{p}\u00a0{us:.0f}" for us, p in parts[:top]]
    rest = sum(us for us, _p in parts[top:])
    if rest >= 0.5:
        words.append(f"others\u00a0{rest:.0f}")
    return " ".join(words) or "-"


def access_table(records: list[dict[str, Any]]) -> Any:
    """A rich table of device-access records: throughput against the same access pre-migrated, fault batches,
    service time per batch and its split by phase, and the traffic per byte touched."""
    from rich.table import Table

    t = Table(title="Device access (UVM-style faults; ceiling: the same access pre-migrated, same run)",
              title_justify="left")
    # Short headers: the phase split needs the width (pages/s columns are pages touched per second).
    for col in ("access", "batch", "mode", "DMA ch.", "pages/s", "ceiling", "x ceiling", "÷ copy",
                "batches/s", "us/batch", "us per batch by phase", "moved ÷ touched", "ok"):
        wrap = col in ("access", "us per batch by phase")
        t.add_column(col, justify="left" if col in ("access", "mode", "us per batch by phase") else "right",
                     no_wrap=not wrap, min_width=30 if col == "us per batch by phase" else None)
    for r in records:
        what = PATTERN_WORDS.get(r.get("pattern", ""), r.get("pattern") or r["id"])
        if r.get("oversubscription") is not None:
            what += f", {r['oversubscription']:g}x device memory"
        per_batch = r.get("service_ns_per_batch")
        t.add_row(what, format_number(r.get("fault_batch_size"), "{}"), "no-copy" if r["mode"] == "nocopy" else "copy",
                  format_number(r["channels"], "{}"), format_rate(r["pages_per_s"]), format_rate(r.get("ceiling_pages_per_s")),
                  format_number(r["ceiling_ratio"]), format_number(r.get("speedup_vs_copy")), format_rate(r.get("fault_batches_per_s")),
                  format_number(None if per_batch is None else per_batch / 1e3, "{:.0f}"), _split(r),
                  format_number(r.get("bytes_migrated_per_byte_touched")), "yes" if r["verified"] else "[red]NO[/red]")
    return t


_MODE_STYLE = {"copy": ("#dd8452", "-", "copy (the faulting thread copies)"),
               "nocopy": ("#4c72b0", "--", "no-copy (the DMA engine copies)")}
#: Service phases beyond the migration core's, for the legend.
_SERVICE_LEGEND = {
    "fetch": "fetch: read and group the fault batch",
    "prefetch": "prefetch: the density decision",
    "evict": "evict: send LRU blocks back to host memory",
    "populate": "populate: look the pages up, zero-fill untouched ones",
    "replay": "replay: look the pages up again and resume",
}
_SERVICE_COLORS = {"fetch": "#8c8c8c", "prefetch": "#e5ae38", "evict": "#c44e52", "populate": "#937860",
                   "replay": "#6d904f"}


def _access(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["scenarios"] if s["kind"] == "access"]


def _context(doc: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    s = doc["settings"]
    gpus = ", ".join(g["name"] for g in doc["machine"].get("gpus") or [])
    where = f"{doc['machine']['backend']} backend" + (f" ({gpus})" if gpus else "")
    sizes = sorted({r.get("working_set_bytes") or r["bytes"] for r in recs})
    reps = f"median of {s['repeat']} repetitions" if s["repeat"] > 1 else "1 repetition"
    return f"{where}, {'/'.join(format_size(b) for b in sizes)} working set, {reps}"


def _modes(recs: list[dict[str, Any]]) -> list[str]:
    return [m for m in ("copy", "nocopy") if any(r["mode"] == m for r in recs)]


def plot_oversubscription(doc: dict[str, Any], path: Path) -> None:
    """The stencil's throughput against the oversubscription factor (left) and the bytes it migrates per
    byte it touches (right), copy and no-copy, with the pre-migrated ceiling of each point dotted."""
    plt = pyplot()
    recs = sorted((r for r in _access(doc) if r.get("pattern") == "stencil"), key=lambda r: r["oversubscription"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.8))
    top = 0.0
    for mode in _modes(recs):
        color, style, words = _MODE_STYLE[mode]
        pts = [r for r in recs if r["mode"] == mode]
        xs = [r["oversubscription"] for r in pts]
        ys = [r["pages_per_s"] / 1e6 for r in pts]
        cs = [r["ceiling_pages_per_s"] / 1e6 for r in pts]
        top = max([top, *ys, *cs])
        ax.plot(xs, ys, marker="o", color=color, linestyle=style, label=words)
        ax.plot(xs, cs, marker=".", color=color, linestyle=":", linewidth=1.2,
                label=f"ceiling of {mode.replace('nocopy', 'no-copy')}: device holds it all, pre-migrated")
        bx.plot(xs, [r["bytes_migrated_per_byte_touched"] for r in pts], marker="o", color=color,
                linestyle=style, label=words)
    right = max((r["oversubscription"] for r in recs), default=2.0)
    for a in (ax, bx):
        a.axvline(1.0, color="grey", linewidth=0.8, alpha=0.6)
        a.set_xlim(0, right * 1.1 + 0.1)
        a.set_xlabel("oversubscription (working set / device memory)")
        a.grid(True, alpha=0.3)
    ax.set_ylim(0, top * 1.15 or 1.0)
    ax.set_ylabel("M pages/s (median; axis starts at 0)")
    ax.set_title("throughput, steady state (after one untimed sweep)", fontsize=10)
    bx.set_ylim(0, max([1.0, *(r["bytes_migrated_per_byte_touched"] for r in recs)]) * 1.15)
    bx.set_ylabel("bytes moved (in + evicted) per byte touched")
    bx.set_title("traffic per sweep", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Device access: 2 MiB-tile stencil vs oversubscription (UVM faults, LRU eviction, density "
                 f"prefetch)\n{_context(doc, recs)}; grey line: the device holds the working set exactly",
                 fontsize=10.5)
    save_figure(plt, fig, path, rect=(0, 0.1, 1, 1))


def plot_access_batches(doc: dict[str, Any], path: Path) -> None:
    """Fault-servicing throughput of the streaming read against the fault batch size, copy and no-copy, with
    the same read pre-migrated (dotted): what each batch size leaves of the ceiling."""
    plt = pyplot()
    recs = sorted((r for r in _access(doc) if r.get("pattern") == "stream"), key=lambda r: r["fault_batch_size"])
    batches = sorted({r["fault_batch_size"] for r in recs})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = 0.0
    for mode in _modes(recs):
        color, style, words = _MODE_STYLE[mode]
        pts = {r["fault_batch_size"]: r for r in recs if r["mode"] == mode}
        x = [i for i, b in enumerate(batches) if b in pts]
        ys = [pts[batches[i]]["pages_per_s"] / 1e6 for i in x]
        cs = [pts[batches[i]]["ceiling_pages_per_s"] / 1e6 for i in x]
        lo, hi = spread_bars([pts[batches[i]] for i in x], "pages_per_s")
        top = max([top, *cs, *(y + h / 1e6 for y, h in zip(ys, hi))])
        ax.errorbar(x, ys, yerr=[[v / 1e6 for v in lo], [v / 1e6 for v in hi]], marker="o", color=color,
                    linestyle=style, label=words, capsize=4)
        ax.plot(x, cs, marker=".", color=color, linestyle=":", linewidth=1.2,
                label=f"ceiling of {mode.replace('nocopy', 'no-copy')}: same read, pre-migrated")
    for i, b in enumerate(batches):
        # One label per batch size, above its highest point: the modes' points are often too close for two.
        cell = sorted((r for r in recs if r["fault_batch_size"] == b), key=lambda r: r["mode"])
        text = " | ".join(f"{r['ceiling_ratio']:.2f}x" for r in cell if r["ceiling_ratio"] is not None)
        if text:
            ax.annotate(text, (i, max(r["pages_per_s"] for r in cell) / 1e6), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xticks(list(range(len(batches))), [str(b) for b in batches])
    # Half a step of room on either side: the first and last labels sit clear of the axes' edges.
    ax.set_xlim(-0.5, len(batches) - 0.5)
    ax.set_xlabel("fault batch size (faults serviced together)")
    ax.set_ylim(0, top * 1.2 or 1.0)
    ax.set_ylabel(f"M pages/s (median; axis starts at 0)\n{BARS}")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    words = " | ".join({"copy": "copy", "nocopy": "no-copy"}[m] for m in _modes(recs))
    fig.suptitle(f"Device access: streaming read vs fault batch size; labels: x ceiling ({words})\n"
                 f"{_context(doc, recs)}", fontsize=10.5)
    save_figure(plt, fig, path, rect=(0, 0.1, 1, 1))


def plot_service_breakdown(doc: dict[str, Any], path: Path) -> None:
    """Stacked bars of the service time of one fault batch by phase, for every access that faulted: copy
    and no-copy side by side, so the DMA engine's share (dma_wait) and the CPU copy's (copy) compare."""
    plt = pyplot()
    recs = [r for r in _access(doc) if r.get("service_ns_per_batch")]
    seen = {p for r in recs for p, v in (r.get("service_phase_ns_per_batch") or {}).items() if v > 0}
    names = [p for p in SERVICE_PHASES if p in seen] + sorted(seen - set(SERVICE_PHASES))
    colors = {**PHASE_COLORS, **_SERVICE_COLORS}
    for k, p in enumerate(p for p in names if p not in colors):
        colors[p] = EXTRA_COLORS[k % len(EXTRA_COLORS)]
    # A bar's label is three or four short lines, about 0.85 in wide at 7 pt: each bar gets that much room.
    fig, ax = plt.subplots(figsize=(max(11.0, 0.95 * len(recs) + 2.5), 5.8))
    bottom = [0.0] * len(recs)
    handles = {}
    for p in names:
        vals = [(r.get("service_phase_ns_per_batch") or {}).get(p, 0.0) / 1e3 for r in recs]
        bars = ax.bar(range(len(recs)), vals, bottom=bottom, color=colors[p], edgecolor="white", linewidth=0.5)
        for b, r in zip(bars, recs, strict=True):
            b.set_hatch("//" if r["mode"] == "nocopy" else "")
        if len(bars):
            handles[p] = bars[0]
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    labels = []
    for r in recs:
        what = PATTERN_WORDS.get(r["pattern"], r["pattern"]).removesuffix(" reads").removesuffix(" read")
        extra = f"\n{r['oversubscription']:g}x mem" if r.get("oversubscription") is not None else ""
        mode = "copy" if r["mode"] == "copy" else f"no-copy\n{r['channels']} DMA ch."
        labels.append(f"{what}{extra}\nbatch {r['fault_batch_size']}\n{mode}")
    ax.set_xticks(list(range(len(recs))), labels, fontsize=7)
    ax.set_ylim(0, max(bottom, default=0.0) * 1.08 or 1.0)
    ax.set_ylabel("us per fault batch (median; axis starts at 0)")
    ax.grid(True, axis="y", alpha=0.3)
    words = {**PHASE_LEGEND, **_SERVICE_LEGEND}
    fig.legend([handles[p] for p in names if p in handles], [words.get(p, p) for p in names if p in handles],
               loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.suptitle("Device access: where the service time of one fault batch goes (hatched: no-copy)\n"
                 f"{_context(doc, recs)}", fontsize=10.5)
    save_figure(plt, fig, path, rect=(0, 0.02 + 0.03 * ((len(handles) + 2) // 3), 1, 1))


def write_access_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the device-access plots of ``doc`` into ``out_dir``; return the paths written.

    ``access_oversubscription.png`` (with stencil records), ``access_fault_batch.png`` (with streaming
    records) and ``access_service.png`` (with any access that faulted); nothing without access records.
    """
    out = Path(out_dir)
    recs = _access(doc)
    plan = [("access_oversubscription.png", plot_oversubscription, any(r.get("pattern") == "stencil" for r in recs)),
            ("access_fault_batch.png", plot_access_batches, any(r.get("pattern") == "stream" for r in recs)),
            ("access_service.png", plot_service_breakdown, any(r.get("service_ns_per_batch") for r in recs))]
    paths = []
    for name, fn, wanted in plan:
        if wanted:
            out.mkdir(parents=True, exist_ok=True)
            fn(doc, out / name)
            paths.append(out / name)
    return paths
