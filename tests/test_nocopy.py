"""No-copy migration: the DMA engine copies, the core moves state only; NO_COPY onto caller-copied pages."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from support import delta, filled, finish_within, rand

pytest.importorskip("dmamig.dma")

import dmamig.migrate.batch_loops as batch_loops  # noqa: E402
import dmamig.migrate.core as core  # noqa: E402
from dmamig import InvalidArgument, Machine, MigrateMode, PageFlag  # noqa: E402
from dmamig.migrate.options import NR_MAX_BATCHED_MIGRATION  # noqa: E402

EAGAIN, EIO, ENOENT = -errno.EAGAIN, -errno.EIO, -errno.ENOENT
HOST = DEV = 4096
NR = 512
ALL_MODES = [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]
# Modes that remap a busy folio and unmap it again (migrate_pages_sync's per-folio retry); in ASYNC a folio with
# an extra reference stays unmapped through every move pass, so nothing can write it in between.
SYNC_MODES = [MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]
SYNC_NO_COPY = MigrateMode.SYNC | MigrateMode.NO_COPY


def pfns_of(mm, addr: int, npages: int) -> np.ndarray:
    ps = mm.machine.page_size
    return np.array([mm.pfn_of(addr + i * ps) for i in range(npages)], dtype=np.int64)


# -- engine-driven no-copy migration ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_no_copy_migration_moves_data_through_the_engine(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 64)
    m.dma.reset_stats()
    before = m.vmstat
    res = mm.migrate(addr, 64 * ps, 1, mode=mode, engine=m.dma)
    assert res.ok and res.nr_succeeded == 64 and res.stats.nr_no_copy == 64
    assert delta(m, before) == {"pgmigrate_success": 64, "pgmigrate_no_copy": 64, "migrate_tlb_flush": 1}
    stats = m.dma.stats
    assert stats.submissions >= 1 and stats.pages == 64 and stats.errors == 0
    assert (mm.nodes_of(addr, 64 * ps) == 1).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 64, DEV]
    assert np.array_equal(mm.read(addr, 64 * ps), data)


def test_copy_migration_counts_no_no_copy_pages(m, mm):
    addr, _ = filled(m, mm, 8)
    before = m.vmstat
    res = mm.migrate(addr, 8 * m.page_size, 1)
    assert res.stats.nr_no_copy == 0 and "pgmigrate_no_copy" not in delta(m, before)


def test_no_copy_never_copies_on_the_migrating_thread(m, mm, monkeypatch):
    ps = m.page_size
    addr, data = filled(m, mm, 32)
    calls = []

    def forbidden(*args):
        calls.append(args)
        raise AssertionError("the migrating thread copied a page")

    monkeypatch.setattr(m.frames, "copy_folios", forbidden)
    monkeypatch.setattr(m.frames, "copy_pages", forbidden)
    for node in (2, 1, 0):
        res = mm.migrate(addr, 32 * ps, node, engine=m.dma)
        assert res.ok and calls == []
    monkeypatch.undo()
    assert np.array_equal(mm.read(addr, 32 * ps), data)


@pytest.mark.parametrize("npages", [1, 511, 1024, 2000])
def test_no_copy_over_many_batches(m, mm, npages):
    ps = m.page_size
    addr, data = filled(m, mm, npages, seed=npages)
    res = mm.migrate(addr, npages * ps, 1, engine=m.dma)
    assert res.ok and res.nr_succeeded == npages
    assert res.stats.nr_tlb_flush == -(-npages // 512)
    assert np.array_equal(mm.read(addr, npages * ps), data)


def test_no_copy_device_to_device(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 100)
    mm.migrate(addr, 100 * ps, 1, engine=m.dma)
    res = mm.migrate(addr, 100 * ps, 2, engine=m.dma)
    assert res.ok and (mm.nodes_of(addr, 100 * ps) == 2).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV - 100]
    assert np.array_equal(mm.read(addr, 100 * ps), data)


def test_no_copy_thp_whole_and_split(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2 * NR, order=9)
    res = mm.migrate(addr, 2 * NR * ps, 1, engine=m.dma)
    assert res.ok and res.nr_thp_succeeded == 2
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9
    nd = m.nodes[2]
    got = m.alloc_pages(2, nd.free_pages)
    held = got[(got - nd.base_pfn) % NR == 0]
    m.put_pages(got[(got - nd.base_pfn) % NR != 0])
    res = mm.migrate(addr, 2 * NR * ps, 2, engine=m.dma)
    assert res.ok and res.nr_thp_split == 2 and res.stats.nr_no_copy == 2 * NR
    assert np.array_equal(mm.read(addr, 2 * NR * ps), data)
    m.put_pages(held)


def test_no_copy_with_failures_mixed_in(m, mm):
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    data = rand(8 * ps, 3)
    mm.write(addr, data[: 6 * ps])
    mm.pin(addr + ps, ps)
    m.page_controls.get_page(mm.pfn_of(addr + 3 * ps))
    mm.migrate(addr + 5 * ps, ps, 1)
    res = mm.migrate(addr, 8 * ps, 1, engine=m.dma)
    assert res.status.tolist() == [0, EAGAIN, 0, EAGAIN, 0, 0, ENOENT, ENOENT]
    assert res.nr_succeeded == 3 and res.nr_failed == 2
    m.page_controls.put_page(mm.pfn_of(addr + 3 * ps))
    assert np.array_equal(mm.read(addr, 6 * ps), data[: 6 * ps])


# -- DMA errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_dma_error_falls_back_to_a_cpu_copy(m, mm, mode):
    """The batch-offload RFC: a folio whose DMA copy failed is copied by the migrating thread; none fails."""
    ps = m.page_size
    addr, data = filled(m, mm, 40)
    m.dma.inject_errors(1)
    before = m.vmstat
    res = mm.migrate(addr, 40 * ps, 1, mode=mode, engine=m.dma)
    assert res.ok and res.nr_succeeded == 40 and res.nr_failed == 0
    assert res.stats.nr_dma_fallback == 40 and res.stats.nr_no_copy == 40
    assert delta(m, before) == {"pgmigrate_success": 40, "pgmigrate_no_copy": 40, "pgmigrate_dma_fallback": 40,
                                "migrate_tlb_flush": 1}
    assert (mm.nodes_of(addr, 40 * ps) == 1).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 40, DEV]
    assert np.array_equal(mm.read(addr, 40 * ps), data)


def test_dma_error_costs_only_its_own_batch(m, mm):
    """An error in one batch's submission falls back for that batch; the other batches' DMA copies stand."""
    ps = m.page_size
    n = 3 * NR_MAX_BATCHED_MIGRATION
    addr, data = filled(m, mm, n)
    m.dma.inject_errors(1)
    res = mm.migrate(addr, n * ps, 1, engine=m.dma)
    # One channel of two refused its share of the first batch: those pages, and only those, were copied by
    # the CPU.
    assert res.ok and res.stats.nr_dma_fallback == NR_MAX_BATCHED_MIGRATION // 2
    assert res.stats.nr_tlb_flush == 3
    assert np.array_equal(mm.read(addr, n * ps), data)


def test_dma_error_on_a_thp(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    m.dma.inject_errors(1)
    res = mm.migrate(addr, NR * ps, 1, engine=m.dma)
    assert res.ok and res.nr_thp_succeeded == 1 and res.stats.nr_dma_fallback == NR
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9 and mm.node_of(addr) == 1
    assert np.array_equal(mm.read(addr, NR * ps), data)


# -- locks and retries with the engine -------------------------------------------------------------------------
def test_async_no_copy_with_a_locked_page(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 3)
    pfn = mm.pfn_of(addr + ps)
    m.page_controls.lock_page(pfn)
    res = mm.migrate(addr, 3 * ps, 1, mode=MigrateMode.ASYNC, engine=m.dma)
    assert res.status.tolist() == [0, EAGAIN, 0]
    m.page_controls.unlock_page(pfn)
    assert np.array_equal(mm.read(addr, 3 * ps), data)


def test_sync_no_copy_waits_for_a_locked_page(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 3)
    pfn = mm.pfn_of(addr)
    m.page_controls.lock_page(pfn)
    out = {}
    t = threading.Thread(target=lambda: out.update(res=mm.migrate(addr, 3 * ps, 1, engine=m.dma)), daemon=True)
    t.start()
    t.join(0.05)
    assert t.is_alive()
    m.page_controls.unlock_page(pfn)
    t.join(30)
    assert not t.is_alive()
    assert out["res"].status.tolist() == [0, 0, 0]
    assert np.array_equal(mm.read(addr, 3 * ps), data)


def _write_between_passes(monkeypatch, m, mm, addr: int, new: bytes):
    """Fail the first pass (a transient reference) and write the source before the second pass unmaps it.

    It hooks the general path's unmap pass, so the fused batches (which make a batch's first pass in one compiled
    call; tests/test_migrate_fused.py holds their busy-folio cases) are turned off."""
    monkeypatch.setattr(batch_loops, "fused_batch", None)
    pfn = mm.pfn_of(addr)
    m.page_controls.get_page(pfn)
    calls = []
    real = core._Migration._unmap_pass

    def hook(self, todo, mode):
        calls.append(todo.size)
        if len(calls) == 2:
            m.page_controls.put_page(pfn)
            mm.write(addr, new)  # the source is mapped again between the passes: it can change
        return real(self, todo, mode)

    monkeypatch.setattr(core._Migration, "_unmap_pass", hook)
    return calls


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_engine_retry_copies_the_current_content(m, mm, monkeypatch, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    calls = _write_between_passes(monkeypatch, m, mm, addr, b"NEW!")
    res = mm.migrate(addr, 4 * ps, 1, mode=mode, engine=m.dma)
    assert len(calls) >= 2
    assert res.ok
    data[:4] = np.frombuffer(b"NEW!", np.uint8)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


# -- NO_COPY onto destinations the caller copied ---------------------------------------------------------------
def test_no_copy_moves_state_only(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    src = pfns_of(mm, addr, 4)
    dst = m.alloc_pages(1, 4)
    marker = np.full((4, ps), 0xA5, np.uint8)
    m.frames.write_pfns(dst, marker)  # not the source's content: if the core copied, the marker would be gone
    before = m.vmstat
    res = m.migrate_pages(src, 1, mode=SYNC_NO_COPY, dst_pfns=dst)
    assert res.ok and res.stats.nr_no_copy == 4
    assert delta(m, before) == {"pgmigrate_success": 4, "pgmigrate_no_copy": 4, "migrate_tlb_flush": 1}
    assert np.array_equal(pfns_of(mm, addr, 4), dst)
    assert np.array_equal(mm.read(addr, 4 * ps), marker.reshape(-1))
    assert data.size  # the source content was deliberately not carried over


@pytest.mark.parametrize("mode", ALL_MODES)
def test_no_copy_after_caller_copy_keeps_data(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 16)
    src = pfns_of(mm, addr, 16)
    dst = m.alloc_pages(2, 16)
    m.frames.write_pfns(dst, m.frames.read_pfns(src))
    res = m.migrate_pages(src, 2, mode=mode | MigrateMode.NO_COPY, dst_pfns=dst)
    assert res.ok and res.nr_succeeded == 16
    assert np.array_equal(pfns_of(mm, addr, 16), dst)
    for pfn in dst.tolist():
        st = m.page_controls.page_state(pfn)
        assert st["refcount"] == st["mapcount"] == 1 and PageFlag.LRU in st["flags"]
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV - 16]
    assert np.array_equal(mm.read(addr, 16 * ps), data)


def test_no_copy_thp_onto_an_order9_destination(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    head = mm.pfn_of(addr)
    dst = m.alloc_pages(1, 1, order=9)
    m.frames.write_pfns(m.pages.expand(dst), m.frames.read_pfns(np.arange(head, head + NR)))
    res = m.migrate_pages([head], 1, mode=SYNC_NO_COPY, dst_pfns=dst)
    assert res.ok and res.nr_thp_succeeded == 1 and res.nr_succeeded == NR
    assert mm.pfn_of(addr) == dst[0]
    assert np.array_equal(mm.read(addr, NR * ps), data)


def test_no_copy_failures_free_their_destinations(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.pin(addr + ps, ps)
    src = pfns_of(mm, addr, 4)
    dst = m.alloc_pages(1, 4)
    m.frames.write_pfns(dst, m.frames.read_pfns(src))
    res = m.migrate_pages(src, 1, mode=SYNC_NO_COPY, dst_pfns=dst)
    assert res.status.tolist() == [0, EAGAIN, 0, 0]
    assert m.nodes[1].free_pages == DEV - 3  # the pinned page's destination went back
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_no_copy_destination_of_a_page_already_there_is_freed(m, mm):
    ps = m.page_size
    addr, _ = filled(m, mm, 2)
    mm.migrate(addr, ps, 1)
    src = pfns_of(mm, addr, 2)
    dst = m.alloc_pages(1, 2)
    m.frames.write_pfns(dst, m.frames.read_pfns(src))
    res = m.migrate_pages(src, 1, mode=SYNC_NO_COPY, dst_pfns=dst)
    assert res.status.tolist() == [0, 0] and res.nr_succeeded == 1
    assert m.nodes[1].free_pages == DEV - 2


def test_no_copy_dma_helper_copy_then_state_only(m, mm):
    """What a driver does: DMA copy with the engine, wait, then a state-only migrate_pages."""
    ps = m.page_size
    addr, data = filled(m, mm, 64)
    src = pfns_of(mm, addr, 64)
    dst = m.alloc_pages(1, 64)
    m.dma.copy(src, dst).wait()
    res = m.migrate_pages(src, 1, mode=SYNC_NO_COPY, dst_pfns=dst)
    assert res.ok
    assert np.array_equal(mm.read(addr, 64 * ps), data)


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_retried_no_copy_folio_gets_a_fresh_copy(m, mm, monkeypatch, mode):
    """The caller's copy is stale once the source was remapped (and written): a retry copies again."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    src = pfns_of(mm, addr, 2)
    dst = m.alloc_pages(1, 2)
    m.frames.write_pfns(dst, m.frames.read_pfns(src))
    calls = _write_between_passes(monkeypatch, m, mm, addr, b"fresh")
    res = m.migrate_pages(src, 1, mode=mode | MigrateMode.NO_COPY, dst_pfns=dst)
    assert len(calls) >= 2
    assert res.ok
    data[:5] = np.frombuffer(b"fresh", np.uint8)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    assert res.stats.nr_no_copy == 1  # the untouched page moved state only; the retried one was copied


@pytest.mark.parametrize("case", ["wrong-node", "short", "duplicate", "mapped", "tail-pfn", "order",
                                  "not-heads"])
def test_bad_destinations_are_refused_and_nothing_changes(m, mm, case):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    src = pfns_of(mm, addr, 4)
    dst = m.alloc_pages(1, 4)
    extra = []
    if case == "wrong-node":
        bad_src, bad_dst = src, m.alloc_pages(2, 4)
        extra.append(bad_dst)
    elif case == "short":
        bad_src, bad_dst = src, dst[:3]
    elif case == "duplicate":
        bad_src, bad_dst = src, dst[[0, 1, 1, 2]]
    elif case == "mapped":
        other = mm.mmap(ps)
        mm.write(other, b"x")
        bad_src, bad_dst = src[:1], np.array([mm.pfn_of(other)])
    elif case == "tail-pfn":
        big = m.alloc_pages(1, 1, order=2)
        extra.append(big)
        bad_src, bad_dst = src[:1], big + 1
    elif case == "order":
        big = m.alloc_pages(1, 1, order=2)
        extra.append(big)
        bad_src, bad_dst = src[:1], big
    else:
        t = mm.mmap(NR * ps, order=9)
        mm.write(t, b"t")
        bad_src, bad_dst = np.array([mm.pfn_of(t) + 1]), dst[:1]
    before = [n.free_pages for n in m.nodes]
    with pytest.raises(InvalidArgument):
        m.migrate_pages(bad_src, 1, mode=SYNC_NO_COPY, dst_pfns=bad_dst)
    assert [n.free_pages for n in m.nodes] == before
    for pfn in src.tolist():
        flags = m.page_controls.page_flags(pfn)
        assert PageFlag.ISOLATED not in flags and PageFlag.LRU in flags
    m.put_pages(dst)  # still the caller's
    for e in extra:
        m.put_pages(e)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_copy_and_no_copy_round_trips_on_every_backend(backend):
    """The same migrations on each backend (CUDA where a GPU is usable): data intact, nothing leaked."""
    mach = Machine(host_pages=2048, device_pages=2048, devices=1, backend=backend, channels=2)
    try:
        ps = mach.page_size
        mm = mach.address_space()
        addr, data = filled(mach, mm, 600, seed=11)
        big, big_data = filled(mach, mm, NR, seed=12, order=9)
        for engine in (None, mach.dma):
            for node in (1, 0):
                res = mm.migrate(addr, 600 * ps, node, engine=engine)
                assert res.ok and (mm.nodes_of(addr, 600 * ps) == node).all()
                res = mm.migrate(big, NR * ps, node, engine=engine)
                assert res.ok and res.nr_thp_succeeded == 1
            mm.migrate(addr, 600 * ps, 1, engine=engine)
            assert np.array_equal(mm.read(addr, 600 * ps), data)  # back to the host through the CPU
        mach.dma.inject_errors(1)
        res = mm.migrate(addr, 600 * ps, 1, engine=mach.dma)
        assert res.ok and res.stats.nr_dma_fallback > 0  # the failed batch was copied by the CPU instead
        assert np.array_equal(mm.read(addr, 600 * ps), data)
        assert np.array_equal(mm.read(big, NR * ps), big_data)
        finish_within(mm.close, "AddressSpace.close")
        assert [n.free_pages for n in mach.nodes] == [2048, 2048]
    finally:
        finish_within(mach.close, "Machine.close")
