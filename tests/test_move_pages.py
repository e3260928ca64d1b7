"""AddressSpace.move_pages, modelled on move_pages(2): ``do_pages_stat`` (nodes=None) and ``do_pages_move``."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from support import WAIT, filled

from dmamig import InvalidArgument, MigrateMode, MigrateVma
from dmamig.check import state_digest

HOST = 512
DEV = 512
ENOENT, EFAULT, EACCES = -errno.ENOENT, -errno.EFAULT, -errno.EACCES
EAGAIN, EBUSY, ENOMEM = -errno.EAGAIN, -errno.EBUSY, -errno.ENOMEM


def test_query_reports_each_pages_node_or_why_not(m, mm):
    """do_pages_stat_array: the node, -ENOENT when not populated, -EFAULT for the zero page or no mapping."""
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.write(addr, b"a")
    mm.populate(addr + ps, ps, node=2)
    mm.read(addr + 2 * ps, 1)  # the zero page
    hole = addr + 64 * ps
    res = mm.move_pages([addr, addr + ps + 5, addr + 2 * ps, addr + 3 * ps, hole])
    assert res.status.tolist() == [0, 2, EFAULT, ENOENT, EFAULT]
    assert res.results == [] and res.nr_failed == 0 and res.rc == 0


def test_pages_move_to_their_own_nodes(m, mm):
    """do_pages_move: each address to its node; the core runs once per group (the node changes, or a page
    was not queued: page 3 is on node 0 already)."""
    ps = m.page_size
    addr, data = filled(m, mm, 6)
    targets = [1, 2, 1, 0, 2, 1]
    res = mm.move_pages([addr + i * ps + i for i in range(6)], targets)
    assert res.status.tolist() == targets and res.rc == 0
    assert mm.nodes_of(addr, 6 * ps).tolist() == targets
    assert [node for node, _ in res.results] == [1, 2, 1, 2, 1]
    assert res.nr_succeeded == 5 and res.nr_failed == 0
    assert np.array_equal(mm.read(addr, 6 * ps), data)


def test_no_copy_with_the_dma_engine(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    res = mm.move_pages([addr + i * ps for i in range(8)], [1] * 8, engine=m.dma)
    assert res.status.tolist() == [1] * 8 and res.results[0][1].stats.nr_no_copy == 8
    assert np.array_equal(mm.read(addr, 8 * ps), data)


def test_shared_page_needs_move_all(m, mm):
    """add_folio_for_migration: -EACCES for a page another process maps, unless MPOL_MF_MOVE_ALL."""
    ps = m.page_size
    addr, _ = filled(m, mm, 2)
    child = mm.fork()
    child.write(addr + ps, b"c")
    res = mm.move_pages([addr, addr + ps], [1, 1])
    assert res.status.tolist() == [EACCES, 1]
    res = mm.move_pages([addr, addr + ps], [2, 2], move_all=True)
    assert res.status.tolist() == [2, 2] and child.node_of(addr) == 2


def test_unmapped_untouched_and_zero_pages_are_skipped(m, mm):
    ps = m.page_size
    addr = mm.mmap(3 * ps)
    mm.write(addr, b"x")
    mm.read(addr + ps, 1)
    res = mm.move_pages([addr, addr + ps, addr + 2 * ps, addr + 50 * ps], [1, 1, 1, 1])
    assert res.status.tolist() == [1, EFAULT, ENOENT, EFAULT]
    assert res.nr_succeeded == 1 and res.nr_failed == 0


def test_migration_failures_are_reported_per_page(m, mm):
    """Pinned -> -EAGAIN, writeback in ASYNC -> -EBUSY, target full -> -ENOMEM; the others still move."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.pin(addr, ps)
    m.page_controls.start_writeback(mm.pfn_of(addr + ps))
    res = mm.move_pages([addr, addr + ps, addr + 2 * ps], [1, 1, 1], mode=MigrateMode.ASYNC)
    assert res.status.tolist() == [EAGAIN, EBUSY, 1]
    assert res.nr_failed == 2
    held = m.alloc_pages(2, DEV)
    res = mm.move_pages([addr + 3 * ps], [2])
    assert res.status.tolist() == [ENOMEM]
    m.put_pages(held)
    m.page_controls.end_writeback(mm.pfn_of(addr + ps))
    mm.unpin(addr, ps)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_an_address_named_twice_reports_each_of_its_groups(m, mm):
    """do_pages_move: two addresses of one page with different targets are two groups, migrated in turn; each
    reports its own group's node, and the later node is where the page ends."""
    addr, _ = filled(m, mm, 1)
    res = mm.move_pages([addr, addr + 9], [1, 2])
    assert res.status.tolist() == [1, 2] and mm.node_of(addr) == 2


def test_move_pages_waits_for_nothing_when_idle_and_leaves_state_alone_on_a_query(m, mm):
    ps = m.page_size
    addr, _ = filled(m, mm, 2)
    before = state_digest(m)
    mm.move_pages(np.array([addr, addr + ps], dtype=np.uint64))
    assert state_digest(m) == before


@pytest.mark.parametrize("addrs, nodes, kw, match", [
    ([], None, {}, "non-empty"),
    ([[0]], None, {}, "1-D"),
    ([1.5], None, {}, "integers"),
    ([True], None, {}, "integers"),
    ([-4096], None, {}, ">= 0"),
    ("ADDR", [1, 1], {}, "one target node per address"),
    ("ADDR", [1.0], {}, "integers"),
    ("ADDR", [3], {}, "nodes are 0..2"),
    ("ADDR", [-1], {}, "not a node"),
    ("ADDR", [1], {"mode": "SYNC"}, "MigrateMode"),
    ("ADDR", [1], {"mode": MigrateMode.SYNC | MigrateMode.NO_COPY}, "NO_COPY"),
    ("ADDR", [1], {"engine": object()}, "engine"),
], ids=["empty", "2d", "float", "bool", "negative", "nodes-length", "nodes-float", "node-too-big",
        "node-negative", "mode-str", "mode-no-copy", "engine"])
def test_bad_arguments_say_what_was_wrong_and_change_nothing(m, mm, addrs, nodes, kw, match):
    addr, _ = filled(m, mm, 1)
    addrs = [addr] if addrs == "ADDR" else addrs
    before = state_digest(m)
    with pytest.raises(InvalidArgument, match=match):
        mm.move_pages(addrs, nodes, **kw)
    assert state_digest(m) == before


def test_closed_address_space_is_refused(m, mm):
    mm.close()
    with pytest.raises(InvalidArgument, match="closed"):
        mm.move_pages([0])


# -- do_pages_move, exactly ------------------------------------------------------------------------------------
def test_do_pages_move_flushes_the_group_when_the_node_changes(m, mm):
    """do_pages_move: ``[B->1, A->2, A->1]`` is three groups, migrated in order: A ends on node 1."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    a, b = addr, addr + ps
    res = mm.move_pages([b, a, a], [1, 2, 1])
    assert res.status.tolist() == [1, 2, 1] and res.rc == 0
    assert mm.node_of(a) == 1 and mm.node_of(b) == 1
    assert [node for node, _ in res.results] == [1, 2, 1]
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_do_pages_move_flushes_the_group_after_a_page_that_was_not_queued(m, mm):
    """do_pages_move: a page add_folio_for_migration does not queue (the zero page, a page on its node
    already) gets its status and the pages queued before it are migrated at once."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    zero = mm.mmap(ps)
    mm.read(zero, 1)
    mm.move_pages([addr + 2 * ps], [1])  # on node 1 already when the call below reaches it
    res = mm.move_pages([addr, zero, addr + ps, addr + 2 * ps, addr + 3 * ps], [1] * 5)
    assert res.status.tolist() == [1, EFAULT, 1, 1, 1] and res.rc == 0
    assert [r.nr_succeeded for _, r in res.results] == [1, 1, 1]
    assert mm.nodes_of(addr, 4 * ps).tolist() == [1] * 4


def test_add_folio_for_migration_a_folio_named_twice_in_a_group_is_busy(m, mm):
    """add_folio_for_migration: the second address of a folio already queued fails to isolate it (-EBUSY),
    which ends the group; the first address's page moves."""
    ps = m.page_size
    addr, _ = filled(m, mm, 2)
    res = mm.move_pages([addr, addr + 9, addr + ps], [1, 1, 1])
    assert res.status.tolist() == [1, EBUSY, 1] and res.rc == 0
    assert len(res.results) == 2 and mm.nodes_of(addr, 2 * ps).tolist() == [1, 1]


def test_do_pages_move_stops_at_a_group_that_failed(m, mm):
    """move_pages_and_store_status: a group that leaves folios unmigrated stops the call; the return value is
    those folios plus every address after the group, untried (they stay where they are)."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.pin(addr + ps, ps)
    res = mm.move_pages([addr + i * ps for i in range(4)], [1, 1, 2, 2], mode=MigrateMode.ASYNC)
    assert res.rc == 1 + 2
    assert res.status.tolist() == [1, EAGAIN, 0, 0]
    assert mm.nodes_of(addr, 4 * ps).tolist() == [1, 0, 0, 0]
    assert len(res.results) == 1 and res.nr_failed == 1
    mm.unpin(addr + ps, ps)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_do_pages_move_counts_the_untried_after_a_page_not_queued(m, mm):
    """do_pages_move: when the group flushed after a page that was not queued fails, that page is accounted
    for (``err--``): the return value counts only the addresses after it."""
    ps = m.page_size
    addr, _ = filled(m, mm, 3)
    mm.pin(addr, ps)
    res = mm.move_pages([addr, addr + 9, addr + ps, addr + 2 * ps], [1] * 4, mode=MigrateMode.ASYNC)
    assert res.status.tolist() == [EAGAIN, EBUSY, 0, 0] and res.rc == 1 + 2
    mm.unpin(addr, ps)


def test_do_pages_move_returns_enomem_and_stops(m, mm):
    """do_move_pages_to_node: -ENOMEM from migrate_pages() is the call's return value; nothing after runs."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    held = m.alloc_pages(2, DEV)
    res = mm.move_pages([addr, addr + ps], [2, 1])
    assert res.rc == ENOMEM and res.status.tolist() == [ENOMEM, 0]
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 0]
    m.put_pages(held)
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_a_page_under_migration_is_enoent_at_once(m, mm):
    """add_folio_for_migration and do_pages_stat_array: the page walk finds no page behind a migration entry
    and reports -ENOENT; neither waits for the migration to end."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + ps, 1)
    mv.setup()  # the page is unmapped behind a migration entry until finalize()
    out: list = []
    t = threading.Thread(target=lambda: out.extend([mm.move_pages([addr, addr + ps]),
                                                    mm.move_pages([addr, addr + ps], [2, 2])]), daemon=True)
    t.start()
    t.join(WAIT)
    assert not t.is_alive(), "move_pages waited for a migration in flight"
    query, move = out
    assert query.status.tolist() == [ENOENT, 0]
    assert move.status.tolist() == [ENOENT, 2] and move.rc == 0
    mv.alloc_and_copy(engine=m.dma)
    mv.pages()
    mv.finalize()
    assert mm.nodes_of(addr, 2 * ps).tolist() == [1, 2]
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_add_folio_for_migration_a_repeat_far_down_a_group_is_busy(m, mm):
    """add_folio_for_migration: however long the group has grown, a folio it queued already fails to isolate
    (-EBUSY) when named again; the group (70 pages) migrates and the call goes on after it."""
    ps = m.page_size
    addr, data = filled(m, mm, 80)
    addrs = [addr + i * ps for i in range(70)] + [addr + 5 * ps] + [addr + i * ps for i in range(70, 80)]
    res = mm.move_pages(addrs, [1] * len(addrs))
    assert res.status.tolist() == [1] * 70 + [EBUSY] + [1] * 10 and res.rc == 0
    assert [r.nr_succeeded for _, r in res.results] == [70, 10]
    assert (mm.nodes_of(addr, 80 * ps) == 1).all() and np.array_equal(mm.read(addr, 80 * ps), data)
