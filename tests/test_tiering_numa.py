"""The kernel's tiering paths a replay runs (dmamig.tiering.numa), each test named after the kernel function it
mirrors: task_numa_work / change_prot_numa, do_numa_page, should_numa_migrate_memory with
numa_promotion_rate_limit and numa_promotion_adjust_threshold, migrate_misplaced_folio_prepare, kswapd's
balance_pgdat demoting with demote_folio_list, and __setup_per_zone_wmarks."""

from __future__ import annotations

import pytest

from dmamig import Machine, MigrateMode, MigrateReason
from dmamig.tiering import make_policy, make_workload, replay
from dmamig.tiering.numa import HintFaultPaths, NumaSettings, kernel_watermarks


@pytest.fixture
def tiered():
    """DRAM (512 frames) over CXL (1024 frames), and a 256-page region on the CXL tier."""
    with Machine(host_nodes=[(512, 1.0), (1024, 2.5)], devices=0, device_pages=1, backend="cpu") as m:
        mm = m.address_space()
        addr = mm.mmap(256 * m.page_size)
        mm.populate(addr, 256 * m.page_size, node=1)
        yield m, mm, addr
        mm.close()


def paths(mm, addr, **kw):
    return HintFaultPaths(mm, addr, 256, NumaSettings(**kw))


def test_setup_per_zone_wmarks():
    """min_free_kbytes = sqrt(16 x host KiB) shared by size; low, high, promo a step of max(min/4, 0.1 %)
    apart."""
    with Machine(host_nodes=[(2048, 1.0), (8200, 2.5)], devices=0, device_pages=1, backend="cpu") as m:
        w = kernel_watermarks(m, 0)
        # 10248 pages of 4 KiB: min_free_kbytes = isqrt(655872) = 809 -> 202 pages; node 0's share 40.
        assert (w.min, w.low, w.high, w.promo) == (40, 50, 60, 70)


def test_task_numa_work_protects_lower_tier_pages_only(tiered):
    """change_prot_numa in tiering mode: top-tier pages are skipped, the rest become PROT_NONE stamped with
    the scan time; already protected pages are not stamped again; scan_size bounds one scan."""
    m, mm, addr = tiered
    mm.migrate(addr, 16 * m.page_size, 0)  # the first 16 pages on the top tier
    p = paths(mm, addr, scan_size_mb=1)  # 256 pages of 4 KiB per scan
    try:
        assert p.scan(0.0) == 240
        assert not p.prot_none[:16].any() and p.prot_none[16:].all() and (p.access_ms[16:] == 0).all()
        assert p.scan(1000.0) == 0 and (p.access_ms[16:] == 0).all()  # still PROT_NONE: skipped
        mm.migrate(addr + 20 * m.page_size, m.page_size, 0)  # migrated since: its new PTE is not PROT_NONE
        mm.migrate(addr + 20 * m.page_size, m.page_size, 1)
        assert p.scan(2000.0) == 1 and p.access_ms[20] == 2000.0
    finally:
        p.close()


def test_do_numa_page_counts_hint_faults_and_migrates_one_folio(tiered):
    """do_numa_page: a hint fault counts numa_hint_faults, clears the protection, and a hot misplaced folio
    moves alone with migrate_misplaced_folio (ASYNC, MR_NUMA_MISPLACED); the next access takes no fault."""
    m, mm, addr = tiered
    p = paths(mm, addr)
    try:
        p.scan(0.0)
        before = len(m.migrate_events)
        p.access(5, 10.0)
        p.access(5, 11.0)
        v = m.vmstat
        assert v["numa_hint_faults"] == 1 and v["numa_hint_faults_local"] == 0
        assert v["numa_pages_migrated"] == 1 and v["pgpromote_success"] == 1
        assert mm.node_of(addr + 5 * m.page_size) == 0
        (ev,) = m.migrate_events[before:]
        assert (ev.reason, ev.mode, ev.succeeded) == (MigrateReason.MR_NUMA_MISPLACED, MigrateMode.ASYNC, 1)
    finally:
        p.close()


def test_do_numa_page_counts_numa_hint_faults_local(tiered):
    """count_vm_numa_event(NUMA_HINT_FAULTS_LOCAL) when the folio is on the faulting CPU's node; mpol_misplaced
    then finds it where it belongs and nothing migrates."""
    m, mm, addr = tiered
    p = paths(mm, addr)
    try:
        p.scan(0.0)
        p.access(7, 10.0, cpu_node=1)
        v = m.vmstat
        assert v["numa_hint_faults"] == 1 and v["numa_hint_faults_local"] == 1 and v["pgmigrate_success"] == 0
    finally:
        p.close()


def test_should_numa_migrate_memory_needs_a_fault_within_the_hot_threshold(tiered):
    """numa_hint_fault_latency: a fault later than numa_balancing_hot_threshold_ms after the scan is not hot."""
    m, mm, addr = tiered
    p = paths(mm, addr, hot_threshold_ms=1000)
    try:
        p.scan(0.0)
        p.access(1, 999.0)
        p.access(2, 1000.0)
        assert mm.node_of(addr + m.page_size) == 0 and mm.node_of(addr + 2 * m.page_size) == 1
        assert p.stats["not_hot"] == 1 and m.vmstat["numa_hint_faults"] == 2
    finally:
        p.close()


def test_numa_promotion_rate_limit_counts_candidates_per_second(tiered):
    """numa_promotion_rate_limit: at 1 MB/s (256 pages of 4 KiB) the candidates of one second past the limit
    are refused; a new one-second window starts counting afresh."""
    m, mm, addr = tiered
    p = paths(mm, addr, promote_rate_limit_mbps=1)
    p.rate_limit_pages = 4  # the window's limit in pages, small enough for a short test
    try:
        p.scan(0.0)
        for page in range(8):
            p.access(page, 10.0 + page)
        assert p.stats["promoted"] == 3 and p.stats["rate_limited"] == 5  # the 4th candidate reaches the limit
        p.scan(1011.0)  # protects pages 3..7 again, stamped 1011
        p.access(5, 1012.0)  # > 1 s after the window began: a new window
        assert p.stats["promoted"] == 4 and mm.node_of(addr + 5 * m.page_size) == 0
    finally:
        p.close()


def test_numa_promotion_adjust_threshold_steps_down_and_up():
    """Every threshold period: more than 110 % of the rate limit's candidates lowers the hot threshold by
    2/16 of the default (not below one step); under 90 % raises it (not above twice the default)."""
    with Machine(host_nodes=[(512, 1.0), (1024, 2.5)], devices=0, device_pages=1, backend="cpu") as m:
        mm = m.address_space()
        addr = mm.mmap(256 * m.page_size)
        mm.populate(addr, 256 * m.page_size, node=1)
        p = paths(mm, addr, promote_rate_limit_mbps=1, threshold_period_ms=1000)  # 256 pages a second
        try:
            p.candidates = 1000  # far past 256 in the period
            p._adjust_threshold(1001.0, 1000)
            assert p.threshold_ms == 875
            p._adjust_threshold(1500.0, 1000)  # within the period: unchanged
            assert p.threshold_ms == 875
            p._adjust_threshold(2002.0, 1000)  # no candidates since: raised again
            assert p.threshold_ms == 1000
        finally:
            p.close()
            mm.close()


def test_migrate_misplaced_folio_prepare_wakes_kswapd_which_demotes():
    """migrate_balanced_pgdat fails at free <= high + nr: no promotion, kswapd woken; with demotion enabled,
    balance_pgdat demotes the coldest top-tier pages (demote_folio_list: ASYNC, MR_DEMOTION, counted
    pgdemote_kswapd) until free is above the promotion watermark; then the next fault promotes."""
    with Machine(host_nodes=[(512, 1.0), (1024, 2.5)], devices=0, device_pages=1, backend="cpu") as m:
        mm = m.address_space()
        w = kernel_watermarks(m, 0)
        full = 512 - w.high - 1  # leaves exactly high + 1 free: unbalanced for one more folio
        hot = mm.mmap(full * m.page_size)
        mm.populate(hot, full * m.page_size, node=0)
        addr = mm.mmap(256 * m.page_size)
        mm.populate(addr, 256 * m.page_size, node=1)
        for tpp in (False, True):
            p = HintFaultPaths(mm, addr, 256, NumaSettings(demotion=tpp))
            try:
                p.scan(0.0)
                p.access(3, 5.0)
                assert mm.node_of(addr + 3 * m.page_size) == 1 and p.stats["kswapd_wakeups"] == 1
                if not tpp:
                    assert p.stats["demoted"] == 0  # nothing to reclaim without demotion (no swap)
                    continue
                # The region's own top-tier pages are the only ones kswapd knows of here: none yet.
                assert p.stats["demoted"] == 0
            finally:
                p.close()
        # Move some region pages to the top tier (cold: never accessed) and fault again: kswapd demotes them.
        mm.munmap(hot, 64 * m.page_size)
        mm.migrate(addr + 128 * m.page_size, 64 * m.page_size, 0)
        assert m.nodes[0].free_pages <= w.high + 1
        p = HintFaultPaths(mm, addr, 256, NumaSettings(demotion=True))
        try:
            before = m.vmstat
            p.scan(0.0)
            p.access(3, 5.0)
            assert p.stats["demoted"] >= 32 and m.nodes[0].free_pages > w.promo
            assert m.vmstat["pgdemote_kswapd"] - before["pgdemote_kswapd"] == p.stats["demoted"]
            assert m.migrate_events[-1].reason == MigrateReason.MR_DEMOTION
            p.access(4, 6.0)
            assert mm.node_of(addr + 4 * m.page_size) == 0  # balanced again: the next fault promotes
        finally:
            p.close()
        mm.close()


def test_replay_runs_the_kernel_paths_and_records_the_events():
    """numa-balancing and tpp replay through hint faults and reclaim: one event per promoted folio
    (MR_NUMA_MISPLACED, ASYNC), kswapd's demotions as MR_DEMOTION; the per-reason totals and vmstat agree
    with the replay's promoted and demoted counts."""
    t = make_workload("zipf", pages=512, epochs=6, per_epoch=256, seed=3)
    r = replay(t, make_policy("tpp"), "copy", first_touch_fill=0.9)
    s = r.summary
    assert s["verified"] and r.config["paths"] == "hint-faults" and r.config["numa_settings"]["demotion"]
    assert s["promoted"] > 0 and s["demoted"] > 0
    assert s["vmstat"]["numa_hint_faults"] == s["hint_faults"] > 0
    assert s["vmstat"]["pgpromote_success"] == s["promoted"] == s["events_by_reason"]["MR_NUMA_MISPLACED"]["succeeded"]
    assert s["vmstat"]["pgdemote_kswapd"] == s["demoted"] == s["events_by_reason"]["MR_DEMOTION"]["succeeded"]
    promo = [e for e in r.events if e["reason"] == "MR_NUMA_MISPLACED"]
    assert promo and all(e["mode"] == "ASYNC" and e["succeeded"] + e["failed"] == 1 for e in promo)
    assert all(e["mode"] == "ASYNC" for e in r.events if e["reason"] == "MR_DEMOTION")
    assert "events" in r.to_dict() and not s["events_dropped"]
    # The experiment: the epoch decisions in move_pages SYNC batches (MR_SYSCALL), as the replay did before.
    old = replay(t, make_policy("tpp", path="move_pages"), "copy", record_events=False)
    assert set(old.summary["events_by_reason"]) == {"MR_SYSCALL"} and "events" not in old.to_dict()
    assert old.summary["vmstat"]["numa_hint_faults"] == 0
