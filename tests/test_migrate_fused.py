"""Fused batches (``core._Migration._fused_steps``), copied by the DMA engine or by the migrating thread: the same
migration as the general path, page for page and counter for counter, and every way out of the common case handed
over to the general path where it was met."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from support import filled

import dmamig.migrate.batch_loops as batch_loops
from dmamig import DmaError, Machine, MigrateMode, PageFlag, Prot
from dmamig.array_table import SLOT_WORDS
from dmamig.check import check_machine
from dmamig.dma import ring as dma_ring
from dmamig.dma.engine import RingBatches
from dmamig.migrate.interrupts import DeferredInterrupt

pytestmark = pytest.mark.skipif(batch_loops.FUSED_ERROR is not None,
                                reason=f"fused batches cannot run here: {batch_loops.FUSED_ERROR}")

NR = 512  # base pages of a kernel batch
PAGE_FIELDS = ("flags", "refcount", "mapcount", "mapping", "index", "private", "last_cpupid", "memcg", "order",
               "head", "write_seq")


def machine() -> Machine:
    return Machine(host_pages=8 * NR, device_pages=8 * NR, devices=2, backend="cpu", channels=2)


def recording(codes: list[int], rig=None):
    """fused_batch, recording the code of each call; ``rig(call number, args)`` may change its arguments."""
    real = batch_loops.fused_batch

    def fused(*args):
        if rig is not None:
            args = rig(len(codes), list(args))
        got = real(*args)
        codes.append(got[0])
        return got
    return fused


def state_of(m: Machine, mm, regions: list[tuple[int, int]], results: list) -> dict:
    out = {name: getattr(m.pages, name).copy() for name in PAGE_FIELDS if name != "write_seq"}
    out["ptes"] = [(v.pte_pfn.copy(), v.pte_flags.copy()) for v in mm.vmas]
    out["free"] = [nd.allocator.is_free(np.arange(nd.total_pages)).copy() for nd in m.nodes]
    out["nr_free"] = [nd.free_pages for nd in m.nodes]
    out["data"] = [mm.read(a, n * m.page_size) for a, n in regions]
    out["vmstat"] = m.vmstat
    out["results"] = [(r.status.copy(), r.stats, r.rc) for r in results]
    stats = m.dma.stats
    out["dma"] = (stats.submissions, stats.pages, stats.errors)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "results":
            for (sa, ta, ra), (sb, tb, rb) in zip(a[key], b[key]):
                assert np.array_equal(sa, sb) and ta == tb and ra == rb, (ta, tb)
        elif isinstance(a[key], list):
            for x, y in zip(a[key], b[key]):
                if isinstance(x, tuple):
                    assert all(np.array_equal(p, q) for p, q in zip(x, y)), key
                else:
                    assert np.array_equal(x, y), key
        elif isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def both_paths(scenario, rig=None) -> list[int]:
    """Run ``scenario()`` (which builds a machine and returns :func:`state_of`) fused and on the general path;
    they must agree on everything. Returns the fused calls' codes."""
    out = {}
    codes: list[int] = []
    for path in ("fused", "general"):
        with pytest.MonkeyPatch.context() as mp:
            if path == "general":
                mp.setattr(batch_loops, "fused_batch", None)
            else:
                mp.setattr(batch_loops, "fused_batch", recording(codes, rig))
            out[path] = scenario()
    assert_same(out["fused"], out["general"])
    return codes


COPIERS = ["dma", "cpu"]


def engine_of(m: Machine, copier: str):
    return m.dma if copier == "dma" else None


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("order", [0, 9])
@pytest.mark.parametrize("batches", [1, 2, 5])
def test_fused_batches_match_the_general_path(order, batches, copier):
    def scenario():
        m = machine()
        try:
            mm = m.address_space()
            addr, data = filled(m, mm, batches * NR, seed=batches, order=order)
            results = [mm.migrate(addr, batches * NR * m.page_size, node, engine=engine_of(m, copier))
                       for node in (1, 0, 1, 0)]
            assert all(r.ok for r in results)
            assert np.array_equal(mm.read(addr, batches * NR * m.page_size), data)
            assert check_machine(m) == []
            return state_of(m, mm, [(addr, batches * NR)], results)
        finally:
            m.close()

    codes = both_paths(scenario)
    # A fused call per batch, plus one per migration that moves the last (the CPU backend's lane is open from
    # the start), a call of one batch included, whoever copies.
    started = batch_loops.FUSED_SUBMITTED if copier == "dma" else batch_loops.FUSED_TO_COPY
    assert codes == ([started] * batches + [batch_loops.FUSED_MOVED]) * 4


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("mode", [MigrateMode.ASYNC, MigrateMode.SYNC])
@pytest.mark.parametrize("order", [0, 9])
def test_a_busy_folio_hands_its_batch_over_where_it_is_found(mode, order, copier):
    """An extra reference: the DMA copy is made and the first move pass finds it; the migrating thread's copy is
    not made (the reference check comes before it)."""
    def scenario():
        m = machine()
        try:
            mm = m.address_space()
            addr, data = filled(m, mm, 3 * NR, seed=1, order=order)
            pfn = mm.pfn_of(addr + (NR + 7) * m.page_size)  # batch 2
            m.page_controls.get_page(pfn)  # a transient reference: -EAGAIN at every freeze
            res = mm.migrate(addr, 3 * NR * m.page_size, 1, mode=mode, engine=engine_of(m, copier))
            m.page_controls.put_page(pfn)
            assert res.nr_succeeded == 3 * NR - (NR if order else 1)
            assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)
            again = mm.migrate(addr, 3 * NR * m.page_size, 1, mode=mode, engine=engine_of(m, copier))
            assert again.ok and check_machine(m) == []
            return state_of(m, mm, [(addr, 3 * NR)], [res, again])
        finally:
            m.close()

    codes = both_paths(scenario)
    assert (batch_loops.FUSED_MOVE_LEFT if copier == "dma" else batch_loops.FUSED_UNMAPPED) in codes


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("why", ["locked", "writeback"])
def test_a_folio_that_does_not_lock_hands_its_batch_over_after_the_first_unmap_pass(why, copier):
    def scenario():
        m = machine()
        try:
            mm = m.address_space()
            addr, data = filled(m, mm, 3 * NR, seed=2)
            pfn = mm.pfn_of(addr + (2 * NR + 3) * m.page_size)  # batch 3
            if why == "locked":
                m.page_controls.lock_page(pfn)
            else:
                m.page_controls.start_writeback(pfn)
            # ASYNC: a sync mode would retry the folio alone and wait for a lock this very thread holds.
            res = mm.migrate(addr, 3 * NR * m.page_size, 1, mode=MigrateMode.ASYNC, engine=engine_of(m, copier))
            if why == "locked":
                m.page_controls.unlock_page(pfn)
            else:
                m.page_controls.end_writeback(pfn)
            assert res.nr_succeeded == 3 * NR - 1 and res.nr_failed == 1
            assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)
            assert check_machine(m) == []
            return state_of(m, mm, [(addr, 3 * NR)], [res])
        finally:
            m.close()

    codes = both_paths(scenario)
    assert batch_loops.FUSED_UNMAP_LEFT in codes


@pytest.mark.parametrize("why", ["busy", "locked"])
@pytest.mark.parametrize("order", [0, 9])
def test_a_call_of_one_batch_hands_over_as_a_long_one_does(why, order):
    """A no-copy call of one batch (one 2 MiB folio, or 512 base pages) is fused too: a folio with an extra
    reference is handed over after the first move pass, one that does not lock after the first unmap pass; the
    end is the general path's, page for page."""
    def scenario():
        m = machine()
        try:
            mm = m.address_space()
            addr, data = filled(m, mm, NR, seed=4, order=order)
            pfn = mm.pfn_of(addr + 5 * m.page_size)
            if why == "busy":
                m.page_controls.get_page(pfn)
            else:
                m.page_controls.lock_page(pfn)
            res = mm.migrate(addr, NR * m.page_size, 1, mode=MigrateMode.ASYNC, engine=m.dma)
            if why == "busy":
                m.page_controls.put_page(pfn)
            else:
                m.page_controls.unlock_page(pfn)
            assert res.nr_succeeded == NR - (NR if order else 1)
            assert np.array_equal(mm.read(addr, NR * m.page_size), data)
            again = mm.migrate(addr, NR * m.page_size, 1, mode=MigrateMode.ASYNC, engine=m.dma)
            assert again.ok and check_machine(m) == []
            return state_of(m, mm, [(addr, NR)], [res, again])
        finally:
            m.close()

    codes = both_paths(scenario)
    # The first call: unmapped and submitted, then moved but for the busy folio; or not all locked. The second
    # call: fused whole. Each read of pages on the device brings them back to RAM, a copy migration of one batch,
    # fused too: after the first call where base pages moved (the other 511), and at the end.
    first = [batch_loops.FUSED_SUBMITTED, batch_loops.FUSED_MOVE_LEFT] if why == "busy" \
        else [batch_loops.FUSED_UNMAP_LEFT]
    read_back = [batch_loops.FUSED_TO_COPY, batch_loops.FUSED_MOVED]
    assert codes == first + (read_back if order == 0 else []) + [batch_loops.FUSED_SUBMITTED,
                                                                  batch_loops.FUSED_MOVED] + read_back


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("order", [0, 9])
def test_a_target_node_out_of_frames_hands_the_batch_to_the_general_allocation(order, copier):
    def scenario():
        m = machine()
        try:
            mm = m.address_space()
            addr, data = filled(m, mm, 4 * NR, seed=3, order=order)
            held = m.alloc_pages(1, 8 * NR - 2 * NR - NR // 2)  # room for two and a half batches
            if order:
                m.put_pages(held[-2 * NR::2])  # free frames, but no free 2 MiB block for the third THP
            res = mm.migrate(addr, 4 * NR * m.page_size, 1, engine=engine_of(m, copier))
            assert not res.ok
            assert np.array_equal(mm.read(addr, 4 * NR * m.page_size), data)
            m.put_pages(held if not order else np.setdiff1d(held, held[-2 * NR::2]))
            assert check_machine(m) == []
            return state_of(m, mm, [(addr, 4 * NR)], [res])
        finally:
            m.close()

    codes = both_paths(scenario)
    assert batch_loops.FUSED_NO_FRAMES in codes


def test_a_submission_the_rings_refuse_goes_through_the_engine_general_path():
    kept = []

    def rig(call, args):
        if call == 1:  # the second batch: a route that covers no destination, so every page is outside it
            table = dma_ring.ROUTE_LAYOUT.table()
            table.words[:] = args[1]  # the rings' route table, as the fused call gets it
            at = dma_ring.RT_ROUTE * SLOT_WORDS
            route = np.ctypeslib.as_array((ctypes.c_int64 * int(table.words[at + 1])).from_address(
                int(table.words[at]))).copy()
            route[dma_ring.R_DST_PAGES] = 0
            table.set(dma_ring.RT_ROUTE, (route,))
            kept.append(table)  # (the call reads the route through the table's address)
            args[1] = table.words
        return args

    def scenario():
        m = machine()
        try:
            mm = m.address_space()
            addr, data = filled(m, mm, 3 * NR, seed=4)
            res = mm.migrate(addr, 3 * NR * m.page_size, 1, engine=m.dma)
            assert res.ok and res.stats.nr_no_copy == 3 * NR
            assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)
            assert check_machine(m) == []
            return state_of(m, mm, [(addr, 3 * NR)], [res])
        finally:
            m.close()

    codes = both_paths(scenario, rig)
    assert batch_loops.FUSED_UNMAPPED in codes


def test_a_page_table_replaced_between_fused_batches_is_set_again_in_the_table(monkeypatch):
    """mremap grows the VMA in place between two fused batches (its page table and its object's slots are new
    arrays): every later fused call's table holds the new ones, and the migration ends as if nothing had moved.
    (A call over the old ones would leave migration entries in the new page table, which readers wait for: the
    wrapper refuses such a call before it runs.)"""
    real_wait, real_fused = RingBatches.wait, batch_loops.fused_batch
    grown, codes = [], []
    pte_slot = batch_loops.T_PTE_PFN * SLOT_WORDS
    obj_slot = batch_loops.T_OBJ_PFNS * SLOT_WORDS

    def wait(self):
        real_wait(self)
        if not grown:  # outside every lock, between the first batch and the second
            grown.append(mm.mremap(addr, 3 * NR * m.page_size, 4 * NR * m.page_size, may_move=False))

    def fused(table, *args):
        vma = mm.vmas[0]
        if table[pte_slot] != vma.pte_pfn.ctypes.data or table[pte_slot + 1] != vma.npages \
                or table[obj_slot] != vma.obj.pfns.ctypes.data:
            raise AssertionError("a fused call's table holds a page table or slots its VMA no longer has")
        got = real_fused(table, *args)
        codes.append(got[0])
        return got

    monkeypatch.setattr(RingBatches, "wait", wait)
    monkeypatch.setattr(batch_loops, "fused_batch", fused)
    with machine() as m:
        mm = m.address_space()
        addr, data = filled(m, mm, 3 * NR, seed=12, order=9)
        res = mm.migrate(addr, 3 * NR * m.page_size, 1, engine=m.dma)
        assert grown == [addr] and mm.vmas[0].npages == 4 * NR
        assert res.ok and res.stats.nr_thp_succeeded == 3 and res.stats.nr_no_copy == 3 * NR
        assert codes.count(batch_loops.FUSED_SUBMITTED) == 3
        assert not mm.vmas[0].has_migration_entries()
        assert (mm.nodes_of(addr, 3 * NR * m.page_size) == 1).all()
        assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)
        assert check_machine(m) == []


def test_a_failed_dma_copy_is_made_by_the_migrating_thread(monkeypatch):
    real = RingBatches.wait
    waits = []

    def wait(self):
        real(self)
        waits.append(1)
        if len(waits) == 2:  # the second batch: its channel reports a failure after the copy ended
            self._engine._count_error()
            raise DmaError("injected: the channel did not copy its share")

    monkeypatch.setattr(RingBatches, "wait", wait)
    m = machine()
    try:
        mm = m.address_space()
        addr, data = filled(m, mm, 3 * NR, seed=5)
        res = mm.migrate(addr, 3 * NR * m.page_size, 1, engine=m.dma)
        assert res.ok and res.stats.nr_dma_fallback == NR and res.stats.nr_no_copy == 3 * NR
        assert res.stats.nr_move_passes == 3 and res.stats.nr_passes == 3 and res.stats.nr_tlb_flush == 3
        assert m.dma.stats.errors == 1
        assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)
        assert check_machine(m) == []
    finally:
        m.close()


def test_a_vma_that_changes_ends_the_fused_run(monkeypatch):
    """Where the one VMA cannot be used any more, the batch in flight moves the general way and the rest go on."""
    from dmamig.migrate import core

    real = core._Migration._one_vma
    asked = []

    def one_vma(self):
        asked.append(1)
        return None if len(asked) == 3 else real(self)

    monkeypatch.setattr(core._Migration, "_one_vma", one_vma)
    codes: list[int] = []
    monkeypatch.setattr(batch_loops, "fused_batch", recording(codes))
    m = machine()
    try:
        mm = m.address_space()
        addr, data = filled(m, mm, 4 * NR, seed=6)
        res = mm.migrate(addr, 4 * NR * m.page_size, 1, engine=m.dma)
        assert res.ok and res.stats.nr_no_copy == 4 * NR and res.stats.nr_move_passes == 4
        assert res.stats.nr_unmap_passes == 4 and res.stats.nr_passes == 4 and res.stats.nr_tlb_flush == 4
        assert codes[:2] == [batch_loops.FUSED_SUBMITTED] * 2 and len(codes) > 2  # fused again after the gap
        assert np.array_equal(mm.read(addr, 4 * NR * m.page_size), data)
        assert check_machine(m) == []
    finally:
        m.close()


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("when", [2, 3, 4])
def test_an_interrupt_with_a_batch_in_flight_restores_every_page(monkeypatch, when, copier):
    real = DeferredInterrupt.check
    checks = []

    def check(self):
        checks.append(1)
        if len(checks) == when:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(DeferredInterrupt, "check", check)
    m = machine()
    try:
        mm = m.address_space()
        n = 4 * NR
        addr, data = filled(m, mm, n, seed=7)
        free_before = [nd.free_pages for nd in m.nodes]
        with pytest.raises(KeyboardInterrupt):
            mm.migrate(addr, n * m.page_size, 1, engine=engine_of(m, copier))
        monkeypatch.undo()
        moved = (mm.nodes_of(addr, n * m.page_size) == 1).sum()
        assert moved % NR == 0 and moved < n
        assert check_machine(m) == []
        assert sum(nd.free_pages for nd in m.nodes) == sum(free_before)
        assert np.array_equal(mm.read(addr, n * m.page_size), data)
        assert mm.migrate(addr, n * m.page_size, 2, engine=m.dma).ok
        assert np.array_equal(mm.read(addr, n * m.page_size), data)
    finally:
        m.close()


def test_an_engine_closed_between_batches_fails_the_call_and_restores_every_page(monkeypatch):
    real = RingBatches.wait
    waits = []

    def wait(self):
        real(self)
        waits.append(1)
        if len(waits) == 2:
            self._engine.close()  # (from the migrating thread, outside every lock)

    monkeypatch.setattr(RingBatches, "wait", wait)
    m = machine()
    try:
        mm = m.address_space()
        n = 4 * NR
        addr, data = filled(m, mm, n, seed=8)
        with pytest.raises(DmaError, match="closed"):
            mm.migrate(addr, n * m.page_size, 1, engine=m.dma)
        assert (mm.nodes_of(addr, n * m.page_size) == 1).sum() == NR  # the batch before the one in flight
        assert check_machine(m) == []
        assert np.array_equal(mm.read(addr, n * m.page_size), data)
    finally:
        m.close()


# -- the engine's side: RingBatches ------------------------------------------------------------------------------
def _open_rings(m: Machine) -> RingBatches:
    src, dst = m.alloc_pages(0, 4), m.alloc_pages(1, 4)
    m.dma.copy(src, dst).wait()  # a lane opens on its first general-path copy
    m.put_pages(np.concatenate([src, dst]))
    rings = m.dma.ring_batches(0, 1, 64)
    assert rings is not None and m.dma.ring_batches(0, 1, 64) is not rings  # each caller its own
    return rings


def _submit(rings: RingBatches, src: np.ndarray, dst: np.ndarray) -> int:
    table = rings.hold()
    assert table is not None
    try:
        nr = dma_ring.submit_table(table, src, dst, False, rings.seq)
        if nr >= 0:
            rings.published(src.size, nr)
    finally:
        rings.release()
    return nr


def test_ring_batches_count_publish_and_are_waited_for_by_synchronize():
    with machine() as m:
        rings = _open_rings(m)
        src, dst = m.alloc_pages(0, 32), m.alloc_pages(1, 32)
        m.frames.write_pfns(src, np.random.default_rng(0).integers(0, 256, (32, m.page_size), dtype=np.uint8))
        before = m.dma.stats
        assert _submit(rings, src, dst) >= 0
        m.dma.synchronize()  # waits for the ring batch in flight
        assert np.array_equal(m.frames.read_pfns(dst), m.frames.read_pfns(src))
        after = m.dma.stats
        assert after.submissions == before.submissions + 1 and after.pages == before.pages + 32
        assert (m.pages.write_seq[dst] == rings.seq).all()  # stamped before it was published
        rings.wait()
        rings.wait()  # nothing in flight: returns at once


def test_ring_batches_given_back_serve_the_next_caller():
    """close() gives the rings back for the next caller between the same nodes (grown for its submissions), not
    while a submission is in flight; taken again, they are that caller's alone."""
    with machine() as m:
        rings = _open_rings(m)
        rng = np.random.default_rng(1)
        src, dst = m.alloc_pages(0, 32), m.alloc_pages(1, 32)
        m.frames.write_pfns(src, rng.integers(0, 256, (32, m.page_size), dtype=np.uint8))
        assert _submit(rings, src, dst) >= 0
        rings.close()  # in flight: kept by its caller
        assert m.dma.ring_batches(0, 1, 64) is not rings
        rings.wait()
        rings.close()
        again = m.dma.ring_batches(0, 1, 300)
        assert again is rings and m.dma.ring_batches(0, 1, 64) is not rings
        src, dst = m.alloc_pages(0, 300), m.alloc_pages(1, 300)
        m.frames.write_pfns(src, rng.integers(0, 256, (300, m.page_size), dtype=np.uint8))
        assert _submit(again, src, dst) >= 0
        again.wait()
        assert np.array_equal(m.frames.read_pfns(dst), m.frames.read_pfns(src))


def test_ring_batches_hold_nothing_when_faults_are_armed_or_the_engine_is_closed():
    with machine() as m:
        rings = _open_rings(m)
        m.faults.set("dma_copy", probability=1.0)
        assert rings.hold() is None and m.dma.ring_batches(0, 1, 64) is None
        m.faults.clear()
        done = threading.Event()
        threading.Thread(target=lambda: (m.dma.synchronize(), done.set()), daemon=True).start()
        assert done.wait(10), "hold() kept the engine lock"
        m.dma.close()
        with pytest.raises(DmaError, match="closed"):
            rings.hold()
        assert m.dma.ring_batches(0, 1, 64) is None
        assert m.dma._lock.acquire(timeout=1)  # nothing held after the refusal
        m.dma._lock.release()


def test_the_batches_after_one_handed_over_are_fused_again():
    """Writeback set on a page of the first batch only: that batch goes the general way, the rest fused."""
    codes: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_loops, "fused_batch", recording(codes))
        with machine() as m:
            mm = m.address_space()
            addr, data = filled(m, mm, 3 * NR, seed=9)
            pfn = mm.pfn_of(addr)
            m.page_controls.set_page_flags(pfn, PageFlag.WRITEBACK)
            res = mm.migrate(addr, 3 * NR * m.page_size, 1, mode=MigrateMode.ASYNC, engine=m.dma)
            m.page_controls.clear_page_flags(pfn, PageFlag.WRITEBACK)
            assert res.nr_failed == 1 and res.nr_succeeded == 3 * NR - 1
            assert codes[0] == batch_loops.FUSED_UNMAP_LEFT and batch_loops.FUSED_SUBMITTED in codes
            assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)


def test_a_folio_mapped_through_two_vmas_takes_the_general_path():
    """One object, two VMAs (an mprotect split): the fused run cannot start, and the call goes on regardless."""
    codes: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_loops, "fused_batch", recording(codes))
        with machine() as m:
            mm = m.address_space()
            addr, data = filled(m, mm, 3 * NR, seed=10)
            mm.mprotect(addr, NR * m.page_size, Prot.READ)  # two VMAs over one object
            res = mm.migrate(addr, 3 * NR * m.page_size, 1, engine=m.dma)
            assert res.ok and res.nr_succeeded == 3 * NR and codes == []
            assert np.array_equal(mm.read(addr, 3 * NR * m.page_size), data)
            assert check_machine(m) == []


@pytest.mark.parametrize("copier", COPIERS)
def test_concurrent_long_migrations_between_the_same_nodes_keep_every_byte(copier):
    """Threads migrating their own ranges between the same two nodes, batch after batch: each waits for its own
    submissions (their rings are the engine's, shared), and every byte arrives."""
    with Machine(host_pages=16 * NR, device_pages=16 * NR, devices=1, backend="cpu", channels=2) as m:
        spaces = [m.address_space() for _ in range(3)]
        ranges = [filled(m, mm, 4 * NR, seed=20 + k, order=9 if k % 2 else 0) for k, mm in enumerate(spaces)]
        errors: list[BaseException] = []
        codes: list[int] = []

        def run(mm, addr, data):
            try:
                for node in (1, 0) * 6:
                    res = mm.migrate(addr, 4 * NR * m.page_size, node, engine=engine_of(m, copier))
                    assert res.ok and res.nr_succeeded == 4 * NR
                assert np.array_equal(mm.read(addr, 4 * NR * m.page_size), data)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(batch_loops, "fused_batch", recording(codes))
            threads = [threading.Thread(target=run, args=(mm, a, d)) for mm, (a, d) in zip(spaces, ranges)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert not errors, errors[0]
        assert codes.count(batch_loops.FUSED_SUBMITTED if copier == "dma" else batch_loops.FUSED_TO_COPY) > 0
        assert check_machine(m) == []


@pytest.mark.parametrize("copier", COPIERS)
def test_writes_while_fused_batches_migrate_are_never_lost(copier):
    """A writer stores into the range while it migrates batch after batch: a store to a folio under migration
    waits for its move, and every store is in the final bytes."""
    with Machine(host_pages=8 * NR, device_pages=8 * NR, devices=1, backend="cpu", channels=2) as m:
        mm = m.address_space()
        n = 4 * NR
        addr, data = filled(m, mm, n, seed=30, order=9)
        expected = data.copy()
        stop = threading.Event()
        errors: list[BaseException] = []
        codes: list[int] = []

        def writer():
            rng = np.random.default_rng(31)
            try:
                while not stop.is_set():
                    page = int(rng.integers(0, n))
                    value = rng.integers(0, 256, 64, dtype=np.uint8)
                    mm.write(addr + page * m.page_size + 128, value)
                    expected[page * m.page_size + 128: page * m.page_size + 192] = value
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(batch_loops, "fused_batch", recording(codes))
            t = threading.Thread(target=writer)
            t.start()
            try:
                for node in (1, 0) * 8:
                    res = mm.migrate(addr, n * m.page_size, node, mode=MigrateMode.ASYNC, engine=engine_of(m, copier))
                    assert res.rc >= 0
            finally:
                stop.set()
                t.join(60)
        assert not errors, errors[0]
        assert codes, "no batch ran fused"
        assert np.array_equal(mm.read(addr, n * m.page_size), expected)
        assert check_machine(m) == []


def test_one_compiled_fused_batch_serves_both_copiers_and_every_call():
    """Every fused call of a run, copied by the DMA engine or by the migrating thread, passes arguments of the
    same types: one compiled fused_batch (a read-only empty batch or stand-in ring array would compile it again)."""
    from numba import typeof

    kinds = set()
    real = batch_loops.fused_batch

    def fused(*args):
        kinds.add(tuple(typeof(a) for a in args))
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_loops, "fused_batch", fused)
        with machine() as m:
            mm = m.address_space()
            addr, _ = filled(m, mm, 3 * NR, seed=40, order=9)
            for engine in (m.dma, None, m.dma, None):
                for node in (1, 0):
                    assert mm.migrate(addr, 3 * NR * m.page_size, node, engine=engine).ok
    assert len(kinds) == 1
