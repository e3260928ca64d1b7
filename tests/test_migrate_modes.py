"""Migrate modes and the retry rules: page locks, writeback, pins, transient references, ENOMEM, counters."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
from support import delta, filled, rand

import dmamig.migrate.core as core
from dmamig import InvalidArgument, Machine, MigrateMode, PageFlag
from dmamig.dma.engine import RingBatches

EAGAIN, EBUSY, ENOMEM, ENOENT = -errno.EAGAIN, -errno.EBUSY, -errno.ENOMEM, -errno.ENOENT
HOST = DEV = 4096
ALL_MODES = [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]
WAIT = 30.0  # generous bound for joins; a healthy run takes milliseconds


class Background:
    """Run ``fn`` on a thread and keep its result or exception."""

    def __init__(self, fn):
        self.result = None
        self.error: BaseException | None = None

        def body():
            try:
                self.result = fn()
            except BaseException as exc:  # re-raised by join
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self):
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(pred, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# -- basic results and counters -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_copy_migration_moves_data_and_counts(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 16)
    before = m.vmstat
    res = mm.migrate(addr, 16 * ps, 1, mode=mode)
    assert res.ok and res.status.tolist() == [0] * 16
    assert res.nr_succeeded == 16 and res.nr_failed == 0
    assert (mm.nodes_of(addr, 16 * ps) == 1).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 16, DEV]
    d = delta(m, before)
    assert d == {"pgmigrate_success": 16, "migrate_tlb_flush": 1}
    assert np.array_equal(mm.read(addr, 16 * ps), data)


@pytest.mark.parametrize("npages, flushes", [(1, 1), (512, 1), (513, 2), (1024, 2), (1500, 3)])
def test_one_tlb_flush_per_512_page_batch(m, mm, npages, flushes):
    addr, _ = filled(m, mm, npages)
    before = m.vmstat
    res = mm.migrate(addr, npages * m.page_size, 1)
    assert res.nr_succeeded == npages
    assert res.stats.nr_tlb_flush == flushes
    assert delta(m, before)["migrate_tlb_flush"] == flushes


def test_device_to_device_and_back(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 32)
    for node in (1, 2, 1, 0, 2):
        res = mm.migrate(addr, 32 * ps, node, mode=MigrateMode.SYNC)
        assert res.nr_succeeded == 32
        assert (mm.nodes_of(addr, 32 * ps) == node).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV - 32]
    assert np.array_equal(mm.read(addr, 32 * ps), data)


def test_pages_already_on_target_are_not_counted(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    mm.migrate(addr, 4 * ps, 1)
    pfns = [mm.pfn_of(addr + i * ps) for i in range(4)]
    before = m.vmstat
    res = mm.migrate(addr, 8 * ps, 1)
    assert res.status.tolist() == [0] * 8
    assert res.nr_succeeded == 4 and res.nr_failed == 0
    assert delta(m, before)["pgmigrate_success"] == 4
    assert [mm.pfn_of(addr + i * ps) for i in range(4)] == pfns  # untouched
    res = mm.migrate(addr, 8 * ps, 1)
    assert res.nr_succeeded == 0 and res.status.tolist() == [0] * 8
    assert np.array_equal(mm.read(addr, 8 * ps), data)


def test_unpopulated_pages_are_enoent_and_not_faulted(m, mm):
    ps = m.page_size
    addr = mm.mmap(6 * ps)
    mm.write(addr + 2 * ps, b"x")
    mm.write(addr + 4 * ps, b"y")
    before = m.vmstat
    res = mm.migrate(addr, 6 * ps, 2)
    assert res.status.tolist() == [ENOENT, ENOENT, 0, ENOENT, 0, ENOENT]
    assert res.nr_succeeded == 2 and res.nr_failed == 0
    assert mm.nodes_of(addr, 6 * ps).tolist() == [-1, -1, 2, -1, 2, -1]
    assert "pgmigrate_fail" not in delta(m, before)
    assert mm.read(addr + 4 * ps, 1).tobytes() == b"y"


def test_length_is_rounded_up_to_pages(m, mm):
    ps = m.page_size
    addr, _ = filled(m, mm, 3)
    res = mm.migrate(addr, ps + 1, 1)
    assert res.status.size == 2
    assert mm.nodes_of(addr, 3 * ps).tolist() == [1, 1, 0]


# -- mode validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [
    MigrateMode.ASYNC | MigrateMode.SYNC, MigrateMode.SYNC_LIGHT | MigrateMode.SYNC, MigrateMode(0),
    MigrateMode.NO_COPY, MigrateMode.SYNC | MigrateMode.NO_COPY, "SYNC", 1, None,
])
def test_bad_modes_are_refused_before_anything_moves(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    before = m.vmstat
    with pytest.raises(InvalidArgument):
        mm.migrate(addr, 4 * ps, 1, mode=mode)
    assert m.vmstat == before
    flags = m.page_controls.page_flags(mm.pfn_of(addr))
    assert PageFlag.LRU in flags and PageFlag.ISOLATED not in flags
    assert mm.migrate(addr, 4 * ps, 1).nr_succeeded == 4  # nothing was left isolated
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_no_copy_message_points_to_the_engine(m, mm):
    addr, _ = filled(m, mm, 1)
    with pytest.raises(InvalidArgument, match="engine"):
        mm.migrate(addr, m.page_size, 1, mode=MigrateMode.SYNC | MigrateMode.NO_COPY)


def test_engine_must_be_this_machines(m, mm):
    addr, _ = filled(m, mm, 2)
    with Machine(host_pages=512, device_pages=512, backend="cpu", channels=1) as other:
        with pytest.raises(InvalidArgument, match="engine"):
            mm.migrate(addr, 2 * m.page_size, 1, engine=other.dma)
    with pytest.raises(InvalidArgument, match="engine"):
        mm.migrate(addr, 2 * m.page_size, 1, engine=object())
    assert mm.nodes_of(addr, 2 * m.page_size).tolist() == [0, 0]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_migrate_pages_rejects_no_copy_and_dst_mismatch(m, mm, mode):
    addr, _ = filled(m, mm, 2)
    pfns = np.array([mm.pfn_of(addr), mm.pfn_of(addr + m.page_size)])
    with pytest.raises(InvalidArgument, match="NO_COPY"):
        m.migrate_pages(pfns, 1, mode=mode | MigrateMode.NO_COPY)
    dst = m.alloc_pages(1, 2)
    with pytest.raises(InvalidArgument, match="NO_COPY"):
        m.migrate_pages(pfns, 1, mode=mode, dst_pfns=dst)
    m.put_pages(dst)
    assert m.migrate_pages(pfns, 1, mode=mode).nr_succeeded == 2


# -- page locks -------------------------------------------------------------------------------------------------
def test_async_does_not_wait_for_a_locked_page(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    pfn = mm.pfn_of(addr + ps)
    locker_ready, release = threading.Event(), threading.Event()

    def locker():
        m.page_controls.lock_page(pfn)
        locker_ready.set()
        release.wait(WAIT)
        m.page_controls.unlock_page(pfn)

    t = threading.Thread(target=locker, daemon=True)
    t.start()
    assert locker_ready.wait(WAIT)
    try:
        res = mm.migrate(addr, 4 * ps, 1, mode=MigrateMode.ASYNC)
    finally:
        release.set()
        t.join(WAIT)
    assert res.status.tolist() == [0, EAGAIN, 0, 0]
    assert res.nr_succeeded == 3 and res.nr_failed == 1
    assert res.stats.nr_passes == core.NR_MAX_MIGRATE_PAGES_RETRY
    assert mm.nodes_of(addr, 4 * ps).tolist() == [1, 0, 1, 1]
    assert mm.pfn_of(addr + ps) == pfn
    flags = m.page_controls.page_flags(pfn)
    assert PageFlag.LOCKED not in flags and PageFlag.LRU in flags and PageFlag.ISOLATED not in flags
    assert np.array_equal(mm.read(addr, 4 * ps), data)


@pytest.mark.parametrize("one_vma", [True, False], ids=["compiled", "phase-by-phase"])
def test_migrate_folio_unmap_frees_the_destination_of_an_async_lock_retry(m, mm, monkeypatch, one_vma):
    """migrate_folio_unmap: a folio whose lock is busy in ASYNC mode gives its destination back
    (migrate_folio_undo_dst) before it is retried; each pass allocates again."""
    from dmamig.migrate import batch_loops

    monkeypatch.setattr(batch_loops, "USE_BATCH_LOOPS", one_vma)
    # The general path's passes, counted one by one (a fused batch makes the first in its own compiled call;
    # test_migrate_fused.py holds its cases).
    monkeypatch.setattr(batch_loops, "fused_batch", None)
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    m.page_controls.lock_page(pfn)
    held = []
    real = core._Migration._unmap_pass

    def unmap_pass(self, todo, mode):
        out = real(self, todo, mode)
        held.append(DEV - m.nodes[1].free_pages)  # frames of the target node in use after the pass
        return out

    monkeypatch.setattr(core._Migration, "_unmap_pass", unmap_pass)
    try:
        res = mm.migrate(addr, 2 * ps, 1, mode=MigrateMode.ASYNC)
    finally:
        m.page_controls.unlock_page(pfn)
    assert res.status.tolist() == [EAGAIN, 0]
    assert held == [1] * core.NR_MAX_MIGRATE_PAGES_RETRY  # only the unmapped folio's destination
    assert m.nodes[1].free_pages == DEV - 1
    assert np.array_equal(mm.read(addr, 2 * ps), data)


@pytest.mark.parametrize("mode", [MigrateMode.SYNC_LIGHT, MigrateMode.SYNC])
def test_sync_modes_wait_for_a_locked_page(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    pfn = mm.pfn_of(addr + 2 * ps)
    m.page_controls.lock_page(pfn)
    job = Background(lambda: mm.migrate(addr, 4 * ps, 1, mode=mode))
    # The other pages move in the batched passes; the locked one is then waited for, alone, without holding
    # the machine: this thread can still look at the address space.
    wait_until(lambda: mm.nodes_of(addr, 4 * ps).tolist() == [1, 1, 0, 1], "the unlocked pages to move")
    assert job.thread.is_alive()
    m.page_controls.unlock_page(pfn)
    res = job.join()
    assert res.status.tolist() == [0, 0, 0, 0]
    assert res.nr_succeeded == 4
    assert (mm.nodes_of(addr, 4 * ps) == 1).all()
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_sync_light_does_not_wait_for_a_locked_page_that_is_not_uptodate(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    m.page_controls.clear_page_flags(pfn, PageFlag.UPTODATE)
    m.page_controls.lock_page(pfn)
    res = mm.migrate(addr, 2 * ps, 1, mode=MigrateMode.SYNC_LIGHT)
    assert res.status.tolist() == [EAGAIN, 0]
    m.page_controls.unlock_page(pfn)
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_lock_page_controls(m, mm):
    addr, _ = filled(m, mm, 1)
    pfn = mm.pfn_of(addr)
    assert m.page_controls.lock_page(pfn)
    assert not m.page_controls.lock_page(pfn, blocking=False)
    assert PageFlag.LOCKED in m.page_controls.page_flags(pfn)
    m.page_controls.unlock_page(pfn)
    with pytest.raises(InvalidArgument):
        m.page_controls.unlock_page(pfn)
    with pytest.raises(InvalidArgument):
        m.page_controls.set_page_flags(pfn, PageFlag.LOCKED)


# -- writeback -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT])
def test_writeback_is_ebusy_without_sync(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 3)
    pfn = mm.pfn_of(addr + ps)
    m.page_controls.start_writeback(pfn)
    before = m.vmstat
    res = mm.migrate(addr, 3 * ps, 1, mode=mode)
    assert res.status.tolist() == [0, EBUSY, 0]
    assert res.nr_succeeded == 2 and res.nr_failed == 1
    assert delta(m, before) == {"pgmigrate_success": 2, "pgmigrate_fail": 1, "migrate_tlb_flush": 1}
    assert mm.pfn_of(addr + ps) == pfn
    flags = m.page_controls.page_flags(pfn)
    assert PageFlag.WRITEBACK in flags and PageFlag.LOCKED not in flags and PageFlag.ISOLATED not in flags
    m.page_controls.end_writeback(pfn)
    assert np.array_equal(mm.read(addr, 3 * ps), data)


def test_writeback_ebusy_is_not_retried_in_async(m, mm):
    ps = m.page_size
    addr, _ = filled(m, mm, 1)
    m.page_controls.start_writeback(mm.pfn_of(addr))
    res = mm.migrate(addr, ps, 1, mode=MigrateMode.ASYNC)
    assert res.status.tolist() == [EBUSY]
    assert res.stats.nr_passes == 1


def test_sync_waits_for_writeback_to_end(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 3)
    pfn = mm.pfn_of(addr)
    m.page_controls.start_writeback(pfn)
    job = Background(lambda: mm.migrate(addr, 3 * ps, 2, mode=MigrateMode.SYNC))
    wait_until(lambda: mm.nodes_of(addr, 3 * ps).tolist() == [0, 2, 2], "the other pages to move")
    assert job.thread.is_alive()
    m.page_controls.end_writeback(pfn)
    res = job.join()
    assert res.status.tolist() == [0, 0, 0]
    assert mm.node_of(addr) == 2
    assert PageFlag.WRITEBACK not in m.page_controls.page_flags(mm.pfn_of(addr))
    assert np.array_equal(mm.read(addr, 3 * ps), data)


# -- references: pins and transient refs -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_pinned_pages_fail_with_eagain_in_every_mode(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.pin(addr + ps, 2 * ps)
    pinned = [mm.pfn_of(addr + ps), mm.pfn_of(addr + 2 * ps)]
    before = m.vmstat
    res = mm.migrate(addr, 4 * ps, 1, mode=mode)
    assert res.status.tolist() == [0, EAGAIN, EAGAIN, 0]
    assert res.nr_succeeded == 2 and res.nr_failed == 2
    assert delta(m, before)["pgmigrate_fail"] == 2
    assert [mm.pfn_of(addr + ps), mm.pfn_of(addr + 2 * ps)] == pinned
    for pfn in pinned:
        st = m.page_controls.page_state(pfn)
        assert st["refcount"] == 2 and st["mapcount"] == 1
        assert PageFlag.ISOLATED not in st["flags"] and PageFlag.LOCKED not in st["flags"]
    assert np.array_equal(mm.read(addr, 4 * ps), data)
    mm.unpin(addr + ps, 2 * ps)
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0] * 4  # the read brought everything back
    res = mm.migrate(addr, 4 * ps, 1, mode=mode)
    assert res.status.tolist() == [0] * 4 and res.nr_succeeded == 4


@pytest.mark.parametrize("mode, passes", [(MigrateMode.ASYNC, 10), (MigrateMode.SYNC, 10)])
def test_pinned_page_is_tried_ten_passes(m, mm, mode, passes):
    addr, _ = filled(m, mm, 1)
    mm.pin(addr, m.page_size)
    res = mm.migrate(addr, m.page_size, 1, mode=mode)
    assert res.status.tolist() == [EAGAIN]
    assert res.stats.nr_passes == passes


@pytest.mark.parametrize("mode", ALL_MODES)
def test_transient_reference_is_eagain_then_migrates(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    m.page_controls.get_page(pfn)
    res = mm.migrate(addr, 2 * ps, 1, mode=mode)
    assert res.status.tolist() == [EAGAIN, 0]
    assert m.page_controls.page_state(pfn)["refcount"] == 2
    m.page_controls.put_page(pfn)
    res = mm.migrate(addr, 2 * ps, 1, mode=mode)
    assert res.status.tolist() == [0, 0] and res.nr_succeeded == 1
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_get_put_page_controls(m, mm):
    addr, _ = filled(m, mm, 1)
    pfn = mm.pfn_of(addr)
    with pytest.raises(InvalidArgument):
        m.page_controls.put_page(pfn)  # no extra reference to drop
    free_pfn = m.nodes[2].base_pfn
    with pytest.raises(InvalidArgument):
        m.page_controls.get_page(free_pfn)
    with pytest.raises(InvalidArgument):
        m.page_controls.get_page(10**9)


def test_sync_retries_failed_folios_one_at_a_time(m, mm, monkeypatch):
    from dmamig.migrate import batch_loops

    # The general path's unmap passes, counted (a fused batch makes the first in its own compiled call).
    monkeypatch.setattr(batch_loops, "fused_batch", None)
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    stuck = [mm.pfn_of(addr), mm.pfn_of(addr + 3 * ps)]
    for pfn in stuck:
        m.page_controls.get_page(pfn)
    sizes = []
    real = core._Migration._unmap_pass

    def spy(self, todo, mode):
        sizes.append(todo.size)
        return real(self, todo, mode)

    monkeypatch.setattr(core._Migration, "_unmap_pass", spy)
    res = mm.migrate(addr, 4 * ps, 1, mode=MigrateMode.SYNC)
    assert res.status.tolist() == [EAGAIN, 0, 0, EAGAIN]
    async_passes = core.NR_MAX_MIGRATE_ASYNC_RETRY
    sync_passes = core.NR_MAX_MIGRATE_SYNC_RETRY
    # migrate_pages_sync(): one batched ASYNC unmap, the two busy folios stay unmapped through its move passes;
    # then each alone in SYNC: unmapped once more, moved up to NR_MAX_MIGRATE_SYNC_RETRY times.
    assert sizes == [4, 1, 1]
    assert res.stats.nr_move_passes == async_passes + 2 * sync_passes
    assert res.stats.nr_passes == async_passes + 2 * sync_passes
    assert res.nr_failed == 2 and res.rc == 2
    for pfn in stuck:
        m.page_controls.put_page(pfn)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_reference_dropped_between_passes_is_retried(m, mm, monkeypatch, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 3)
    pfn = mm.pfn_of(addr + ps)
    m.page_controls.get_page(pfn)
    calls = []
    real = core._Migration._move_pass

    def drop_on_second_pass(self, moving):
        calls.append(moving.size)
        if len(calls) == 2:
            m.page_controls.put_page(pfn)  # the speculative reference goes away before the second move pass
        return real(self, moving)

    monkeypatch.setattr(core._Migration, "_move_pass", drop_on_second_pass)
    res = mm.migrate(addr, 3 * ps, 1, mode=mode)
    assert res.status.tolist() == [0, 0, 0]
    assert res.nr_succeeded == 3 and res.nr_failed == 0
    # migrate_pages_batch(): a folio whose move meets an extra reference stays unmapped and locked, and the
    # move loop retries it; it is not remapped and unmapped again.
    assert calls == [3, 1]
    assert res.stats.nr_unmap_passes == 1 and res.stats.nr_move_passes == 2 and res.stats.nr_tlb_flush == 1
    assert np.array_equal(mm.read(addr, 3 * ps), data)


def test_reference_taken_during_the_copy_fails_the_page(m, mm, monkeypatch):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    real = m.frames.copy_folios
    taken = []

    def copy_and_grab(src, dst):
        real(src, dst)
        if not taken:
            m.page_controls.get_page(pfn)  # a speculative lookup races with the copy: the freeze must see it
            taken.append(pfn)

    monkeypatch.setattr(m.frames, "copy_folios", copy_and_grab)
    res = mm.migrate(addr, 2 * ps, 1, mode=MigrateMode.ASYNC)
    assert res.status.tolist() == [EAGAIN, 0]
    assert mm.pfn_of(addr) == pfn
    assert m.page_controls.page_state(pfn)["refcount"] == 2
    m.page_controls.put_page(pfn)
    assert np.array_equal(mm.read(addr, 2 * ps), data)


@pytest.mark.parametrize("engine", [False, True], ids=["copy", "no-copy"])
def test_an_exception_in_the_copy_leaves_every_page_mapped(m, mm, monkeypatch, engine):
    """A copy that raises (a backend failure, an interrupt) propagates, but no page stays unmapped or taken."""
    ps = m.page_size
    addr, data = filled(m, mm, 1100)
    pfns = np.array([mm.pfn_of(addr + i * ps) for i in range(1100)])

    class Boom(Exception):
        pass

    def boom(*args):
        raise Boom("copy failed")

    if engine:
        monkeypatch.setattr(m.dma, "copy", boom)
        monkeypatch.setattr(RingBatches, "wait", boom)  # fused batches wait for their copy there
    else:
        monkeypatch.setattr(m.frames, "copy_folios", boom)
    with pytest.raises(Boom):
        mm.migrate(addr, 1100 * ps, 1, engine=m.dma if engine else None)
    monkeypatch.undo()
    job = Background(lambda: mm.nodes_of(addr, 1100 * ps))  # would wait forever behind migration entries
    assert (job.join() == 0).all()
    assert np.array_equal(np.array([mm.pfn_of(addr + i * ps) for i in range(1100)]), pfns)
    assert [n.free_pages for n in m.nodes] == [HOST - 1100, DEV, DEV]
    for pfn in pfns[[0, 600, 1099]].tolist():
        st = m.page_controls.page_state(pfn)
        assert st["refcount"] == st["mapcount"] == 1
        assert PageFlag.ISOLATED not in st["flags"] and PageFlag.LOCKED not in st["flags"]
    assert np.array_equal(mm.read(addr, 1100 * ps), data)
    res = mm.migrate(addr, 1100 * ps, 1)
    assert res.ok


# -- ENOMEM ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_target_full_fails_the_pages_that_do_not_fit(m, mm, mode):
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    held = m.alloc_pages(1, DEV - 3)
    before = m.vmstat
    res = mm.migrate(addr, 8 * ps, 1, mode=mode)
    st = res.status
    # migrate_pages_batch(): the fourth page finds no frame; -ENOMEM ends the call. The three unmapped pages
    # still move; the fourth fails; the last four are never tried: not failed, not retried.
    assert st.tolist() == [0, 0, 0] + [ENOMEM] * 5
    assert res.nr_succeeded == 3 and res.nr_failed == 1 and res.stats.nr_untried_pages == 4
    assert res.rc == ENOMEM
    assert delta(m, before) == {"pgmigrate_success": 3, "pgmigrate_fail": 1, "migrate_tlb_flush": 1}
    nodes = mm.nodes_of(addr, 8 * ps)
    assert (nodes[st == 0] == 1).all() and (nodes[st == ENOMEM] == 0).all()
    assert m.nodes[1].free_pages == 0
    assert np.array_equal(mm.read(addr, 8 * ps), data)
    m.put_pages(held)
    mm.close()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_enomem_is_not_retried(m, mm):
    addr, _ = filled(m, mm, 1)
    held = m.alloc_pages(1, DEV)
    res = mm.migrate(addr, m.page_size, 1, mode=MigrateMode.SYNC)
    assert res.status.tolist() == [ENOMEM]
    assert res.stats.nr_passes == 1
    m.put_pages(held)


# -- the low-level migrate_pages -------------------------------------------------------------------------------
def test_migrate_pages_by_pfn(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    pfns = np.array([mm.pfn_of(addr + i * ps) for i in range(4)])
    res = m.migrate_pages(pfns[[1, 3]], 2)
    assert res.status.tolist() == [0, 0] and res.nr_succeeded == 2
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0, 2, 0, 2]
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_migrate_pages_statuses_for_odd_pfns(m, mm):
    addr, _ = filled(m, mm, 2)
    mapped = mm.pfn_of(addr)
    free_pfn = int(m.nodes[0].base_pfn + HOST - 1)
    driver = int(m.alloc_pages(0, 1)[0])
    res = m.migrate_pages([mapped, free_pfn, driver, mapped], 1)
    assert res.status.tolist() == [0, ENOENT, EBUSY, 0]
    assert res.nr_succeeded == 1
    assert m.page_controls.page_state(driver)["refcount"] == 1
    m.put_pages([driver])
    with pytest.raises(InvalidArgument):
        m.migrate_pages([], 1)
    with pytest.raises(InvalidArgument):
        m.migrate_pages([10**9], 1)
    with pytest.raises(InvalidArgument):
        m.migrate_pages(np.array([1.0]), 1)
    with pytest.raises(InvalidArgument):
        m.migrate_pages([mapped], 3)


def test_migrate_pages_across_address_spaces_counts_batches(m):
    ps = m.page_size
    spaces = [m.address_space() for _ in range(2)]
    pfns = []
    for i, s in enumerate(spaces):
        addr = s.mmap(512 * ps)
        s.write(addr, rand(512 * ps, i))
        pfns.append(np.array([s.pfn_of(addr + j * ps) for j in range(512)]))
    res = m.migrate_pages(np.concatenate(pfns), 1)
    assert res.nr_succeeded == 1024 and res.stats.nr_tlb_flush == 2
    for i, s in enumerate(spaces):
        addr = s.vmas[0].start
        assert (s.nodes_of(addr, 512 * ps) == 1).all()
        assert np.array_equal(s.read(addr, 512 * ps), rand(512 * ps, i))
        s.close()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_page_isolated_by_one_migration_is_ebusy_for_another(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    m.page_controls.lock_page(pfn)
    first = Background(lambda: mm.migrate(addr, ps, 1, mode=MigrateMode.SYNC))
    wait_until(lambda: PageFlag.ISOLATED in m.page_controls.page_flags(pfn), "the first migration to isolate the page")
    second = m.migrate_pages([pfn], 2, mode=MigrateMode.ASYNC)
    assert second.status.tolist() == [EBUSY]
    m.page_controls.unlock_page(pfn)
    assert first.join().status.tolist() == [0]
    assert mm.node_of(addr) == 1
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_a_write_to_the_source_during_a_cpu_copy_leaves_the_copy_stale():
    # A pin holder can write an unmapped source while the migrating thread copies it (the fallback copy after a
    # failed DMA copy checks no reference first). The copy's write stamp is drawn before it starts, so such a
    # write counts as newer and the move copies again instead of moving state over the old bytes.
    m = Machine(host_pages=1024, device_pages=1024, devices=1, backend="cpu", channels=1)
    try:
        src = m.frames.alloc_folios(0, 1, 9)
        dst = m.frames.alloc_folios(1, 1, 9)
        base = m.pages.expand(src)
        m.frames.write_pfns(base, np.zeros((512, m.page_size), dtype=np.uint8))
        real = m.backend.copy_folios

        def copy_then_write(*args, **kw):
            real(*args, **kw)  # the copy has read the source...
            m.frames.write_pfns(base[:1], np.full((1, m.page_size), 7, dtype=np.uint8))  # ...then a write lands

        m.backend.copy_folios = copy_then_write
        m.frames.copy_folios(src, dst)
        assert not m.pages.copies_current(src, dst, m.pages.nr_pages(src))[0]
    finally:
        m.close()
