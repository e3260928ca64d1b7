"""An unfinished MigrateVma never hangs the process: abort(), the context manager, and close() in flight."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support import filled, finish_within, used

from dmamig import InvalidArgument, Machine, MigrateVma, PageFlag, PteFlag
from dmamig.flags import MIGRATE_PFN_SHIFT

HOST = DEV = 1024
STEPS = ["setup", "alloc_and_copy", "pages"]


def run_until(mv: MigrateVma, last: str, engine=None) -> None:
    """Run the driver's steps up to and including ``last``."""
    for step in STEPS[: STEPS.index(last) + 1]:
        getattr(mv, step)(engine) if step == "alloc_and_copy" else getattr(mv, step)()


def assert_restored(m, mm, addr: int, data: np.ndarray, node: int = 0) -> None:
    n = data.size // m.page_size
    assert PteFlag.MIGRATION not in mm.pte_flags(addr)
    assert (mm.nodes_of(addr, data.size) == node).all()
    for pfn in mm.pfns_of(addr, data.size).tolist():
        st = m.page_controls.page_state(pfn)
        assert st["refcount"] == st["mapcount"] == 1
        assert not st["flags"] & (PageFlag.LOCKED | PageFlag.ISOLATED) and PageFlag.LRU in st["flags"]
    out = {}
    finish_within(lambda: out.update(data=mm.read(addr, data.size)), "mm.read")
    assert np.array_equal(out["data"], data)
    assert used(m) == n  # the destinations were freed


@pytest.mark.parametrize("last", ["setup", "alloc_and_copy"])
def test_abort_restores_every_page(m, mm, last):
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    mm.munmap(addr + 7 * ps, ps)  # keep the range to the mapped pages
    data = data[: 7 * ps]
    before = m.vmstat
    mv = MigrateVma(mm, addr, addr + 7 * ps, 1)
    run_until(mv, last, m.dma)
    mv.abort()
    assert_restored(m, mm, addr, data)
    assert m.vmstat["migrate_vma_fail"] - before["migrate_vma_fail"] == 7
    assert m.vmstat["migrate_vma_success"] == before["migrate_vma_success"]
    mv.abort()  # idempotent
    with pytest.raises(InvalidArgument, match="aborted"):
        mv.pages()


def test_abort_of_a_range_with_holes_frees_their_pages(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.write(addr, b"kept")
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    run_until(mv, "alloc_and_copy")
    mv.abort()
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0, -1, -1, -1]
    assert used(m) == 1
    assert mm.read(addr, 4).tobytes() == b"kept"


def test_abort_after_pages_completes_the_migration(m, mm):
    """After pages() the state has moved (the kernel's commit point): abort finishes as finalize does."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    run_until(mv, "pages")
    mv.abort()
    assert mv.status.tolist() == [0] * 4
    assert (mm.nodes_of(addr, 4 * ps) == 1).all() and used(m) == 4
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_abort_before_setup_and_after_finalize_changes_nothing(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    mv.abort()
    with pytest.raises(InvalidArgument, match="aborted"):
        mv.setup()
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    run_until(mv, "pages")
    mv.finalize()
    mv.abort()
    assert (mm.nodes_of(addr, 2 * ps) == 1).all() and used(m) == 2


@pytest.mark.parametrize("last", STEPS)
def test_driver_exception_in_context_manager_restores_and_propagates(m, mm, last):
    ps = m.page_size
    addr, data = filled(m, mm, 6)

    def driver():
        with MigrateVma(mm, addr, addr + 6 * ps, 1) as mv:
            run_until(mv, last, m.dma)
            raise RuntimeError("driver failed")

    with pytest.raises(RuntimeError, match="driver failed"):
        finish_within(driver, "MigrateVma.__exit__")
    node = 1 if last == "pages" else 0  # pages() moved the state: the migration completes
    assert (mm.nodes_of(addr, 6 * ps) == node).all() and used(m) == 6
    out = {}
    finish_within(lambda: out.update(data=mm.read(addr, 6 * ps)), "mm.read")
    assert np.array_equal(out["data"], data)


def test_context_manager_with_finalize_migrates(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 3)
    with MigrateVma(mm, addr, addr + 3 * ps, 2) as mv:
        run_until(mv, "pages", m.dma)
        mv.finalize()
    assert mv.status.tolist() == [0, 0, 0] and (mm.nodes_of(addr, 3 * ps) == 2).all()
    assert np.array_equal(mm.read(addr, 3 * ps), data)


@pytest.mark.parametrize("last", STEPS)
def test_address_space_close_aborts_an_unfinished_migration(m, last):
    mm = m.address_space()
    addr, _ = filled(m, mm, 5)
    mv = MigrateVma(mm, addr, addr + 5 * m.page_size, 1)
    run_until(mv, last)
    finish_within(mm.close, "AddressSpace.close")
    assert used(m) == 0
    assert not mv.in_flight
    with pytest.raises(InvalidArgument):
        mv.finalize()


def test_machine_close_aborts_an_unfinished_migration():
    m = Machine(host_pages=256, device_pages=256, devices=1, backend="cpu", channels=2)
    mm = m.address_space()
    addr, _ = filled(m, mm, 16)
    mv = MigrateVma(mm, addr, addr + 16 * m.page_size, 1)
    run_until(mv, "alloc_and_copy", m.dma)
    finish_within(m.close, "Machine.close")
    assert [n.free_pages for n in m.nodes] == [256, 256]


def test_reader_blocked_on_an_unfinished_migration_is_released_by_abort(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    mv.setup()
    out = {}
    reader = threading.Thread(target=lambda: out.update(data=mm.read(addr, 4 * ps)), daemon=True)
    reader.start()
    reader.join(0.05)
    assert reader.is_alive()
    mv.abort()
    reader.join(30)
    assert not reader.is_alive() and np.array_equal(out["data"], data)


def test_close_waits_for_a_copy_running_on_another_thread(m):
    """close() during alloc_and_copy's copy lets the copy land before it frees the destinations."""
    mm = m.address_space()
    ps = m.page_size
    addr, _ = filled(m, mm, 8)
    mv = MigrateVma(mm, addr, addr + 8 * ps, 1)
    mv.setup()
    entered, release = threading.Event(), threading.Event()
    real = m.frames.copy_pages

    def slow_copy(src, dst):
        entered.set()
        release.wait(30)
        real(src, dst)

    m.frames.copy_pages = slow_copy
    driver = threading.Thread(target=mv.alloc_and_copy, daemon=True)
    driver.start()
    assert entered.wait(30)
    closer = threading.Thread(target=mm.close, daemon=True)
    closer.start()
    closer.join(0.05)
    assert closer.is_alive()  # waits for the copy, which writes the destinations
    dst = (mv.dst >> MIGRATE_PFN_SHIFT)[mv.dst != 0]
    assert (m.nodemap.node_of(dst) == 1).all() and m.nodes[1].free_pages == DEV - 8
    release.set()
    driver.join(30)
    closer.join(30)
    assert not closer.is_alive() and used(m) == 0


def test_setup_on_a_closed_address_space_says_closed(m):
    mm = m.address_space()
    addr, _ = filled(m, mm, 1)
    mm.close()
    with pytest.raises(InvalidArgument, match="closed"):
        MigrateVma(mm, addr, addr + m.page_size, 1).setup()
