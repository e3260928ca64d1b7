"""Migration reasons (the kernel's ``enum migrate_reason``): the rules a reason decides in ``migrate_pages_batch``,
the vmstat counters that follow it, and the ``mm_migrate_pages`` event each ``migrate_pages()`` call records."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from support import delta, rand

from dmamig import InvalidArgument, Machine, MigrateMode, MigrateReason

EAGAIN, ENOMEM = -errno.EAGAIN, -errno.ENOMEM
HOST = DEV = 4096
NR = 512  # base pages of an order-9 folio


def thp(mm, folios: int, seed: int = 0) -> tuple[int, np.ndarray]:
    n = folios * NR * mm.machine.page_size
    addr = mm.mmap(n, order=9)
    data = rand(n, seed)
    mm.write(addr, data)
    return addr, data


def fragment(m, node: int) -> np.ndarray:
    """Leave one used frame in every pageblock of ``node``: no order-9 block is free, base frames are."""
    nd = m.nodes[node]
    got = m.alloc_pages(node, nd.free_pages)
    held = got[(got - nd.base_pfn) % NR == 7]
    m.put_pages(got[(got - nd.base_pfn) % NR != 7])
    return held


def test_migrate_pages_batch_nosplit_for_mr_numa_misplaced(m, mm):
    """'Large folio NUMA faulting doesn't split to retry': with no destination block, NUMA balancing's large
    folio fails with -ENOMEM and stays whole, where any other reason splits it and moves the pieces."""
    ps = m.page_size
    addr, data = thp(mm, 1, seed=1)
    held = fragment(m, 1)
    res = m.migrate_misplaced_folio(mm.pfn_of(addr), 1)
    assert res.nr_thp_split == 0 and res.nr_succeeded == 0 and res.rc == ENOMEM
    assert (res.status == ENOMEM).all() and m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9
    assert m.vmstat["numa_pages_migrated"] == 0
    res = m.migrate_pages(np.array([mm.pfn_of(addr)]), 1)  # MR_SYSCALL: split, pieces moved
    assert res.nr_thp_split == 1 and res.nr_succeeded == NR
    assert np.array_equal(mm.read(addr, NR * ps), data)
    m.put_pages(held)


def test_migrate_pages_batch_mr_longterm_pin_retries_a_folio_whose_split_failed(m, mm):
    """try_split_folio() -EAGAIN under MR_LONGTERM_PIN: the folio is retried on the next pass instead of failing
    with -ENOMEM, so the call does not stop there and the folios after it still migrate."""
    ps = m.page_size
    addr, data = thp(mm, 2, seed=2)
    heads = np.array([mm.pfn_of(addr), mm.pfn_of(addr + NR * ps)])
    m.page_controls.get_page(int(heads[0]))  # an extra reference: the first folio cannot be split
    held = fragment(m, 1)
    try:
        res = m.migrate_pages(heads, 1, mode=MigrateMode.ASYNC)  # MR_SYSCALL
        assert res.rc == ENOMEM and res.nr_succeeded == 0  # the first folio's -ENOMEM ended the call
        assert (res.status == ENOMEM).all()
        res = m.migrate_pages(heads, 1, mode=MigrateMode.ASYNC, reason=MigrateReason.MR_LONGTERM_PIN)
        assert res.status.tolist() == [EAGAIN, 0]  # retried each pass, then -EAGAIN; the second one split, moved
        # rc counts the folio that failed and the one that split (its nr_failed++ stays: 03e5f82ea632 clears
        # it only when nothing is left on the list).
        assert res.nr_thp_split == 1 and res.nr_succeeded == NR and res.rc == 2
        assert m.migrate_events[-1].reason == MigrateReason.MR_LONGTERM_PIN
    finally:
        m.page_controls.put_page(int(heads[0]))
    assert np.array_equal(mm.read(addr, 2 * NR * ps), data)
    m.put_pages(held)


def test_mm_migrate_pages_event_per_call_with_the_tracepoint_fields(m, mm):
    """trace_mm_migrate_pages(): one record per migrate_pages() call (succeeded, failed, thp_succeeded,
    thp_failed, thp_split, large_folio_split, mode, reason); a fault bringing device pages back is not one."""
    ps = m.page_size
    addr, _ = thp(mm, 1, seed=3)
    base = mm.mmap(8 * ps)
    mm.populate(base, 8 * ps)
    before = len(m.migrate_events)
    mm.migrate(addr, NR * ps, 1)
    mm.migrate(base, 8 * ps, 2, mode=MigrateMode.ASYNC, reason=MigrateReason.MR_DEMOTION)
    events = m.migrate_events[before:]
    assert len(events) == 2
    assert events[0].as_dict() == {"succeeded": NR, "failed": 0, "thp_succeeded": 1, "thp_failed": 0,
                                   "thp_split": 0, "large_folio_split": 0, "mode": "SYNC", "reason": "MR_SYSCALL"}
    assert (events[1].succeeded, events[1].mode, events[1].reason) == (8, MigrateMode.ASYNC,
                                                                        MigrateReason.MR_DEMOTION)
    mm.read(base, 8 * ps)  # a CPU access faults the device pages back: migrate_to_ram, not migrate_pages()
    assert len(m.migrate_events) == before + 2
    res = mm.move_pages([base, addr], [0, 0])  # two groups? one node: one group, one call
    assert res.rc == 0 and len(m.migrate_events) == before + 3
    # A record is the same object at every read (a reader finds where it left off by identity).
    last = m.migrate_events[-1]
    mm.migrate(addr, NR * ps, 1)
    seen = m.migrate_events
    assert seen[-2] is last and seen[-1] is not last and seen[-1] is m.migrate_events[-1]


def test_reasons_feed_their_own_counters(mm):
    m = mm.machine
    ps = m.page_size
    base = mm.mmap(16 * ps)
    mm.populate(base, 16 * ps, node=1)
    before = m.vmstat
    for i in range(4):  # NUMA balancing brings device pages into the top tier: promotions
        assert m.migrate_misplaced_folio(mm.pfn_of(base + i * ps), 0).nr_succeeded == 1
    mm.migrate(base + 8 * ps, 4 * ps, 2, reason=MigrateReason.MR_DEMOTION)
    d = delta(m, before)
    assert d["numa_pages_migrated"] == 4 and d["pgpromote_success"] == 4 and d["pgdemote_direct"] == 4
    assert d["pgmigrate_success"] == 8


def test_pgpromote_counts_only_moves_into_the_top_tier():
    with Machine(host_nodes=[(1024, 1.0), (1024, 3.0)], device_pages=1024, backend="cpu") as m:
        mm = m.address_space()
        ps = m.page_size
        a = mm.mmap(4 * ps)
        mm.populate(a, 4 * ps, node=1)  # the slow host tier
        assert m.migrate_misplaced_folio(mm.pfn_of(a), 0).nr_succeeded == 1  # slow tier -> top tier
        assert m.migrate_misplaced_folio(mm.pfn_of(a + ps), 2).nr_succeeded == 1  # slow tier -> a device
        v = m.vmstat
        assert v["numa_pages_migrated"] == 2 and v["pgpromote_success"] == 1


def test_pgpromote_counts_every_page_one_call_brings_into_the_top_tier_from_several_nodes():
    """A NUMA-balancing call over pages of the slow tier, a device and the top tier itself: the pages that move
    come from both lower nodes and all count; the page already in the top tier neither moves nor counts."""
    with Machine(host_nodes=[(1024, 1.0), (1024, 3.0)], device_pages=1024, backend="cpu") as m:
        mm = m.address_space()
        ps = m.page_size
        a = mm.mmap(6 * ps)
        mm.populate(a, 2 * ps, node=1)
        mm.populate(a + 2 * ps, 3 * ps, node=2)
        mm.populate(a + 5 * ps, ps, node=0)
        pfns = [mm.pfn_of(a + i * ps) for i in range(6)]
        res = m.migrate_pages(pfns, 0, MigrateMode.ASYNC, reason=MigrateReason.MR_NUMA_MISPLACED)
        assert res.ok and res.nr_succeeded == 5
        assert mm.nodes_of(a, 6 * ps).tolist() == [0] * 6
        v = m.vmstat
        assert v["numa_pages_migrated"] == 5 and v["pgpromote_success"] == 5


@pytest.mark.parametrize("bad", ["MR_SYSCALL", 42, None, 3.5])
def test_a_bad_reason_is_refused_naming_the_argument(m, mm, bad):
    a = mm.mmap(m.page_size)
    mm.populate(a, m.page_size)
    with pytest.raises(InvalidArgument, match="reason must be a MigrateReason"):
        mm.migrate(a, m.page_size, 1, reason=bad)
    with pytest.raises(InvalidArgument, match="reason must be a MigrateReason"):
        m.migrate_pages(np.array([mm.pfn_of(a)]), 1, reason=bad)


def test_migrate_misplaced_folio_moves_one_folio(m, mm):
    a = mm.mmap(2 * m.page_size)
    mm.populate(a, 2 * m.page_size)
    with pytest.raises(InvalidArgument, match="one folio"):
        m.migrate_misplaced_folio([mm.pfn_of(a), mm.pfn_of(a + m.page_size)], 1)


def test_a_device_driver_migration_is_no_mm_migrate_pages_event():
    """UVM's fault service and eviction migrate through the driver, not migrate_pages(): no event is recorded."""
    from dmamig import DeviceAccessor

    with Machine(host_pages=2048, device_pages=2048, backend="cpu") as m:
        mm = m.address_space()
        a = mm.mmap(64 * m.page_size)
        mm.populate(a, 64 * m.page_size)
        before = len(m.migrate_events)
        with DeviceAccessor(mm, 1) as dev:
            dev.read(a, 64 * m.page_size)
        assert m.vmstat["pgmigrate_success"] > 0 and len(m.migrate_events) == before
