"""Tiered host memory: several host nodes with access costs, CPU access in place, migration stalls counted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dmamig import InvalidArgument, Machine


def tiered(**kw) -> Machine:
    kw.setdefault("host_nodes", [(64, 1.0), (128, 2.5)])
    kw.setdefault("device_pages", 32)
    return Machine(backend="cpu", **kw)


def test_host_nodes_come_first_then_devices():
    with tiered() as m:
        assert [(n.id, n.kind, n.device, n.total_pages) for n in m.nodes] == [
            (0, "host", -1, 64), (1, "host", -1, 128), (2, "device", 0, 32)]
        assert m.access_cost == (1.0, 2.5, 1.0)
        assert m.host_node_ids == (0, 1)
        assert m.device_node_mask.tolist() == [False, False, True]


def test_default_machine_keeps_one_host_node():
    with Machine(host_pages=16, device_pages=16, backend="cpu") as m:
        assert [n.kind for n in m.nodes] == ["host", "device"]
        assert m.access_cost == (1.0, 1.0)


@pytest.mark.parametrize("bad", [[], [0], [(8, 0.0)], [(8, "x")], "8"])
def test_bad_host_nodes_are_refused(bad):
    with pytest.raises(InvalidArgument, match="host_nodes"):
        Machine(host_nodes=bad, backend="cpu")


def test_slow_tier_pages_are_accessed_in_place_and_device_pages_come_back():
    with tiered() as m:
        mm = m.address_space()
        n = 8 * m.page_size
        a = mm.mmap(n)
        data = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
        mm.write(a, data)
        assert mm.migrate(a, n, 1, engine=m.dma).nr_succeeded == 8
        assert (mm.read(a, n) == data).all()
        assert (mm.nodes_of(a, n) == 1).all()  # a CXL page stays where it is when the CPU reads it
        mm.migrate(a, m.page_size, 2)
        assert (mm.read(a, n) == data).all()
        assert mm.node_of(a) == 0  # a device page comes back to node 0
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [64, 128, 32]


def test_migration_stalls_are_counted():
    from dmamig import MigrateVma

    with tiered(host_nodes=[(2048, 1.0), (2048, 2.0)]) as m:
        mm = m.address_space()
        n = 1024 * m.page_size
        a = mm.mmap(n)
        mm.write(a, b"\1" * n)
        assert mm.migration_stalls == (0, 0)
        # A migration held in flight (pages behind migration entries) makes the reader wait: no race to win.
        t = threading.Thread(target=mm.read, args=(a, n))
        with MigrateVma(mm, a, a + n, 1) as mv:  # leaving the block early aborts: the reader is never stuck
            mv.setup()
            t.start()
            deadline = time.monotonic() + 10
            while mm.migration_stalls[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert mm.migration_stalls[0] == 1  # counted when the wait starts
            mv.alloc_and_copy()
            mv.pages()
            mv.finalize()
        t.join(10)
        assert not t.is_alive()
        count, ns = mm.migration_stalls
        assert count >= 1 and ns > 0


# -- pages on a slow host tier migrate like any others ---------------------------------------------------------

@pytest.mark.parametrize("device_memory", ["coherent", "private"])
@pytest.mark.parametrize("order", [0, 9])
@pytest.mark.parametrize("nocopy", [False, True], ids=["copy", "no-copy"])
def test_pages_move_between_two_host_tiers_in_both_modes(nocopy, order, device_memory):
    from dmamig import MigrateMode

    with tiered(host_nodes=[(2048, 1.0), (2048, 2.5)], device_pages=2048, device_memory=device_memory) as m:
        mm = m.address_space()
        n = 1024 * m.page_size
        a = mm.mmap(n, order=order)
        data = np.random.default_rng(order).integers(0, 256, n, dtype=np.uint8)
        mm.write(a, data)
        engine = m.dma if nocopy else None
        # fast -> slow -> fast, through the device and back to the slow tier, in every mode
        for node, mode in ((1, MigrateMode.SYNC), (0, MigrateMode.ASYNC), (1, MigrateMode.SYNC_LIGHT),
                           (2, MigrateMode.SYNC), (1, MigrateMode.SYNC), (0, MigrateMode.SYNC)):
            res = mm.migrate(a, n, node, mode=mode, engine=engine)
            assert (res.nr_succeeded, res.nr_failed) == (1024, 0), (node, mode)
            assert (mm.nodes_of(a, n) == node).all() and (mm.read(a, n) == data).all()
        # move_pages to the slow tier, one address per base page (per folio: another page of a folio already
        # queued would be -EBUSY), one status per address
        some = np.arange(0, 1024, 512 if order else 2) * m.page_size + a
        res = mm.move_pages(some, np.ones(some.size, dtype=np.int64))
        assert (np.asarray(res.status) == 1).all()
        assert (mm.read(a, n) == data).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048, 2048]


@pytest.mark.parametrize("nocopy", [False, True], ids=["copy", "no-copy"])
def test_slow_tier_frames_migrate_with_migrate_pages(nocopy):
    from dmamig import MigrateMode

    with tiered() as m:
        mm = m.address_space()
        n = 16 * m.page_size
        a = mm.mmap(n)
        data = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8)
        mm.populate(a, n, node=1)
        mm.write(a, data)
        pfns = np.array([mm.pfn_of(a + i * m.page_size) for i in range(16)])
        if nocopy:  # a driver's flow: destinations allocated and copied by the DMA engine, state moved only
            dst = m.alloc_pages(0, 16)
            m.dma.copy(pfns, dst).wait()
            res = m.migrate_pages(pfns, 0, mode=MigrateMode.SYNC | MigrateMode.NO_COPY, dst_pfns=dst)
        else:
            res = m.migrate_pages(pfns, 0, mode=MigrateMode.SYNC)
        assert res.nr_failed == 0 and (mm.nodes_of(a, n) == 0).all()
        assert (mm.read(a, n) == data).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [64, 128, 32]
