"""``dmamig stress``: bounded stress of the whole machine, with invariant checks and fault injection.

Worker threads run, together: writers and readers (each access checked against a reference model of the
bytes), migrators in every mode with copy and no-copy migration, ``m.migrate_pages`` on live pfns,
``MigrateVma`` drivers, and fork/mmap/munmap churn, while the machine's fault points fail at rate ``R``.
The run is bounded by operation counts, never by time. Every ``check_every`` operations the workers park
between operations and the checker compares every region's bytes with the model, struct pages with the page
tables (:func:`dmamig.check.check_machine`), frames with the allocators, and vmstat with the summed results.
A thread that makes no progress for ``stall_timeout`` seconds fails the run, named with its operation and
stack. Each thread's operations and each fault point's draws derive from ``seed``; the interleaving of the
threads does not, so a seed reproduces a run's operations and faults, not its exact timing.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .check import check_machine
from .errors import InvalidArgument
from .fault_injection import FaultAttr
from .filemap import FILESYSTEMS
from .machine import Machine
from .migrate.options import MigrateOptions
from .stress_ops import ROLES, Region, Shared, Worker, region_bytes, unaudited

__all__ = ["StressConfig", "StressReport", "run_stress"]

@dataclass
class StressConfig:
    """Settings of a stress run.

    Attributes
    ----------
    ops : int
        Operations in all, shared among the threads.
    threads : int
        Worker threads; roles (writer, reader, migrator, dma, driver, churn, pinner) are dealt round robin,
        and a thread with several roles mixes them.
    fault_rate : float
        Chance in ``[0, 1]`` that each DMA share fails at submission, mid-copy or at completion; a channel
        worker crashes and a folio allocation fails at a quarter of it (0.02 by default, the rate of the
        documented long runs). ``0`` injects nothing.
    seed : int, optional
        Seed of every thread's operations and every fault point (drawn and reported when ``None``).
    check_every : int
        Operations between invariant checks.
    stall_timeout : float
        Seconds without any progress after which the run fails and names the stuck threads.
    roles : tuple of str
        The roles to deal (a subset of writer, reader, migrator, dma, driver, churn, pinner; all by
        default). A pinner pins a few pages, writes them through its pin and drops it.
    files : str, optional
        A filesystem model (``dmamig.filemap.FILESYSTEMS``): each address space also maps a file on it shared
        (written through the mapping and with ``pwrite``) and another one private, while the flusher writes
        dirty folios back (failing with ``EIO`` and ``ENOSPC`` at a quarter of ``fault_rate`` each). At the
        end the bytes on disk must equal the model. ``None``: no files.
    anon : bool
        Map the anonymous and shared-memory regions; ``False`` (with ``files``) stresses the files alone.
    unaudited_no_copy : bool
        Run every migration with ``MigrateOptions(unaudited_no_copy=True)``: no-copy migration moves the
        folios of a filesystem that writes without the folio lock. The writes it loses are counted
        (``StressReport.lost_writes``), each one checked against a write that landed on a locked folio.
    """

    ops: int = 10_000
    threads: int = 6
    fault_rate: float = 0.02
    seed: int | None = None
    check_every: int = 1000
    stall_timeout: float = 60.0
    host_pages: int = 4096
    device_pages: int = 2048
    devices: int = 2
    page_size: int = 4096
    channels: int = 3
    backend: str = "cpu"
    roles: tuple[str, ...] = ROLES
    files: str | None = None
    anon: bool = True
    unaudited_no_copy: bool = False

    def validate(self) -> None:
        """Raise InvalidArgument for a setting out of range."""
        for name in ("ops", "threads", "check_every", "host_pages", "device_pages", "page_size", "channels",
                     "devices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "devices" else 1):
                raise InvalidArgument(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.fault_rate, (int, float)) or not 0 <= self.fault_rate <= 1:
            raise InvalidArgument(f"fault_rate must be a number in [0, 1], got {self.fault_rate!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidArgument(f"seed must be an integer >= 0, got {self.seed!r}")
        roles = tuple(self.roles) if isinstance(self.roles, (list, tuple)) else ()
        if not roles or any(r not in ROLES for r in roles) or len(set(roles)) != len(roles):
            raise InvalidArgument(f"roles must be distinct names among {', '.join(ROLES)}, got {self.roles!r}")
        if self.files is not None and self.files not in FILESYSTEMS:
            raise InvalidArgument(f"files must be one of {', '.join(FILESYSTEMS)} or None, got {self.files!r}")
        if not self.anon and self.files is None:
            raise InvalidArgument("anon=False leaves nothing to stress: name a filesystem with files=")
        if not isinstance(self.unaudited_no_copy, bool) or not isinstance(self.anon, bool):
            raise InvalidArgument(f"anon and unaudited_no_copy must be True or False, got {self.anon!r} and "
                                  f"{self.unaudited_no_copy!r}")
        if not self.stall_timeout > 0:
            raise InvalidArgument(f"stall_timeout must be > 0 seconds, got {self.stall_timeout!r}")


@dataclass
class StressReport:
    """What a stress run did and found.

    Attributes
    ----------
    seed : int
        The seed that repeats the run's operations and faults.
    ops, seconds : int, float
        Operations done and the wall time they took.
    faults_injected : dict of str to int
        Faults injected at each fault point.
    faults_survived : int
        Faults injected before the last invariant check that passed.
    bytes_verified : int
        Bytes compared with the model, by readers and by the checks.
    checks : int
        Invariant checks run.
    pages_migrated : int
        Base pages migrated (vmstat ``pgmigrate_success``).
    channel_restarts : int
        DMA channel workers restarted after a crash.
    op_counts : dict of str to int
        Operations by kind (``-raced``: the range was unmapped meanwhile; ``-oom``: an allocation failed).
    lost_writes : int
        Pages of files whose written bytes were lost, found by the verification: only with
        ``unaudited_no_copy``, where each must be a page the un-audited filesystem wrote while a migration
        held it locked (else it is a violation).
    unlocked_writes : int
        Writes (in pages) the un-audited filesystem made to folios a migration held locked.
    violations : list of str
        What went wrong; empty when every invariant held (``ok``).
    """

    seed: int
    ops: int = 0
    seconds: float = 0.0
    faults_injected: dict[str, int] = field(default_factory=dict)
    faults_survived: int = 0
    bytes_verified: int = 0
    checks: int = 0
    pages_migrated: int = 0
    channel_restarts: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    lost_writes: int = 0
    unlocked_writes: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return not self.violations

    @property
    def ops_per_second(self) -> float:
        """Operations per second of wall time."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        faults = sum(self.faults_injected.values())
        per_point = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items()) if v)
        out = [
            f"ops: {self.ops} in {self.seconds:.1f} s ({self.ops_per_second:,.0f} ops/s)",
            "operations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items())),
            f"faults injected: {faults}" + (f" ({per_point})" if per_point else "")
            + f"; survived: {self.faults_survived}",
            f"DMA channel restarts: {self.channel_restarts}",
            f"pages migrated: {self.pages_migrated}",
            f"bytes verified: {self.bytes_verified:,}",
            f"invariant checks: {self.checks}",
            f"file writes lost: {self.lost_writes} (writes to locked folios without the folio lock: "
            f"{self.unlocked_writes})",
            f"seed: {self.seed} (dmamig stress --seed {self.seed} repeats these operations and faults)",
        ]
        if self.violations:
            out.append(f"FAILED: {len(self.violations)} violation(s)")
            out.extend(f"  {v}" for v in self.violations)
        else:
            out.append("OK: every invariant held")
        return out


class _Checkpoint:
    """Parks the workers between operations so that the checker sees a machine with nothing in flight."""

    def __init__(self, active: int, check: Callable[[], None]):
        self.cv = threading.Condition()
        self.active = active
        self.parked = 0
        self.requested = False
        self.generation = 0
        self.check = check

    def request(self) -> None:
        with self.cv:
            self.requested = True

    def _run_if_all_parked(self) -> None:
        if self.requested and self.parked >= self.active:
            self.check()
            self.requested = False
            self.parked = 0
            self.generation += 1
            self.cv.notify_all()

    def arrive(self, stop: threading.Event) -> None:
        with self.cv:
            if not self.requested:
                return
            gen = self.generation
            self.parked += 1
            self._run_if_all_parked()
            while self.generation == gen and not stop.is_set():
                self.cv.wait(0.5)

    def leave(self) -> None:
        with self.cv:
            self.active -= 1
            self._run_if_all_parked()


def _faults(m: Machine, rate: float, seed: int) -> None:
    if rate <= 0:
        return
    for i, (point, p) in enumerate((("dma_submit", rate), ("dma_copy", rate), ("dma_complete", rate),
                                    ("channel_crash", rate / 4), ("alloc", rate / 4), ("writeback", rate / 4),
                                    ("disk_full", rate / 4))):
        m.faults[point] = FaultAttr(probability=p, seed=seed * 16 + i)


def _stack_summary(t: threading.Thread) -> str:
    frame = sys._current_frames().get(t.ident or -1)
    if frame is None:
        return "(no stack)"
    stack = traceback.extract_stack(frame)
    waits = next((f for f in reversed(stack) if not f.filename.endswith("threading.py")), stack[-1])
    lines = "".join(traceback.format_list(stack[-8:]))
    return f"waits in {waits.name} ({waits.filename}:{waits.lineno}): {waits.line}\n{lines}"


def run_stress(config: StressConfig | None = None, out: Callable[[str], None] | None = None) -> StressReport:
    """Run a bounded stress test; return its report (``report.ok`` is false on any violation).

    Parameters
    ----------
    config : StressConfig, optional
        Settings; the defaults when ``None``.
    out : callable, optional
        Called with progress lines (one per invariant check).

    Returns
    -------
    StressReport
        Figures and violations; ``report.ok`` is false when an invariant broke or a thread got stuck.

    Raises
    ------
    InvalidArgument
        A setting of ``config`` is out of range.
    """
    cfg = config or StressConfig()
    cfg.validate()
    seed = int(cfg.seed) if cfg.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    report = StressReport(seed=seed)
    m = Machine(host_pages=cfg.host_pages, device_pages=cfg.device_pages, devices=cfg.devices,
                page_size=cfg.page_size, backend=cfg.backend, channels=cfg.channels)
    options = MigrateOptions(unaudited_no_copy=True) if cfg.unaudited_no_copy else None
    shared = Shared(m, report, options)
    try:
        _setup_regions(shared, np.random.default_rng(seed), cfg.files, cfg.anon)
    except BaseException:
        m.close()
        raise
    _faults(m, cfg.fault_rate, seed)
    vm0 = m.vmstat
    stop = threading.Event()

    def check() -> None:
        with m.faults.suspended():
            _check_all(shared, vm0, report)
        report.checks += 1
        report.faults_survived = m.faults.total_injected
        shared.progress += 1
        shared.checked_at = shared.ops_done
        if report.violations:
            stop.set()
        if out is not None:
            out(f"check {report.checks}: {shared.ops_done} ops, {m.faults.total_injected} faults, "
                f"{len(report.violations)} violations")

    dealt = tuple(cfg.roles)
    roles = [list(dealt[i::cfg.threads]) for i in range(min(cfg.threads, len(dealt)))]
    roles += [[dealt[i % len(dealt)]] for i in range(len(roles), cfg.threads)]
    gate = _Checkpoint(cfg.threads, check)
    seeds = np.random.SeedSequence(seed).spawn(cfg.threads)
    per = [cfg.ops // cfg.threads + (i < cfg.ops % cfg.threads) for i in range(cfg.threads)]
    workers = [Worker(shared, f"stress-{i}-{'+'.join(r)}", r, np.random.default_rng(s), n, stop, gate,
                      cfg.check_every) for i, (r, s, n) in enumerate(zip(roles, seeds, per))]
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    stuck = _join_all(threads, workers, shared, cfg.stall_timeout, report)
    report.seconds = time.perf_counter() - t0
    report.ops = shared.ops_done
    report.op_counts = dict(sorted(shared.op_counts.items()))
    report.faults_injected = m.faults.injected
    if stuck:
        # Stuck threads may hold what close() needs: try it off to the side, never waiting long on it.
        threading.Thread(target=m.close, name="stress-machine-close", daemon=True).start()
    else:
        m.faults.clear()
        if not report.violations and shared.checked_at != shared.ops_done:
            check()
        _teardown(shared, report)
    report.channel_restarts = m.dma.stats.channel_restarts if m.dma_started else 0
    if not report.violations:
        report.faults_survived = sum(report.faults_injected.values())
    return report


def _setup_regions(shared: Shared, rng: np.random.Generator, fs: str | None = None, anon: bool = True) -> None:
    m = shared.m
    ps = m.page_size
    for _ in range(2):
        mm = m.address_space()
        shared.spaces.append(mm)
        for npages, is_shared, order in ((48, False, 0), (48, True, 0), (512, False, 9)) if anon else ():
            addr = mm.mmap(npages * ps, shared=is_shared, order=order)
            r = Region(mm, addr, npages, is_shared, order, churn=False)
            data = rng.integers(0, 256, npages * ps, dtype=np.uint8)
            mm.write(addr, data)
            r.model[:] = data
            shared.add_region(r)
        if fs is None:
            continue
        for is_shared in (True, False):
            npages = 48
            f = m.open(size=npages * ps, fs=fs)
            shared.files.append(f)
            data = rng.integers(0, 256, npages * ps, dtype=np.uint8)
            f.pwrite(data, 0)
            addr = mm.mmap(npages * ps, file=f, shared=is_shared)
            r = Region(mm, addr, npages, is_shared, 0, churn=False, file=f)
            mm.read(addr, npages * ps)  # every page maps its page-cache folio
            if not is_shared:
                # Half the private pages are copied on write; the others still map the page cache.
                half = rng.integers(0, 256, npages // 2 * ps, dtype=np.uint8)
                mm.write(addr, half)
                data[: half.size] = half
            r.model[:] = data
            shared.add_region(r)


def _join_all(threads: list[threading.Thread], workers: list[Worker], shared: Shared, stall: float,
              report: StressReport) -> bool:
    """Join every thread; fail the run, naming the stuck threads, if nothing progresses for ``stall`` s."""
    last, seen = time.monotonic(), -1
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.1)
        now = time.monotonic()
        mark = shared.ops_done + shared.progress
        if mark != seen:
            last, seen = now, mark
        elif now - last > stall:
            for w, t in zip(workers, threads):
                if t.is_alive():
                    report.violations.append(f"thread {t.name} is stuck (no progress for {stall:g} s) in "
                                             f"{w.doing}; {_stack_summary(t)}")
            return True
    return False


def _check_all(shared: Shared, vm0: dict[str, int], report: StressReport) -> None:
    """The invariant checks, run while every worker is parked (nothing in flight)."""
    m = shared.m
    for v in check_machine(m, idle=True):
        report.violations.append(f"after {shared.ops_done} ops: {v}")
    for v in m.page_cache.check_counters():
        report.violations.append(f"after {shared.ops_done} ops: {v}")
    with m.lock:
        for r in shared.live_regions():
            got = region_bytes(m, r)
            if got.size == r.model.size and shared.losses_expected and unaudited(r):
                _count_lost_writes(shared, r, got)
            elif got.size != r.model.size or not np.array_equal(got, r.model):
                bad = int(np.flatnonzero(got != r.model)[0]) if got.size == r.model.size else -1
                report.violations.append(f"after {shared.ops_done} ops: {r} holds bytes that differ from the "
                                         f"model (first at offset {bad})")
            report.bytes_verified += int(r.model.size)
        report.unlocked_writes = sum(f.unlocked_writes for f in shared.files)
    vm = m.vmstat
    d = {k: vm[k] - vm0.get(k, 0) for k in vm}
    s = dict(shared.sums)
    if "migrate_vma_success" in d:
        # MigrateVma keeps counters of its own; nothing else adds to them.
        if d["migrate_vma_success"] != s["vma_success"]:
            report.violations.append(f"after {shared.ops_done} ops: vmstat migrate_vma_success "
                                     f"{d['migrate_vma_success']} != {s['vma_success']} pages migrated by "
                                     f"MigrateVma drivers")
    else:
        s["success"] += s["vma_success"]
    # CPU faults on device pages migrate them back (migrate_to_ram) without any result to add up: those
    # pages may add to vmstat, never take from it.
    extra = d["pgmigrate_success"] - s["success"] + d["pgmigrate_fail"] - s["fail"]
    if d["pgmigrate_success"] < s["success"] or d["pgmigrate_fail"] < s["fail"] \
            or extra > d.get("migrate_to_ram", 0) or d["thp_migration_success"] < s["thp_success"] \
            or d["thp_migration_fail"] < s["thp_fail"]:
        report.violations.append(f"after {shared.ops_done} ops: vmstat disagrees with the summed results: "
                                 f"vmstat {d}, results {s} (only CPU faults' migrate_to_ram may add to vmstat)")
    report.pages_migrated = d["pgmigrate_success"]


def _count_lost_writes(shared: Shared, r: Region, got: np.ndarray) -> None:
    """The un-audited filesystem's lost writes in ``r`` (lock held): every page that differs from the model
    must be one it wrote while a migration held the folio locked; the model then takes the bytes as they are,
    so that each loss counts once."""
    ps = shared.m.page_size
    lost = np.unique(np.flatnonzero(got != r.model) // ps)
    if lost.size == 0:
        return
    unexplained = [p for p in lost.tolist() if not r.file.unlocked_pages.get(p)]
    if unexplained:
        shared.report.violations.append(f"after {shared.ops_done} ops: {r} lost writes on pages {unexplained[:8]} "
                                        f"that no write without the folio lock explains")
    shared.report.lost_writes += int(lost.size)
    r.model[:] = got


def _check_disk(shared: Shared, report: StressReport) -> None:
    """After fsync, each shared file region's bytes on disk equal its model."""
    for r in shared.regions:
        if r.file is None or not r.shared or not r.alive:
            continue
        # A writeback that failed under fault injection is reported once, its folios still dirty: the next
        # fsync writes them.
        err = r.file.fsync()
        if err:
            err = r.file.fsync()
        if err:
            report.violations.append(f"fsync of {r.file.path} returned {err} twice")
        with open(r.file.path, "rb") as fh:
            disk = np.frombuffer(fh.read(), dtype=np.uint8)
        if disk.size != r.model.size or not np.array_equal(disk, r.model):
            report.violations.append(f"{r}: the bytes on disk differ from the model after fsync")


def _teardown(shared: Shared, report: StressReport) -> None:
    """Check the files on disk, close every address space and file, check that every frame came back, close
    the machine (bounded)."""
    m = shared.m
    _check_disk(shared, report)
    for mm in shared.all_spaces():
        mm.close()
    for f in shared.files:
        f.close()
    for node in m.nodes:
        if node.free_pages != node.total_pages:
            report.violations.append(f"node {node.id}: {node.total_pages - node.free_pages} frames leaked after "
                                     f"every address space was closed")
    report.violations.extend(check_machine(m, idle=True))
    closer = threading.Thread(target=m.close, name="stress-machine-close", daemon=True)
    closer.start()
    closer.join(30)
    if closer.is_alive():
        report.violations.append(f"Machine.close() did not finish in 30 s: {_stack_summary(closer)}")
