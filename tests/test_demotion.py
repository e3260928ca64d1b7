"""Demotion from reclaim (``MR_DEMOTION``), as mm/vmscan.c's ``demote_folio_list`` and ``alloc_demote_folio``
have it: ASYNC, the next tier down first, then the other lower tiers, never a higher one, no direct reclaim;
``pgdemote_kswapd`` or ``pgdemote_direct`` after the reclaimer (``reclaimer_offset``)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from support import delta, rand

from dmamig import InvalidArgument, Machine, MigrateMode, MigrateReason

EAGAIN, ENOMEM = -errno.EAGAIN, -errno.ENOMEM


@pytest.fixture
def tiers():
    """Three host tiers (DRAM, CXL, slower CXL) and no device."""
    with Machine(host_nodes=[(256, 1.0), (64, 2.0), (256, 3.0)], device_pages=1, devices=0, backend="cpu") as m:
        yield m


def region(m, node: int, n: int, seed: int = 0):
    mm = m.address_space()
    addr = mm.mmap(n * m.page_size)
    mm.populate(addr, n * m.page_size, node=node)
    data = rand(n * m.page_size, seed)
    mm.write(addr, data)
    pfns = np.array([mm.pfn_of(addr + i * m.page_size) for i in range(n)])
    return mm, addr, data, pfns


def test_alloc_demote_folio_takes_the_target_first_then_lower_tiers(tiers):
    """alloc_demote_folio: __GFP_THISNODE on the target (node 1) first; once it is full, the allowed mask of
    lower tiers (node 2); the call is one ASYNC MR_DEMOTION migrate_pages()."""
    m = tiers
    mm, addr, data, pfns = region(m, 0, 96, seed=1)
    before = m.vmstat
    res = m.demote_folios(pfns)
    assert res.nr_succeeded == 96 and (res.status == 0).all()
    nodes = mm.nodes_of(addr, 96 * m.page_size)
    assert (nodes == 1).sum() == 64 and (nodes == 2).sum() == 32  # the target filled first, then the tier below
    assert np.array_equal(mm.read(addr, 96 * m.page_size), data)
    ev = m.migrate_events[-1]
    assert (ev.reason, ev.mode, ev.succeeded) == (MigrateReason.MR_DEMOTION, MigrateMode.ASYNC, 96)
    d = delta(m, before)
    assert d["pgdemote_direct"] == 96 and "pgdemote_kswapd" not in d and d["pgmigrate_success"] == 96
    mm.close()


def test_alloc_demote_folio_never_falls_back_to_a_higher_tier(tiers):
    """The allowed mask holds only the tiers below the source: demoting node 1's folios with node 2 full fails
    them with -ENOMEM, though node 0 has room (and no reclaim runs to make any)."""
    m = tiers
    hold = m.alloc_pages(2, m.nodes[2].free_pages)
    mm, addr, data, pfns = region(m, 1, 8, seed=2)
    res = m.demote_folios(pfns)
    assert res.nr_succeeded == 0 and res.status[0] == ENOMEM
    assert (mm.nodes_of(addr, 8 * m.page_size) == 1).all()
    # A syscall migration names its node and takes no fallback: the reason decides, not the caller's node.
    full = region(m, 0, 70, seed=3)
    res = m.migrate_pages(full[3], 1, reason=MigrateReason.MR_SYSCALL)
    assert res.nr_succeeded == 56  # node 1's free frames, then -ENOMEM ends the call
    m.put_pages(hold)
    assert np.array_equal(mm.read(addr, 8 * m.page_size), data)
    mm.close()
    full[0].close()


def test_demote_folio_list_migrates_async(tiers):
    """demote_folio_list() calls migrate_pages(..., MIGRATE_ASYNC, MR_DEMOTION): a locked folio is -EAGAIN at
    once instead of a wait; the others move."""
    m = tiers
    mm, addr, data, pfns = region(m, 0, 4, seed=4)
    assert m.page_controls.lock_page(int(pfns[1]))
    try:
        res = m.demote_folios(pfns)
    finally:
        m.page_controls.unlock_page(int(pfns[1]))
    assert res.status.tolist() == [0, EAGAIN, 0, 0]
    assert np.array_equal(mm.read(addr, 4 * m.page_size), data)
    mm.close()


def test_demote_folio_list_counts_pgdemote_kswapd_for_kswapd(tiers):
    """reclaimer_offset(): kswapd's demotions count pgdemote_kswapd, direct reclaim's pgdemote_direct."""
    m = tiers
    mm, addr, _, pfns = region(m, 0, 8, seed=5)
    before = m.vmstat
    assert m.demote_folios(pfns[:5], kswapd=True).nr_succeeded == 5
    assert m.demote_folios(pfns[5:]).nr_succeeded == 3
    d = delta(m, before)
    assert d["pgdemote_kswapd"] == 5 and d["pgdemote_direct"] == 3
    mm.close()


def test_demotion_needs_one_node_with_a_tier_below(tiers):
    m = tiers
    mm, addr, _, pfns = region(m, 2, 2)
    with pytest.raises(InvalidArgument, match="no demotion target"):
        m.demote_folios(pfns)
    mm2, _, _, low = region(m, 0, 2)
    with pytest.raises(InvalidArgument, match="one node"):
        m.demote_folios(np.concatenate([pfns, low]))
    mm.close()
    mm2.close()


def test_mr_demotion_through_migrate_pages_takes_the_fallback_too(tiers):
    """Any migrate_pages() with MR_DEMOTION allocates as alloc_demote_folio does."""
    m = tiers
    mm, addr, _, pfns = region(m, 0, 80, seed=6)
    res = m.migrate_pages(pfns, 1, mode=MigrateMode.ASYNC, reason=MigrateReason.MR_DEMOTION)
    assert res.nr_succeeded == 80
    nodes = mm.nodes_of(addr, 80 * m.page_size)
    assert (nodes == 1).sum() == 64 and (nodes == 2).sum() == 16
    mm.close()


def test_api_md_reasons_snippet_runs(capsys):
    """docs/api.md's reasons and event stream example runs as written."""
    from pathlib import Path

    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    snippet = api.split("### Migration reasons and the event stream", 1)[1].split("```python\n", 1)[1]
    exec(compile(snippet.split("```", 1)[0], "docs/api.md reasons", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out == ["MR_NUMA_MISPLACED ASYNC 1 0 0", "MR_MEMPOLICY_MBIND SYNC 7 0 0", "MR_DEMOTION ASYNC 7 0 0"]
