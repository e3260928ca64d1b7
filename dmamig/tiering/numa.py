"""The kernel's tiering paths for a replay: NUMA-balancing promotion through hint faults, demotion from reclaim.

Promotion (``NUMA_BALANCING_MEMORY_TIERING``), as kernel/sched/fair.c, mm/mprotect.c and mm/memory.c have it:

- **Scanner** (``task_numa_work``): each scan period it makes the next ``scan_size`` of the region
  ``PROT_NONE`` (``change_prot_numa``), skipping pages on the top tier (tiering mode scans only the lower tiers)
  and pages already protected, and stamps each page it protects with the scan time
  (``folio_xchg_access_time``).
- **Hint fault** (``do_numa_page``): the first access to a protected page counts ``numa_hint_faults`` (and
  ``numa_hint_faults_local`` when the page is on the faulting CPU's node), restores the mapping, and asks
  ``should_numa_migrate_memory`` whether to promote: yes at once while the top tier has plenty free
  (``pgdat_free_space_enough``); else only when the fault came within the hot threshold of the scan
  (``numa_hint_fault_latency`` below ``numa_balancing_hot_threshold_ms``, adjusted every threshold period by
  ``numa_promotion_adjust_threshold``) and the top tier's promotion candidates this second are under
  ``numa_balancing_promote_rate_limit_MBps`` (``numa_promotion_rate_limit``). Then
  ``migrate_misplaced_folio_prepare`` refuses a top tier that is not balanced (free at or below the high
  watermark plus the folio) and wakes kswapd instead; otherwise ``migrate_misplaced_folio`` moves the one folio,
  ASYNC, ``MR_NUMA_MISPLACED``, in the faulting thread.

Demotion (mm/vmscan.c): kswapd, woken when a promotion found the top tier unbalanced or an allocation took it
under its low watermark, reclaims the coldest top-tier pages (least recently accessed first, as the inactive
LRU's tail) in ``SWAP_CLUSTER_MAX`` batches, each a ``demote_folio_list`` (``Machine.demote_folios``, ASYNC,
``MR_DEMOTION``, counted ``pgdemote_kswapd``), until the tier is balanced at its promotion watermark
(``WMARK_PROMO``, as kswapd balances in tiering mode). Without demotion (``demotion_enabled`` off) kswapd has
nothing to reclaim an anonymous region with (no swap here) and promotion stops once the top tier is full.

Watermarks are the kernel's (``__setup_per_zone_wmarks``: ``min_free_kbytes`` from
``calculate_min_free_kbytes`` shared over the host nodes by size, ``watermark_scale_factor`` 10).

Time is the trace's: epoch ``e`` spans ``[e, e + 1)`` scan periods and its records are spread evenly over it,
so a replay's decisions do not depend on how fast the machine replays it. kswapd runs on its own thread (its
CPU is migration CPU, not the accessor's); the accessor that woke it waits for it to finish before its next
record, which makes kswapd instantaneous in the trace's time and keeps replays reproducible.

Not modelled: the adaptive scan period (fixed here: one scan period per epoch), the task's preferred node and
its fault statistics (``task_numa_fault``: every CPU actor runs on node 0), and the page-table state itself: the
``PROT_NONE`` marks live in this model, per page of the replayed region, not in the address space's PTEs.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from ..machine import Machine

__all__ = ["HintFaultPaths", "NumaSettings", "Watermarks", "kernel_watermarks"]

#: ``SWAP_CLUSTER_MAX``: folios one ``shrink_folio_list`` round reclaims (each round one demote_folio_list).
SWAP_CLUSTER_MAX = 32
#: ``NUMA_MIGRATION_ADJUST_STEPS`` of ``numa_promotion_adjust_threshold``.
ADJUST_STEPS = 16


@dataclass(frozen=True)
class NumaSettings:
    """The sysctls of NUMA-balancing tiering and demotion (the kernel's defaults unless set).

    Attributes
    ----------
    scan_period_ms : int
        Scan period; one epoch of the trace is one period (``numa_balancing_scan_period_min_ms``, 1000).
    scan_size_mb : int
        Region scanned per period (``numa_balancing_scan_size_mb``, 256).
    hot_threshold_ms : int
        ``numa_balancing_hot_threshold_ms`` (1000): a hint fault this soon after the scan is hot.
    promote_rate_limit_mbps : int
        ``numa_balancing_promote_rate_limit_MBps`` (65536): promotion candidates per second per top-tier node.
    threshold_period_ms : int
        How often the hot threshold adjusts (``numa_balancing_scan_period_max_ms``, 60000).
    demotion : bool
        ``/sys/kernel/mm/numa/demotion_enabled``: reclaim demotes to the lower tier (TPP) or not.
    watermark_scale_factor : int
        ``vm.watermark_scale_factor`` (10: 0.1 % of a node between watermarks).
    """

    scan_period_ms: int = 1000
    scan_size_mb: int = 256
    hot_threshold_ms: int = 1000
    promote_rate_limit_mbps: int = 65536
    threshold_period_ms: int = 60000
    demotion: bool = False
    watermark_scale_factor: int = 10

    def __post_init__(self) -> None:
        for k in ("scan_period_ms", "scan_size_mb", "hot_threshold_ms", "promote_rate_limit_mbps",
                  "threshold_period_ms", "watermark_scale_factor"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"{k} must be a positive integer, got {v!r}")

    def as_dict(self) -> dict[str, Any]:
        """The settings, for results."""
        return dict(vars(self))


@dataclass(frozen=True)
class Watermarks:
    """A node's watermarks in pages (``WMARK_MIN``, ``WMARK_LOW``, ``WMARK_HIGH``, ``WMARK_PROMO``)."""

    min: int
    low: int
    high: int
    promo: int


def kernel_watermarks(m: Machine, node: int, scale_factor: int = 10) -> Watermarks:
    """``__setup_per_zone_wmarks`` for host node ``node`` of ``m``: ``min_free_kbytes`` as
    ``calculate_min_free_kbytes`` sets it (the square root of 16 x the host memory in KiB, within
    [128, 262144]), shared over the host nodes by their size; then ``low``, ``high`` and ``promo`` each a step
    of ``max(min / 4, managed * watermark_scale_factor / 10000)`` above the previous one."""
    host = [m.nodes[n].total_pages for n in m.host_node_ids]
    kb_per_page = m.page_size // 1024
    min_free_kb = min(max(math.isqrt(sum(host) * kb_per_page * 16), 128), 262144)
    pages_min = min_free_kb // kb_per_page
    managed = m.nodes[node].total_pages
    wmin = pages_min * managed // sum(host)
    step = max(wmin >> 2, managed * scale_factor // 10000)
    return Watermarks(wmin, wmin + step, wmin + 2 * step, wmin + 3 * step)


class HintFaultPaths:
    """NUMA-balancing promotion by hint faults and demotion by kswapd over one replayed region.

    Parameters
    ----------
    mm : AddressSpace
        The replaying process.
    addr, pages : int
        The region: its first address and its pages.
    settings : NumaSettings
        The sysctls.
    engine : DmaEngine, optional
        Copies kswapd's demotion batches (no-copy migration); ``None``: the CPU copies. A hint fault's one
        folio is always copied by the faulting CPU (``migrate_misplaced_folio``).
    """

    def __init__(self, mm: Any, addr: int, pages: int, settings: NumaSettings, engine: Any = None):
        self.mm, self.m, self.addr, self.pages = mm, mm.machine, addr, pages
        self.engine = engine
        self.s = settings
        m = self.m
        self.ps = m.page_size
        self.top = m.host_node_ids[0]
        self.lower = set(m.host_node_ids[1:])
        self.wmark = kernel_watermarks(m, self.top, settings.watermark_scale_factor)
        self.prot_none = np.zeros(pages, dtype=bool)  # the scanner's marks (PROT_NONE PTEs)
        self.marked_pfn = np.full(pages, -1, dtype=np.int64)  # the page each mark was made on
        self.access_ms = np.zeros(pages, dtype=np.float64)  # folio_xchg_access_time's stamp
        self.last_use = np.full(pages, -np.inf)  # trace time of the last access: the LRU's order
        self.scan_offset = 0  # mm->numa_scan_offset
        self.scan_pages = max(1, (settings.scan_size_mb << 20) // self.ps)
        # The top tier's promotion state (struct pglist_data's nbp_* fields and PGPROMOTE_CANDIDATE).
        self.candidates = 0
        self.rl_start_ms = 0.0
        self.rl_nr_cand = 0
        self.th_start_ms = 0.0
        self.th_nr_cand = 0
        self.threshold_ms = 0  # nbp_threshold; 0: the default
        self.rate_limit_pages = (settings.promote_rate_limit_mbps << 20) // self.ps  # MB_TO_PAGES
        self.lock = threading.Lock()
        self.stats = dict.fromkeys(("hint_faults", "hint_faults_local", "promoted", "promote_failed",
                                    "not_hot", "rate_limited", "unbalanced", "demoted", "demote_failed",
                                    "kswapd_wakeups", "promote_cpu_ns", "kswapd_cpu_ns"), 0)
        self._kswapd_wake = threading.Event()
        self._kswapd_done = threading.Event()
        self._kswapd_done.set()
        self._stop = False
        self._kswapd_error: BaseException | None = None
        self._kswapd = threading.Thread(target=self._kswapd_loop, name="dmamig-kswapd", daemon=True)
        self._kswapd.start()

    # -- task_numa_work -------------------------------------------------------------------------------------
    def scan(self, now_ms: float) -> int:
        """One scan period's ``change_prot_numa`` over the next ``scan_size`` of the region; returns how many
        pages it protected. Top-tier, unpopulated, device and already protected pages are skipped. A mark
        whose page was migrated since (by a device, or a policy) is gone: the new PTE is not ``PROT_NONE``."""
        pfns = self.mm.pfns_of(self.addr, self.pages * self.ps)
        placement = np.where(pfns >= 0, self.m.nodemap.node_of(np.maximum(pfns, 0)), -1)
        n = min(self.scan_pages, self.pages)
        idx = (self.scan_offset + np.arange(n)) % self.pages
        self.scan_offset = int((self.scan_offset + n) % self.pages)
        lower = np.isin(placement[idx], list(self.lower)) if self.lower else np.zeros(n, dtype=bool)
        with self.lock:
            self.prot_none &= self.marked_pfn == pfns
            take = idx[lower & ~self.prot_none[idx]]
            self.prot_none[take] = True
            self.marked_pfn[take] = pfns[take]
            self.access_ms[take] = now_ms
        return int(take.size)

    # -- do_numa_page -----------------------------------------------------------------------------------------
    def access(self, page: int, now_ms: float, cpu_node: int = 0) -> None:
        """An access by a CPU on ``cpu_node`` to ``page`` at trace time ``now_ms``: a hint fault if the page
        is protected. The accessor calls it before the access itself."""
        self.last_use[page] = now_ms
        if not self.prot_none[page]:
            return
        self._hint_fault(page, now_ms, cpu_node)

    def _hint_fault(self, page: int, now_ms: float, cpu_node: int) -> None:
        m, mm = self.m, self.mm
        va = self.addr + page * self.ps
        with self.lock:
            if not self.prot_none[page]:
                return  # another thread took this fault
            self.prot_none[page] = False
        pfn = mm.pfn_of(va)
        if pfn != self.marked_pfn[page]:
            return  # migrated since the scan (a device took it): its new PTE is not PROT_NONE, no fault
        node = int(m.nodemap.node_of(np.array([pfn]))[0])
        with m.lock:
            m.count_event("numa_hint_faults")
            if node == cpu_node:
                m.count_event("numa_hint_faults_local")
        with self.lock:
            self.stats["hint_faults"] += 1
            self.stats["hint_faults_local"] += int(node == cpu_node)
            # mpol_misplaced: a page already on the faulting CPU's node is where it belongs.
            go = node != cpu_node and self._should_migrate(page, now_ms, 1)
        if not go:
            return
        if self.m.nodes[self.top].free_pages <= self.wmark.high + 1:
            # migrate_balanced_pgdat: zone_watermark_ok(high + nr) fails at free <= the mark;
            # migrate_misplaced_folio_prepare: "avoid migrating to a node that is nearly full"; in tiering mode
            # it wakes kswapd on that node instead.
            with self.lock:
                self.stats["unbalanced"] += 1
            self._wake_kswapd()
            return
        t0 = time.thread_time_ns()
        res = m.migrate_misplaced_folio(pfn, self.top)
        with self.lock:
            self.stats["promote_cpu_ns"] += time.thread_time_ns() - t0
            self.stats["promoted" if res.nr_succeeded else "promote_failed"] += 1
        if m.nodes[self.top].free_pages <= self.wmark.low:
            self._wake_kswapd()  # the allocation took the node under its low watermark

    def _should_migrate(self, page: int, now_ms: float, nr: int) -> bool:
        """``should_numa_migrate_memory`` for a folio on a lower tier, toward the top tier (lock held)."""
        enough = max((1 << 30) // self.ps, self.m.nodes[self.top].total_pages >> 4)
        if self.m.nodes[self.top].free_pages > self.wmark.promo + enough:  # pgdat_free_space_enough
            self.threshold_ms = 0  # "workload changed, reset hot threshold"
            return True
        ref_th = self.s.hot_threshold_ms
        self._adjust_threshold(now_ms, ref_th)
        th = self.threshold_ms or ref_th
        latency = now_ms - self.access_ms[page]  # numa_hint_fault_latency, which also restamps the folio
        self.access_ms[page] = now_ms
        if latency >= th:
            self.stats["not_hot"] += 1
            return False
        if self._rate_limited(now_ms, nr):
            self.stats["rate_limited"] += 1
            return False
        return True

    def _rate_limited(self, now_ms: float, nr: int) -> bool:
        """``numa_promotion_rate_limit``: candidates in the current one-second window against the limit."""
        self.candidates += nr  # PGPROMOTE_CANDIDATE
        if now_ms - self.rl_start_ms > 1000:
            self.rl_start_ms = now_ms
            self.rl_nr_cand = self.candidates
        return self.candidates - self.rl_nr_cand >= self.rate_limit_pages

    def _adjust_threshold(self, now_ms: float, ref_th: int) -> None:
        """``numa_promotion_adjust_threshold``: every threshold period, lower the hot threshold by a step when
        the period's candidates passed 110 % of what the rate limit allows, raise it below 90 %."""
        period = self.s.threshold_period_ms
        if now_ms - self.th_start_ms <= period:
            return
        self.th_start_ms = now_ms
        ref_cand = self.rate_limit_pages * period // 1000
        diff = self.candidates - self.th_nr_cand
        unit = ref_th * 2 // ADJUST_STEPS
        th = self.threshold_ms or ref_th
        if diff > ref_cand * 11 // 10:
            th = max(th - unit, unit)
        elif diff < ref_cand * 9 // 10:
            th = min(th + unit, ref_th * 2)
        self.th_nr_cand = self.candidates
        self.threshold_ms = th

    # -- kswapd -----------------------------------------------------------------------------------------------
    def _wake_kswapd(self) -> None:
        """``wakeup_kswapd``, then wait for its balancing to finish (kswapd is instantaneous in trace time)."""
        with self.lock:
            self.stats["kswapd_wakeups"] += 1
        if not self.s.demotion:
            return  # nothing kswapd could reclaim from an anonymous region without swap
        self._kswapd_done.clear()
        self._kswapd_wake.set()
        self._kswapd_done.wait()
        if self._kswapd_error is not None:
            raise self._kswapd_error

    def _kswapd_loop(self) -> None:
        while True:
            self._kswapd_wake.wait()
            self._kswapd_wake.clear()
            if self._stop:
                self._kswapd_done.set()
                return
            t0 = time.thread_time_ns()
            try:
                self._balance_pgdat()
            except BaseException as exc:  # re-raised in the thread that woke kswapd
                self._kswapd_error = exc
            with self.lock:
                self.stats["kswapd_cpu_ns"] += time.thread_time_ns() - t0
            self._kswapd_done.set()

    def _balance_pgdat(self) -> None:
        """``balance_pgdat``: rounds of reclaim, each of ``max(high watermark, SWAP_CLUSTER_MAX)`` pages
        (``kswapd_shrink_node``'s ``nr_to_reclaim``), coldest first, in ``demote_folio_list`` batches of
        ``SWAP_CLUSTER_MAX``, until the top tier is balanced at its promotion watermark or nothing is left."""
        m, mm = self.m, self.mm
        placement = mm.nodes_of(self.addr, self.pages * self.ps)
        fast = np.flatnonzero(placement == self.top)
        cold = fast[np.argsort(self.last_use[fast], kind="stable")]
        per_round = max(self.wmark.high, SWAP_CLUSTER_MAX)
        pos = 0
        # pgdat_balanced: zone_watermark_ok(promo) holds once free pages are above the mark.
        while m.nodes[self.top].free_pages <= self.wmark.promo and pos < cold.size:
            end = min(pos + per_round, cold.size)
            for lo in range(pos, end, SWAP_CLUSTER_MAX):
                batch = cold[lo:min(lo + SWAP_CLUSTER_MAX, end)]
                pfns = np.array([mm.pfn_of(self.addr + int(p) * self.ps) for p in batch], dtype=np.int64)
                res = m.demote_folios(pfns, kswapd=True, engine=self.engine)
                with self.lock:
                    self.stats["demoted"] += int(res.nr_succeeded)
                    self.stats["demote_failed"] += int(batch.size - res.nr_succeeded)
            pos = end

    def close(self) -> None:
        """Stop kswapd."""
        self._stop = True
        self._kswapd_wake.set()
        self._kswapd.join(30)
