"""MigrateVma: driver-driven device migration, step by step (setup, alloc_and_copy, pages, finalize)."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from support import filled, finish_within, run_migrate_vma, used

from dmamig import InvalidArgument, Machine, MigratePfn, MigrateVma, PageFlag, PteFlag
from dmamig.check import check_machine
from dmamig.flags import MIGRATE_PFN_SHIFT

EBUSY, ENOMEM, EIO = -errno.EBUSY, -errno.ENOMEM, -errno.EIO
HOST = DEV = 2048
VALID, MIGRATE, WRITE = int(MigratePfn.VALID), int(MigratePfn.MIGRATE), int(MigratePfn.WRITE)


@pytest.fixture(params=["cpu-copy", "dma"])
def engine(request, m):
    """No engine (the driver copies on its thread) or the machine's DMA engine."""
    if request.param == "cpu-copy":
        return None
    pytest.importorskip("dmamig.dma")
    return m.dma


def run(mv: MigrateVma, engine=None) -> MigrateVma:
    mv.setup()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    return mv


def test_full_range_migrates(m, mm, engine):
    ps = m.page_size
    addr, data = filled(m, mm, 16)
    pfns = [mm.pfn_of(addr + i * ps) for i in range(16)]
    before = m.vmstat
    mv = MigrateVma(mm, addr, addr + 16 * ps, 1)
    assert mv.setup() == 16 and mv.cpages == 16
    assert (mv.src >> MIGRATE_PFN_SHIFT).tolist() == pfns
    assert ((mv.src & 0x3F) == (VALID | MIGRATE | WRITE)).all()
    mv.alloc_and_copy(engine=engine)
    dst = mv.dst >> MIGRATE_PFN_SHIFT
    assert (m.nodemap.node_of(dst) == 1).all()
    assert ((mv.dst & VALID) != 0).all()
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * 16
    assert [mm.pfn_of(addr + i * ps) for i in range(16)] == dst.tolist()
    assert (mm.nodes_of(addr, 16 * ps) == 1).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 16, DEV]
    d = m.vmstat
    # migrate_device.c counts no pgmigrate_* events; MigrateVma has counters of its own.
    assert {k: d[k] - before[k] for k in d if d[k] != before[k]} == {"migrate_vma_success": 16,
                                                                      "migrate_tlb_flush": 1}
    for pfn in dst.tolist():
        st = m.page_controls.page_state(pfn)
        assert st["refcount"] == st["mapcount"] == 1
        assert PageFlag.LOCKED not in st["flags"] and PageFlag.ISOLATED not in st["flags"]
        assert PageFlag.LRU in st["flags"]
    assert np.array_equal(mm.read(addr, 16 * ps), data)


def test_setup_unmaps_and_accessors_wait_for_finalize(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    mv.setup()
    assert PteFlag.MIGRATION in mm.pte_flags(addr)
    src = int(mv.src[0] >> MIGRATE_PFN_SHIFT)
    assert PageFlag.LOCKED in m.page_controls.page_flags(src)
    out = {}
    reader = threading.Thread(target=lambda: out.update(data=mm.read(addr, 4 * ps)), daemon=True)
    reader.start()
    mv.alloc_and_copy()
    mv.pages()
    reader.join(0.05)
    assert reader.is_alive()  # the migration entries hold it until finalize
    mv.finalize()
    reader.join(30)
    assert not reader.is_alive()
    assert np.array_equal(out["data"], data)


def test_holes_get_zero_filled_pages(m, mm, engine):
    ps = m.page_size
    addr = mm.mmap(6 * ps)
    mm.write(addr + ps, b"one")
    mm.write(addr + 4 * ps, b"four")
    mv = MigrateVma(mm, addr, addr + 6 * ps, 2)
    assert mv.setup() == 6
    holes = [0, 2, 3, 5]
    assert ((mv.src[holes] & 0x3F) == MIGRATE).all()
    assert (mv.src[holes] >> MIGRATE_PFN_SHIFT == 0).all()
    m.alloc_pages(2, 1)
    dirty = m.alloc_pages(2, 8)
    m.frames.write_pfns(dirty, np.full((8, ps), 0x5A, np.uint8))
    m.put_pages(dirty)  # recycled frames: holes must still read as zeros
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * 6
    assert (mm.nodes_of(addr, 6 * ps) == 2).all()
    for i in holes:
        st = m.page_controls.page_state(mm.pfn_of(addr + i * ps))
        assert st["refcount"] == st["mapcount"] == 1 and st["index"] == i
    out = mm.read(addr, 6 * ps)
    assert out[ps: ps + 3].tobytes() == b"one" and out[4 * ps: 4 * ps + 4].tobytes() == b"four"
    out[ps: ps + 3] = 0
    out[4 * ps: 4 * ps + 4] = 0
    assert not out.any()


def test_shared_mapping_is_not_migrated(m, mm, engine):
    ps = m.page_size
    addr, data = filled(m, mm, 4, shared=True)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    assert mv.setup() == 0
    assert not (mv.src & MIGRATE).any()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    assert (mv.status == EBUSY).all()
    assert (mm.nodes_of(addr, 4 * ps) == 0).all()
    assert np.array_equal(mm.read(addr, 4 * ps), data)
    assert [n.free_pages for n in m.nodes] == [HOST - 4, DEV, DEV]


def test_pinned_locked_and_resident_pages_are_not_selected(m, mm, engine):
    ps = m.page_size
    addr, data = filled(m, mm, 6)
    mm.migrate(addr + 5 * ps, ps, 1)  # already on the target
    mm.pin(addr + ps, ps)
    locked = mm.pfn_of(addr + 3 * ps)
    m.page_controls.lock_page(locked)
    mv = MigrateVma(mm, addr, addr + 6 * ps, 1)
    assert mv.setup() == 3
    assert [bool(s & MIGRATE) for s in mv.src.tolist()] == [True, False, True, False, True, False]
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0, EBUSY, 0, EBUSY, 0, EBUSY]
    assert mm.nodes_of(addr, 6 * ps).tolist() == [1, 0, 1, 0, 1, 1]
    st = m.page_controls.page_state(mm.pfn_of(addr + ps))
    assert st["refcount"] == 2 and PageFlag.ISOLATED not in st["flags"]
    m.page_controls.unlock_page(locked)
    mm.unpin(addr + ps, ps)
    assert np.array_equal(mm.read(addr, 6 * ps), data)


def test_transient_reference_between_setup_and_pages_keeps_the_page(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    mv.setup()
    pfn = int(mv.src[0] >> MIGRATE_PFN_SHIFT)
    m.page_controls.get_page(pfn)
    mv.alloc_and_copy()
    mv.pages()
    assert not mv.src[0] & MIGRATE
    mv.finalize()
    assert mv.status.tolist() == [-errno.EAGAIN, 0]
    assert mm.pfn_of(addr) == pfn
    assert m.page_controls.page_state(pfn)["refcount"] == 2
    m.page_controls.put_page(pfn)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    mm.close()
    assert used(m) == 0


def test_read_only_pte_gives_entries_without_write(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    with m.lock:
        mm.vmas[0].pte_flags[1] &= np.uint8(~np.uint8(PteFlag.WRITE))
    mv = run(MigrateVma(mm, addr, addr + 2 * ps, 1))
    assert mv.src[0] & WRITE and not mv.src[1] & WRITE
    assert mv.dst[0] & WRITE and not mv.dst[1] & WRITE
    assert PteFlag.WRITE not in mm.pte_flags(addr + ps)
    assert PteFlag.WRITE in mm.pte_flags(addr)
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_target_short_of_frames(m, mm, engine):
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    held = m.alloc_pages(1, DEV - 5)
    mv = run(MigrateVma(mm, addr, addr + 8 * ps, 1), engine)
    assert int((mv.status == 0).sum()) == 5 and int((mv.status == ENOMEM).sum()) == 3
    nodes = mm.nodes_of(addr, 8 * ps)
    assert (nodes[mv.status == 0] == 1).all() and (nodes[mv.status != 0] == 0).all()
    assert np.array_equal(mm.read(addr, 8 * ps), data)
    m.put_pages(held)
    mm.close()
    assert used(m) == 0


def test_dma_error_keeps_every_page(m, mm):
    pytest.importorskip("dmamig.dma")
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    pfns = [mm.pfn_of(addr + i * ps) for i in range(8)]
    m.dma.inject_errors(1)
    mv = run(MigrateVma(mm, addr, addr + 8 * ps, 1), m.dma)
    assert (mv.status == EIO).all()
    assert [mm.pfn_of(addr + i * ps) for i in range(8)] == pfns
    assert [n.free_pages for n in m.nodes] == [HOST - 8, DEV, DEV]
    assert np.array_equal(mm.read(addr, 8 * ps), data)
    mv2 = run(MigrateVma(mm, addr, addr + 8 * ps, 1), m.dma)
    assert (mv2.status == 0).all()
    assert np.array_equal(mm.read(addr, 8 * ps), data)


def test_thp_range_is_split_and_migrated(m, mm, engine):
    ps = m.page_size
    addr, data = filled(m, mm, 512, order=9)
    before = m.vmstat
    mv = run(MigrateVma(mm, addr, addr + 512 * ps, 1), engine)
    assert (mv.status == 0).all() and mv.cpages == 512
    assert m.vmstat["thp_migration_split"] - before["thp_migration_split"] == 1
    assert (mm.nodes_of(addr, 512 * ps) == 1).all()
    assert m.nodes[0].free_pages == HOST
    assert np.array_equal(mm.read(addr, 512 * ps), data)


def test_part_of_a_mapping(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    mv = run(MigrateVma(mm, addr + 2 * ps, addr + 5 * ps, 2))
    assert mv.npages == 3 and (mv.status == 0).all()
    assert mm.nodes_of(addr, 8 * ps).tolist() == [0, 0, 2, 2, 2, 0, 0, 0]
    assert np.array_equal(mm.read(addr, 8 * ps), data)


def test_round_trips(m, mm, engine):
    """The selftests' migrate_multiple: there and back again, ten times."""
    ps = m.page_size
    addr, data = filled(m, mm, 32)
    for i in range(10):
        node = (1, 2, 0)[i % 3]
        mv = run(MigrateVma(mm, addr, addr + 32 * ps, node), engine)
        assert (mv.status == 0).all()
        assert (mm.nodes_of(addr, 32 * ps) == node).all()
    assert used(m) == 32
    assert np.array_equal(mm.read(addr, 32 * ps), data)


def test_device_page_touched_by_the_cpu_comes_back(m, mm):
    """migrate_fault: half of a device range touched by the CPU migrates back; the rest stays."""
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    run(MigrateVma(mm, addr, addr + 8 * ps, 1))
    before = m.vmstat["migrate_to_ram"]
    assert np.array_equal(mm.read(addr, 4 * ps), data[: 4 * ps])
    assert m.vmstat["migrate_to_ram"] - before == 4
    assert mm.nodes_of(addr, 8 * ps).tolist() == [0] * 4 + [1] * 4
    mv = run(MigrateVma(mm, addr, addr + 8 * ps, 1))
    assert mv.cpages == 4 and (mv.status[:4] == 0).all()
    assert np.array_equal(mm.read(addr, 8 * ps), data)


# -- argument and step-order errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unaligned-start", "unaligned-end", "empty", "reversed", "bad-node",
                                  "float-start"])
def test_bad_constructor_arguments(m, mm, case):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    start, end, node = {
        "unaligned-start": (addr + 1, addr + ps, 1), "unaligned-end": (addr, addr + 100, 1),
        "empty": (addr, addr, 1), "reversed": (addr + ps, addr, 1), "bad-node": (addr, addr + ps, 3),
        "float-start": (float(addr), addr + ps, 1),
    }[case]
    with pytest.raises(InvalidArgument):
        MigrateVma(mm, start, end, node)


def test_range_must_lie_in_one_mapping(m, mm):
    ps = m.page_size
    a, data = filled(m, mm, 2)
    b = mm.mmap(2 * ps)
    for start, end in ((a, b + ps), (a + ps, a + 3 * ps), (a - 4 * ps, a)):
        mv = MigrateVma(mm, start, end, 1)
        with pytest.raises(InvalidArgument):
            mv.setup()
    assert mm.nodes_of(a, 2 * ps).tolist() == [0, 0]
    assert PteFlag.MIGRATION not in mm.pte_flags(a)
    assert np.array_equal(mm.read(a, 2 * ps), data)


def test_steps_must_run_in_order(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    for wrong in (mv.pages, mv.finalize, mv.alloc_and_copy):
        with pytest.raises(InvalidArgument, match="order"):
            wrong()
    mv.setup()
    with pytest.raises(InvalidArgument):
        mv.setup()
    with pytest.raises(InvalidArgument):
        mv.pages()
    with pytest.raises(InvalidArgument):
        mv.finalize()
    mv.alloc_and_copy()
    with pytest.raises(InvalidArgument):
        mv.alloc_and_copy()
    with pytest.raises(InvalidArgument):
        mv.finalize()
    mv.pages()
    mv.finalize()
    with pytest.raises(InvalidArgument):
        mv.finalize()
    assert (mv.status == 0).all()
    assert np.array_equal(mm.read(addr, 2 * ps), data)


def test_failed_setup_can_be_retried_after_mapping(m, mm):
    ps = m.page_size
    addr = mm.mmap(ps)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    with pytest.raises(InvalidArgument):
        mv.setup()
    mm.munmap(addr, ps)
    with pytest.raises(InvalidArgument):
        mv.setup()


def test_reference_taken_after_pages_keeps_the_old_page_alive(m, mm):
    """A speculative reference on the old page after pages(): finalize drops only its own reference."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    mv.setup()
    mv.alloc_and_copy()
    mv.pages()
    old = int(mv.src[0] >> MIGRATE_PFN_SHIFT)
    m.page_controls.get_page(old)
    mv.finalize()
    assert (mv.status == 0).all()
    assert mm.node_of(addr) == 1
    assert m.page_controls.page_state(old)["refcount"] == 1  # still allocated: the reference holder frees it
    assert m.nodes[0].free_pages == HOST - 1
    m.page_controls.put_page(old)
    assert m.nodes[0].free_pages == HOST
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    mm.close()
    assert used(m) == 0


def test_transient_reference_outlives_munmap(m, mm):
    ps = m.page_size
    addr, _ = filled(m, mm, 1)
    pfn = mm.pfn_of(addr)
    m.page_controls.get_page(pfn)
    mm.munmap(addr, ps)
    assert m.nodes[0].free_pages == HOST - 1
    m.page_controls.put_page(pfn)
    assert m.nodes[0].free_pages == HOST
    with pytest.raises(InvalidArgument):
        m.page_controls.put_page(pfn)


def test_reference_taken_on_destinations_survives(m, mm):
    """pfn walkers that find a destination (or a hole's new page) before the remap keep their references."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr, b"data")  # page 1 stays a hole
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    mv.setup()
    mv.alloc_and_copy()
    dst = (mv.dst >> MIGRATE_PFN_SHIFT).tolist()
    for pfn in dst:
        m.page_controls.get_page(pfn)
    mv.pages()
    mv.finalize()
    assert (mv.status == 0).all()
    assert [mm.pfn_of(addr), mm.pfn_of(addr + ps)] == dst
    for pfn in dst:
        assert m.page_controls.page_state(pfn)["refcount"] == 2
        m.page_controls.put_page(pfn)
        assert m.page_controls.page_state(pfn)["refcount"] == 1
    assert m.nodes[1].free_pages == DEV - 2
    assert mm.read(addr, 4).tobytes() == b"data"
    mm.close()
    assert used(m) == 0


def test_partly_unmapped_thp_is_split_without_leaking(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, 512, order=9)
    mm.munmap(addr, 100 * ps)
    assert m.nodes[0].free_pages == HOST - 512  # the folio keeps its unmapped pages until it is split
    mv = run(MigrateVma(mm, addr + 100 * ps, addr + 512 * ps, 1))
    assert (mv.status == 0).all()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 412, DEV]
    assert np.array_equal(mm.read(addr + 100 * ps, 412 * ps), data[100 * ps:])
    mm.close()
    assert used(m) == 0


def test_migrate_vma_on_every_backend(backend):
    """The driver flow on each backend (CUDA where a GPU is usable), with the CPU copy and the DMA engine."""
    mach = Machine(host_pages=1024, device_pages=1024, devices=1, backend=backend, channels=2)
    try:
        ps = mach.page_size
        mm = mach.address_space()
        addr, data = filled(mach, mm, 64, seed=21)
        for engine in (None, mach.dma):
            mv = run(MigrateVma(mm, addr, addr + 64 * ps, 1), engine)
            assert (mv.status == 0).all() and (mm.nodes_of(addr, 64 * ps) == 1).all()
            assert np.array_equal(mm.read(addr, 64 * ps), data)
        finish_within(mm.close, "AddressSpace.close")
        assert [n.free_pages for n in mach.nodes] == [1024, 1024]
    finally:
        finish_within(mach.close, "Machine.close")


def test_holes_are_filled_after_a_munmap_elsewhere_split_the_mapping(m, mm):
    # A munmap outside the migrated range, between setup() and finalize(), splits the VMA: the hole's new page
    # must land in the piece that now covers it, not in the VMA object setup() saw.
    a = mm.mmap(8 * m.page_size)
    mm.write(a, b"\x11" * m.page_size)  # page 0 present, page 1 a hole
    mv = MigrateVma(mm, a, a + 2 * m.page_size, 1)
    assert mv.setup() == 2
    mv.alloc_and_copy()
    mv.pages()
    mm.munmap(a + 4 * m.page_size, 2 * m.page_size)
    mv.finalize()
    assert mv.status.tolist() == [0, 0]
    assert mm.node_of(a + m.page_size) == 1 and mm.node_of(a) == 1
    assert mm.read(a + m.page_size, m.page_size).tobytes() == bytes(m.page_size)
    assert mm.read(a, m.page_size).tobytes() == b"\x11" * m.page_size
    mm.close()
    assert [n.free_pages for n in m.nodes] == [n.total_pages for n in m.nodes]


def test_migrate_vma_takes_a_swap_cache_page_out_on_its_way_to_the_device(m, mm):
    """migrate_vma_check_page counts the swap cache's reference as the mapping's (the page is not pinned);
    migrate_vma_pages takes a folio bound for device memory out of the swap cache (folio_free_swap)."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    m.page_controls.set_page_flags(pfn, PageFlag.SWAPCACHE)
    mv = run_migrate_vma(mm, addr, addr + 2 * ps, 1)
    assert mv.cpages == 2 and mv.status.tolist() == [0, 0]
    dev = m.page_controls.page_state(mm.pfn_of(addr))
    assert dev["node"] == 1 and PageFlag.SWAPCACHE not in dev["flags"] and dev["refcount"] == 1
    assert not check_machine(m)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
