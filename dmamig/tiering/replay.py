"""Replay a trace on a tiered machine under a policy, in copy or no-copy mode, and measure it.

The machine has two host nodes: node 0 (fast, DRAM, cost 1.0) and node 1 (slow, CXL-like, ``slow_cost``).
Replay maps one region, places its pages by first touch (in the order the trace first touches them, the fast
tier filled to ``first_touch_fill`` of its size, the rest on the slow tier), writes known bytes to it, then runs
epoch after epoch:

1. the migrations the policy chose after the previous epoch start on a migrator thread (``move_pages``; copy:
   the migrator copies; no-copy: ``m.dma`` copies and the migrator moves state only); a policy that runs the
   kernel's paths (:meth:`Policy.kernel_paths`: ``numa-balancing`` and ``tpp`` by default) returns none:
   instead the scanner makes the region ``PROT_NONE`` at the epoch's start, each hint fault promotes its one
   folio (``migrate_misplaced_folio``, in the accessor's thread) and kswapd demotes past the watermarks
   (:mod:`dmamig.tiering.numa`);
2. meanwhile the accessor threads replay this epoch's records through ``mm.read`` / ``mm.write``, meeting the
   migrations' entries (their waits are the stall, :attr:`AddressSpace.migration_stalls`);
3. the policy sees the epoch (accessed pages, counts, hint faults) and decides the next migrations.

Every read is compared with a reference model of the region where no other actor stored to the page in that
epoch, and the whole region is read back and compared at the end; then the address space is closed and every
frame must be free again. Decisions taken after the last epoch are not run (nothing would observe them).

Every ``migrate_pages()`` call of the replay is an ``mm_migrate_pages`` event (``Machine.migrate_events``):
the summary totals them per reason (``events_by_reason``), and ``record_events`` keeps each one, with its
epoch, in :attr:`ReplayResult.events`.

Accesses are attributed to the node their page was on at the start of the epoch (one vectorized snapshot),
so a page a migration moves during the epoch counts where it was. A trace whose ``meta["device_actors"]``
names actors gets a device node (node 2) too: those actors access through a :class:`~dmamig.DeviceAccessor`
(UVM-style faults, prefetch and eviction as :meth:`Policy.uvm_options` says), and a hit for them is a page
already on the device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from ..flags import MigrateMode
from ..machine import Machine
from .numa import HintFaultPaths
from .policies import Migration, Observation, Policy, Tiers
from .trace import Trace, TraceError

__all__ = ["BACKINGS", "EPOCH_FIELDS", "ReplayResult", "replay"]

#: vmstat counters a replay reports the change of (``summary["vmstat"]``).
VMSTAT_REPORTED = ("pgmigrate_success", "pgmigrate_fail", "numa_hint_faults", "numa_hint_faults_local",
                   "numa_pages_migrated", "pgpromote_success", "pgdemote_kswapd", "pgdemote_direct")
#: Per-epoch series of a replay, each one number per epoch.
EPOCH_FIELDS = ("accesses", "fast_hits", "hint_faults", "promoted", "demoted", "migrate_failed", "migrate_cpu_ns",
                "migrate_wall_ns", "stalls", "stall_ns", "access_cost", "access_wall_ns", "fast_pages",
                "slow_pages", "device_pages", "uvm_migrated", "uvm_evicted", "uvm_remote", "uvm_service_ns")
#: Node of the device that device actors run on (after the two host tiers).
DEVICE_NODE = 2
#: What a replayed region can be: private anonymous memory, shared anonymous memory, a shared mapping of a file.
BACKINGS = ("anon", "shmem", "file")
_UVM = {"uvm_migrated": "pages_migrated", "uvm_evicted": "pages_evicted", "uvm_remote": "pages_remote"}


@dataclass
class ReplayResult:
    """What one replay measured.

    Attributes
    ----------
    summary : dict
        Totals: accesses, fast-tier hit share, pages promoted and demoted, bytes migrated, migrating-thread CPU
        (``migrate_cpu_ns``, and per migrated page), accessor stall (count and ns), modelled access cost,
        verification (``verified``, ``reads_verified``, ``mismatches``, ``leaked_frames``).
    epochs : dict
        One list per name of :data:`EPOCH_FIELDS`.
    config : dict
        Trace, policy, mode and machine settings.
    events : list of dict
        With ``record_events``: every ``mm_migrate_pages`` event of the replay
        (:meth:`~dmamig.migrate.result.MigrateEvent.as_dict` plus its ``epoch``), oldest first.
    """

    summary: dict[str, Any]
    epochs: dict[str, list[int | float]]
    config: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``events`` only when recorded)."""
        out = {"config": self.config, "summary": self.summary, "epochs": self.epochs}
        if self.config.get("record_events"):
            out["events"] = self.events
        return out


def _uvm_counts(device: Any) -> dict[str, int]:
    """Cumulative UVM counters of a device accessor (zeros without one)."""
    if device is None:
        return dict.fromkeys((*_UVM, "uvm_service_ns"), 0)
    st = device.stats
    return {**{k: int(getattr(st, f)) for k, f in _UVM.items()}, "uvm_service_ns": int(sum(st.service_ns.values()))}


def _first_touch_order(trace: Trace, pages: int, ps: int) -> np.ndarray:
    """Pages in the order the trace first touches them, untouched pages last."""
    page = trace.offset // ps
    uniq, first = np.unique(page, return_index=True)
    rest = np.setdiff1d(np.arange(pages), uniq, assume_unique=True)
    return np.concatenate([uniq[np.argsort(first, kind="stable")], rest])


class _Migrator(threading.Thread):
    """Runs one epoch's migrations on its own thread and measures its CPU time."""

    def __init__(self, mm: Any, addr: int, ps: int, todo: list[Migration], engine: Any):
        super().__init__(name="dmamig-tiering-migrator", daemon=True)
        self.mm, self.addr, self.ps, self.todo, self.engine = mm, addr, ps, todo, engine
        self.done = {"promote": 0, "demote": 0}
        self.failed = self.cpu_ns = self.wall_ns = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        if not any(mig.pages.size for mig in self.todo):
            return  # nothing to migrate costs nothing: no thread start-up time counted as migration CPU
        t_cpu, t_wall = time.thread_time_ns(), time.perf_counter_ns()
        try:
            for mig in self.todo:
                if mig.pages.size == 0:
                    continue
                res = self.mm.move_pages(self.addr + mig.pages.astype(np.int64) * self.ps,
                                         np.full(mig.pages.size, mig.node), mode=MigrateMode.SYNC,
                                         engine=self.engine)
                ok = int((res.status == mig.node).sum())
                self.done[mig.kind] = self.done.get(mig.kind, 0) + ok
                self.failed += int(mig.pages.size - ok)
        except BaseException as exc:  # reported by the replay thread, which owns the error path
            self.error = exc
        self.cpu_ns = time.thread_time_ns() - t_cpu
        self.wall_ns = time.perf_counter_ns() - t_wall


class _Accessor:
    """Replays records through the real access path and checks reads against the reference model."""

    def __init__(self, mm: Any, addr: int, ref: np.ndarray, trace: Trace, device: Any, dev_actor: np.ndarray,
                 numa: HintFaultPaths | None = None, now_ms: np.ndarray | None = None):
        self.mm, self.addr, self.ref, self.trace = mm, addr, ref, trace
        self.device, self.dev_actor = device, dev_actor  # a DeviceAccessor for the actors marked True
        self.numa, self.now_ms = numa, now_ms  # the kernel's hint faults; each record's trace time
        self.mismatches = 0
        self.verified = 0
        self.first_bad: str | None = None
        self.lock = threading.Lock()

    def run(self, idx: np.ndarray, check: np.ndarray) -> None:
        t = self.trace
        addr, ref = self.addr, self.ref
        on_dev = self.dev_actor[t.actor[idx]].tolist()
        numa, ps = self.numa, self.trace.page_size
        bad = ok = 0
        for i, c, d in zip(idx.tolist(), check.tolist(), on_dev):
            off, n = int(t.offset[i]), int(t.length[i])
            who = self.device if d else self.mm
            if numa is not None and not d:
                numa.access(off // ps, float(self.now_ms[i]))  # a PROT_NONE page takes its hint fault first
            if t.write[i]:
                # A store's bytes are derived from its record number, so any replay of the trace writes them.
                data = np.full(n, (i * 7 + 1) & 0xFF, dtype=np.uint8)
                who.write(addr + off, data)
                ref[off:off + n] = data
            else:
                got = who.read(addr + off, n)
                if c:
                    ok += 1
                    if not np.array_equal(got, ref[off:off + n]):
                        bad += 1
                        with self.lock:
                            self.first_bad = self.first_bad or f"record {i} (offset {off}, length {n})"
        with self.lock:
            self.mismatches += bad
            self.verified += ok


def _run_epoch(acc: _Accessor, trace: Trace, lo: int, hi: int, threads: int, ps: int, pages: int) -> None:
    idx = np.arange(lo, hi)
    page = trace.offset[lo:hi] // ps
    actor = trace.actor[lo:hi]
    w = trace.write[lo:hi]
    owner = np.full(pages, -1, dtype=np.int64)
    owner[page[w]] = actor[w]
    shared = (owner[page[w]] != actor[w]).any()  # two actors stored to one page: replay in trace order
    check = (owner[page] < 0) | (owner[page] == actor)
    if threads == 1 or shared:
        acc.run(idx, np.ones(idx.size, dtype=bool) if threads == 1 or shared else check)
        return
    workers = []
    for k in range(threads):
        sel = actor % threads == k
        if sel.any():
            workers.append(threading.Thread(target=acc.run, args=(idx[sel], check[sel])))
    for th in workers:
        th.start()
    for th in workers:
        th.join()


def replay(trace: Trace, policy: Policy, mode: str = "copy", *, fast_fraction: float = 0.25,
           slow_cost: float = 2.5, first_touch_fill: float = 0.9, channels: int = 2, threads: int = 1,
           device_fraction: float = 0.5, seed: int = 0, record_events: bool = True, backing: str = "anon",
           progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Replay ``trace`` under ``policy`` with copy or no-copy migration on a fresh CPU-backend machine.

    Parameters
    ----------
    trace : Trace
        The accesses (validated first; a bad record raises before anything runs).
    policy : Policy
        Decides migrations after each epoch.
    mode : {"copy", "no-copy"}
        ``copy``: the migrating thread copies pages; ``no-copy``: the DMA engine does, state moves only.
    fast_fraction : float
        Fast-tier (node 0) frames as a fraction of the region's pages.
    slow_cost : float
        Relative cost per byte of the slow tier (node 1); node 0 costs 1.0.
    first_touch_fill : float
        Share of the fast tier that first touch fills before it falls back to the slow tier.
    channels, threads : int
        DMA channels; accessor threads (actors are dealt to threads by ``actor % threads``).
    device_fraction : float
        With device actors (``trace.meta["device_actors"]``): device frames as a fraction of the region's
        pages (below 1 oversubscribes the device; at least one 2 MiB block). They access memory through a
        :class:`~dmamig.DeviceAccessor` on node 2 with :meth:`Policy.uvm_options`.
    seed : int
        Seed of the region's initial bytes.
    record_events : bool
        Keep every ``mm_migrate_pages`` event in :attr:`ReplayResult.events` (the summary's per-reason totals
        are always there).
    backing : {"anon", "shmem", "file"}
        What the region is: private anonymous memory (the default), shared anonymous memory, or a shared
        mapping of a real file (in a temporary folder; its folios migrate through the page cache's callback,
        the flusher writes them back, and at the end the file on disk must hold the region's bytes).
    progress : callable, optional
        Called as ``progress(epoch_done, epochs)``.

    Returns
    -------
    ReplayResult
    """
    if mode not in ("copy", "no-copy"):
        raise InvalidArgument(f"mode must be 'copy' or 'no-copy', got {mode!r}")
    if backing not in BACKINGS:
        raise InvalidArgument(f"backing must be one of {', '.join(BACKINGS)}, got {backing!r}")
    if not 0.0 < fast_fraction <= 1.0 or not 0.0 <= first_touch_fill <= 1.0 or threads < 1:
        raise InvalidArgument(f"need 0 < fast_fraction <= 1, 0 <= first_touch_fill <= 1, threads >= 1; got "
                              f"{fast_fraction}, {first_touch_fill}, {threads}")
    trace.validate()
    ps = trace.page_size
    pages = -(-trace.region_bytes // ps)
    fast_pages = max(8, int(pages * fast_fraction))
    dev = [int(a) for a in trace.meta.get("device_actors", [])]
    if any(not 0 <= a < trace.actors for a in dev):
        raise TraceError(f"trace {trace.name!r}: device_actors {dev} name unknown actors (0..{trace.actors - 1})")
    block = (2 << 20) // ps
    m = Machine(host_nodes=[(fast_pages, 1.0), (pages + 8, float(slow_cost))], devices=1 if dev else 0,
                device_pages=max(block, int(pages * device_fraction)) if dev else 1, page_size=ps, backend="cpu",
                channels=channels)
    try:
        return _replay_on(m, trace, policy, mode, pages, fast_pages, first_touch_fill, threads, seed, progress,
                          {"fast_fraction": fast_fraction, "slow_cost": slow_cost, "channels": channels,
                           "threads": threads, "first_touch_fill": first_touch_fill, "seed": seed,
                           "record_events": bool(record_events), "backing": backing,
                           "device_actors": dev, "device_pages": m.nodes[-1].total_pages if dev else 0})
    finally:
        m.close()


def _replay_on(m: Machine, trace: Trace, policy: Policy, mode: str, pages: int, fast_pages: int, fill: float,
               threads: int, seed: int, progress: Callable[[int, int], None] | None,
               settings: dict[str, Any]) -> ReplayResult:
    ps, nbytes = m.page_size, pages * m.page_size
    free0 = [n.free_pages for n in m.nodes]
    mm = m.address_space()
    backing = settings["backing"]
    file = m.open(size=nbytes) if backing == "file" else None
    addr = mm.mmap(nbytes, shared=backing != "anon", file=file)
    mm.populate(addr, nbytes, node=1)
    order = _first_touch_order(trace, pages, ps)[:int(fast_pages * fill)]
    if order.size:
        mm.move_pages(addr + order * ps, np.zeros(order.size, dtype=np.int64))
    ref = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    mm.write(addr, ref)
    ref = ref.copy()
    cost = np.array(m.access_cost + (0.0,))  # index -1 (not populated) costs nothing
    engine = m.dma if mode == "no-copy" else None
    if engine is not None:  # start the channels and compile their kernels before anything is measured
        pair = m.alloc_pages(1, 2)
        engine.copy(pair[:1], pair[1:]).wait()
        m.put_pages(pair)
    policy.start(Tiers(fast=0, slow=1, capacity={n.id: n.total_pages for n in m.nodes}, pages=pages))
    dev_actor = np.zeros(trace.actors, dtype=bool)
    dev_actor[settings["device_actors"]] = True
    device = None
    if dev_actor.any():
        from ..uvm import DeviceAccessor

        device = DeviceAccessor(mm, DEVICE_NODE, policy.uvm_options(no_copy=mode == "no-copy"))
    settings_numa = policy.kernel_paths()
    numa = HintFaultPaths(mm, addr, pages, settings_numa, engine) if settings_numa is not None else None
    period = settings_numa.scan_period_ms if settings_numa is not None else 1000
    bounds = np.searchsorted(trace.epoch, np.arange(trace.epochs + 1))
    # Trace time of every record: epoch e spans [e, e + 1) scan periods, its records spread evenly over it.
    n_ep = np.diff(bounds)[trace.epoch]
    now_ms = (trace.epoch + (np.arange(len(trace)) - bounds[trace.epoch]) / np.maximum(n_ep, 1)) * period
    acc = _Accessor(mm, addr, ref, trace, device, dev_actor, numa, now_ms)
    series: dict[str, list] = {k: [] for k in EPOCH_FIELDS}
    vm0 = m.vmstat
    events = m.migrate_events
    last_event = events[-1] if events else None
    kept: list[dict[str, Any]] = []
    by_reason: dict[str, dict[str, int]] = {}
    dropped = False
    pending: list[Migration] = []
    try:
        for e in range(trace.epochs):
            lo, hi = int(bounds[e]), int(bounds[e + 1])
            placement = mm.nodes_of(addr, nbytes)
            if numa is not None:
                numa.scan(e * period)  # task_numa_work at the start of the scan period
                numa0 = dict(numa.stats)
            stalls0 = mm.migration_stalls
            uvm0 = _uvm_counts(device)
            mig = _Migrator(mm, addr, ps, pending, engine)
            t0 = time.perf_counter_ns()
            mig.start()
            _run_epoch(acc, trace, lo, hi, threads, ps, pages)
            access_ns = time.perf_counter_ns() - t0
            mig.join()
            if mig.error is not None:
                raise mig.error
            stalls1 = mm.migration_stalls
            uvm1 = _uvm_counts(device)
            page = trace.offset[lo:hi] // ps
            node = placement[page]
            local = np.where(dev_actor[trace.actor[lo:hi]], DEVICE_NODE, 0)  # the node an actor would like
            uniq, inv, counts = np.unique(page, return_inverse=True, return_counts=True)
            written = np.zeros(uniq.size, dtype=bool)
            written[inv[trace.write[lo:hi]]] = True
            hint = placement[uniq] == 1
            rec = {"accesses": hi - lo, "fast_hits": int((node == local).sum()),
                   "hint_faults": int(counts[hint].sum()),
                   "promoted": mig.done.get("promote", 0), "demoted": mig.done.get("demote", 0),
                   "migrate_failed": mig.failed, "migrate_cpu_ns": mig.cpu_ns, "migrate_wall_ns": mig.wall_ns,
                   "stalls": stalls1[0] - stalls0[0], "stall_ns": stalls1[1] - stalls0[1],
                   "access_cost": float((trace.length[lo:hi] * cost[node]).sum()), "access_wall_ns": access_ns,
                   "fast_pages": int((placement == 0).sum()), "slow_pages": int((placement == 1).sum()),
                   "device_pages": int((placement == DEVICE_NODE).sum()),
                   **{k: uvm1[k] - uvm0[k] for k in uvm0}}
            if numa is not None:  # the kernel's paths: promotions by hint fault, demotions by kswapd
                d = {k: numa.stats[k] - numa0[k] for k in numa0}
                rec["hint_faults"] = d["hint_faults"]
                rec["promoted"] += d["promoted"]
                rec["demoted"] += d["demoted"]
                rec["migrate_failed"] += d["promote_failed"] + d["demote_failed"]
                rec["migrate_cpu_ns"] += d["promote_cpu_ns"] + d["kswapd_cpu_ns"]
            for k, v in rec.items():
                series[k].append(v)
            new, lost = _events_after(m, last_event)
            dropped |= lost
            if new:
                last_event = new[-1]
            for ev in new:
                _add_event(by_reason, ev)
                if settings["record_events"]:
                    kept.append({"epoch": e, **ev.as_dict()})
            if numa is None:
                pending = policy.epoch(Observation(e, uniq, counts, written, hint, placement,
                                                   {n.id: n.free_pages for n in m.nodes}))
            if progress is not None:
                progress(e + 1, trace.epochs)
    finally:
        if numa is not None:
            numa.close()
    vm1 = m.vmstat
    final_ok = bool(np.array_equal(mm.read(addr, nbytes), ref))
    if file is not None:  # what the region's writes left on disk, once written back
        file.fsync()
        final_ok = final_ok and bool(np.array_equal(np.fromfile(file.path, dtype=np.uint8, count=nbytes), ref))
    mm.close()
    if file is not None:
        file.close()
    leaked = int(sum(a - n.free_pages for a, n in zip(free0, m.nodes)))
    tot = {k: sum(v) for k, v in series.items()}
    migrated = tot["promoted"] + tot["demoted"]
    summary = {
        "accesses": tot["accesses"], "fast_hit_share": tot["fast_hits"] / max(tot["accesses"], 1),
        "hint_faults": tot["hint_faults"], "promoted": tot["promoted"], "demoted": tot["demoted"],
        "migrate_failed": tot["migrate_failed"], "bytes_migrated": migrated * ps,
        "migrate_cpu_ns": tot["migrate_cpu_ns"], "migrate_wall_ns": tot["migrate_wall_ns"],
        "cpu_ns_per_migrated_page": tot["migrate_cpu_ns"] / migrated if migrated else None,
        "stalls": tot["stalls"], "stall_ns": tot["stall_ns"], "access_cost": tot["access_cost"],
        "access_wall_ns": tot["access_wall_ns"], **{k: tot[k] for k in (*_UVM, "uvm_service_ns")},
        "vmstat": {k: vm1[k] - vm0[k] for k in VMSTAT_REPORTED}, "events_by_reason": by_reason,
        "events_dropped": dropped, "numa": None if numa is None else dict(numa.stats),
        "reads_verified": acc.verified, "mismatches": acc.mismatches,
        "first_mismatch": acc.first_bad, "final_bytes_ok": final_ok, "leaked_frames": leaked,
        "verified": final_ok and acc.mismatches == 0 and leaked == 0}
    config = {"trace": trace.name, "trace_meta": trace.meta, "records": len(trace), "epochs": trace.epochs,
              "region_pages": pages, "page_size": ps, "policy": policy.name, "policy_params": policy.params(),
              "mode": mode, "fast_pages": fast_pages, "slow_pages": m.nodes[1].total_pages,
              "paths": "move_pages" if numa is None else "hint-faults",
              "numa_settings": None if numa is None else settings_numa.as_dict(),
              "watermarks": None if numa is None else vars(numa.wmark), **settings}
    return ReplayResult(summary, series, config, kept)


def _events_after(m: Machine, last: Any) -> tuple[list[Any], bool]:
    """The ``mm_migrate_pages`` events recorded after ``last``, and whether some were dropped unseen (the
    machine keeps the latest ``MIGRATE_EVENTS_KEPT``)."""
    evs = m.migrate_events
    for k in range(len(evs) - 1, -1, -1):
        if evs[k] is last:
            return evs[k + 1:], False
    return evs, last is not None


def _add_event(by_reason: dict[str, dict[str, int]], ev: Any) -> None:
    """Add one event to the per-reason totals."""
    t = by_reason.setdefault(ev.reason.name, dict.fromkeys(("calls", "succeeded", "failed", "thp_succeeded",
                                                            "thp_failed", "thp_split", "large_folio_split"), 0))
    t["calls"] += 1
    for k in ("succeeded", "failed", "thp_succeeded", "thp_failed", "thp_split", "large_folio_split"):
        t[k] += getattr(ev, k)
