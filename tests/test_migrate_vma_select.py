"""MigrateVma selection flags (``struct migrate_vma.flags`` and ``pgmap_owner``), modelled on hmm-tests.c.

SYSTEM, DEVICE_PRIVATE and DEVICE_COHERENT choose which pages ``setup()`` collects (device pages only of the
caller's owner); COMPOUND migrates a PMD-sized folio whole (hmm-tests' migrate_anon_huge_*).
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from support import delta, filled, finish_within, rand

from dmamig import DeviceAccessor, InvalidArgument, Machine, MigratePfn, MigrateVma, PageFlag, UvmOptions
from dmamig import MigrateVmaSelect as Sel
from dmamig.check import check_machine
from dmamig.flags import MIGRATE_PFN_SHIFT
from dmamig.migrate.device import HPAGE_PMD_NR

EBUSY, EIO = -errno.EBUSY, -errno.EIO
HOST = DEV = 2048
VALID, MIGRATE, WRITE, COMPOUND = (int(f) for f in (MigratePfn.VALID, MigratePfn.MIGRATE, MigratePfn.WRITE,
                                                     MigratePfn.COMPOUND))
FLAGS = (1 << MIGRATE_PFN_SHIFT) - 1
NR = HPAGE_PMD_NR


@pytest.fixture(params=["cpu-copy", "dma"])
def engine(request, m):
    return None if request.param == "cpu-copy" else m.dma


@pytest.fixture(autouse=True)
def _consistent(request):
    """After each test on the shared machine: page state agrees with the page tables, nothing leaked."""
    mach = request.getfixturevalue("m") if "m" in request.fixturenames else None  # torn down after this one
    yield
    if mach is not None:
        assert check_machine(mach) == []


def run(mm, start, end, node, engine=None, **kw) -> MigrateVma:
    mv = MigrateVma(mm, start, end, node, **kw)
    mv.setup()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    return mv


def private_machine(**kw) -> Machine:
    kw = {"host_pages": HOST, "device_pages": DEV, "devices": 2, "backend": "cpu", "channels": 2, **kw}
    return Machine(device_memory="private", **kw)


def fragment(m, node: int) -> np.ndarray:
    """Leave ``node`` without a free PMD-sized block (one frame held in each); return the held frames."""
    nd = m.nodes[node]
    held = m.alloc_pages(node, nd.free_pages)
    keep = held[(held - nd.base_pfn) % NR == 0]
    m.put_pages(np.setdiff1d(held, keep))
    return keep


# -- which pages are selected ----------------------------------------------------------------------------------
def test_default_selects_every_page_as_before(m, mm):
    """flags=None: system and device pages of every owner, large folios split (MigrateVma's first contract)."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.migrate(addr, ps, 1)
    mm.migrate(addr + ps, ps, 2)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 0)
    assert mv.flags == Sel.SYSTEM | Sel.DEVICE_PRIVATE | Sel.DEVICE_COHERENT and mv.pgmap_owner is None
    assert mv.setup() == 2  # the two device pages; the host pages are on the target node already
    mv.abort()
    mv = run(mm, addr, addr + 4 * ps, 0, pgmap_owner=2)  # an owner narrows the device pages taken
    assert mv.cpages == 1 and mm.nodes_of(addr, 4 * ps).tolist() == [1, 0, 0, 0]
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_system_only_in_a_mixed_range(m, mm, engine):
    """SYSTEM collects system pages, the zero page and holes; device pages are left where they are."""
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    mm.migrate(addr + 2 * ps, 2 * ps, 1)  # pages 2, 3 on device 1
    b = mm.mmap(4 * ps)
    mm.write(b, data[: 2 * ps])
    assert (mm.read(b + 2 * ps, ps) == 0).all()  # page 2 of b: the zero page; page 3: nothing
    mv = MigrateVma(mm, b, b + 4 * ps, 2, flags=Sel.SYSTEM)
    assert mv.setup() == 4
    assert ((mv.src & FLAGS) == [VALID | MIGRATE | WRITE] * 2 + [MIGRATE] * 2).all()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * 4 and mm.nodes_of(b, 4 * ps).tolist() == [2] * 4
    mv = MigrateVma(mm, addr, addr + 5 * ps, 2, flags=Sel.SYSTEM)
    assert mv.setup() == 3
    assert (mv.src[2:4] == 0).all()  # device pages: not selected, not collected
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0, 0, EBUSY, EBUSY, 0]
    assert mm.nodes_of(addr, 5 * ps).tolist() == [2, 2, 1, 1, 2]
    assert np.array_equal(mm.read(addr, 5 * ps), data[: 5 * ps])
    assert np.array_equal(mm.read(b, 2 * ps), data[: 2 * ps])


def test_device_private_pages_of_another_owner_are_skipped():
    """hmm-tests' migrate to system memory: a driver collects its own device-private pages, never another's."""
    with private_machine() as m:
        ps = m.page_size
        mm = m.address_space()
        addr, data = filled(m, mm, 8)
        run(mm, addr, addr + 4 * ps, 1, flags=Sel.SYSTEM)
        run(mm, addr + 4 * ps, addr + 8 * ps, 2, flags=Sel.SYSTEM)
        assert mm.nodes_of(addr, 8 * ps).tolist() == [1] * 4 + [2] * 4
        for owner, node in ((1, 1), (2, 2)):
            mv = MigrateVma(mm, addr, addr + 8 * ps, 0, flags=Sel.DEVICE_PRIVATE, pgmap_owner=owner)
            assert mv.setup() == 4
            mine = slice(0, 4) if node == 1 else slice(4, 8)
            assert ((mv.src[mine] & FLAGS) == VALID | MIGRATE | WRITE).all()
            assert (np.delete(mv.src, np.arange(8)[mine]) == 0).all()
            mv.alloc_and_copy()
            mv.pages()
            mv.finalize()
        assert mm.nodes_of(addr, 8 * ps).tolist() == [0] * 8
        assert np.array_equal(mm.read(addr, 8 * ps), data)
        # System pages and an owner that matches no device: nothing but holes is collected.
        assert MigrateVma(mm, addr, addr + 8 * ps, 1, flags=Sel.DEVICE_PRIVATE, pgmap_owner=7).setup() == 0
        mm.close()


def test_device_kind_must_match_the_machine(m, mm):
    """Coherent device pages are selected by DEVICE_COHERENT only; device-private ones by DEVICE_PRIVATE only."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.migrate(addr, 4 * ps, 1)
    assert run(mm, addr, addr + 4 * ps, 0, flags=Sel.DEVICE_PRIVATE | Sel.SYSTEM, pgmap_owner=1).cpages == 0
    mv = run(mm, addr, addr + 4 * ps, 0, flags=Sel.DEVICE_COHERENT, pgmap_owner=1)
    assert mv.cpages == 4 and mv.status.tolist() == [0] * 4
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0] * 4
    with private_machine() as pm:
        pmm = pm.address_space()
        b, pdata = filled(pm, pmm, 4)
        run(pmm, b, b + 4 * ps, 1, flags=Sel.SYSTEM)
        assert run(pmm, b, b + 4 * ps, 0, flags=Sel.DEVICE_COHERENT, pgmap_owner=1).cpages == 0
        assert run(pmm, b, b + 4 * ps, 0, flags=Sel.DEVICE_PRIVATE, pgmap_owner=1).cpages == 4
        assert np.array_equal(pmm.read(b, 4 * ps), pdata)
        pmm.close()
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_device_to_device_needs_the_source_owner(m, mm):
    """Moving pages from one device to another: the caller names the owner of the pages it takes."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.migrate(addr, 4 * ps, 1)
    assert run(mm, addr, addr + 4 * ps, 2, flags=Sel.DEVICE_COHERENT, pgmap_owner=2).cpages == 0
    assert run(mm, addr, addr + 4 * ps, 2, flags=Sel.DEVICE_COHERENT, pgmap_owner=1).cpages == 4
    assert mm.nodes_of(addr, 4 * ps).tolist() == [2] * 4
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_nodes_sharing_an_owner_are_collected_together(m, mm):
    ps = m.page_size
    assert [nd.owner for nd in m.nodes] == [None, 1, 2]
    addr, data = filled(m, mm, 4)
    mm.migrate(addr, 2 * ps, 1)
    mm.migrate(addr + 2 * ps, 2 * ps, 2)
    m.nodes[1].owner = m.nodes[2].owner = ("driver", 0)
    mv = run(mm, addr, addr + 4 * ps, 0, flags=Sel.DEVICE_COHERENT, pgmap_owner=("driver", 0))
    assert mv.cpages == 4 and mm.nodes_of(addr, 4 * ps).tolist() == [0] * 4
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_zero_page_needs_select_system(m, mm):
    """The zero page is collected (as a hole) only with SYSTEM; an empty slot always is."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.read(addr, ps)  # slot 0: the zero page, slot 1: nothing
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1, flags=Sel.DEVICE_COHERENT, pgmap_owner=1)
    assert mv.setup() == 1 and (mv.src & FLAGS).tolist() == [0, MIGRATE]
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert mm.nodes_of(addr, 2 * ps).tolist() == [-1, 1]
    assert (mm.read(addr, 2 * ps) == 0).all()


def test_pages_not_selected_are_not_split(m, mm):
    """migrate_vma_collect_pmd skips an unselected page before it would split its folio."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    before = m.vmstat
    assert run(mm, addr, addr + NR * ps, 1, flags=Sel.DEVICE_COHERENT, pgmap_owner=1).cpages == 0
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9
    assert "thp_migration_split" not in delta(m, before)
    assert np.array_equal(mm.read(addr, NR * ps), data)


# -- COMPOUND: PMD-sized folios migrate whole ------------------------------------------------------------------
def test_compound_migration_keeps_the_folio_whole(m, mm, engine):
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    head = mm.pfn_of(addr)
    before = m.vmstat
    mv = MigrateVma(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert mv.setup() == 1
    assert int(mv.src[0]) == head << MIGRATE_PFN_SHIFT | VALID | MIGRATE | WRITE | COMPOUND
    assert (mv.src[1:] == 0).all()
    mv.alloc_and_copy(engine=engine)
    dst = int(mv.dst[0]) >> MIGRATE_PFN_SHIFT
    assert int(mv.dst[0]) & FLAGS == VALID | WRITE | COMPOUND and (mv.dst[1:] == 0).all()
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * NR
    assert mm.pfns_of(addr, NR * ps).tolist() == list(range(dst, dst + NR))
    st = m.page_controls.page_state(dst)
    assert st["order"] == 9 and st["node"] == 1 and st["refcount"] == NR
    assert PageFlag.LOCKED not in st["flags"] and PageFlag.LRU in st["flags"]
    assert delta(m, before) == {"migrate_vma_success": NR, "migrate_tlb_flush": 1}
    assert m.nodes[0].free_pages == HOST  # the source folio was freed whole
    # And back, as one folio again (hmm-tests: migrate_anon_huge_* round trips).
    mv = run(mm, addr, addr + NR * ps, 0, engine, flags=Sel.DEVICE_COHERENT | Sel.COMPOUND, pgmap_owner=1)
    assert mv.cpages == 1 and mv.status.tolist() == [0] * NR
    back = mm.pfn_of(addr)
    assert m.page_controls.page_state(back)["order"] == 9 and mm.nodes_of(addr, NR * ps).tolist() == [0] * NR
    assert np.array_equal(mm.read(addr, NR * ps), data)
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_compound_device_private_round_trip():
    with private_machine() as m:
        ps = m.page_size
        mm = m.address_space()
        addr, data = filled(m, mm, 2 * NR, order=9)
        mv = run(mm, addr, addr + 2 * NR * ps, 2, m.dma, flags=Sel.SYSTEM | Sel.COMPOUND)
        assert mv.cpages == 2 and (mv.src[[0, NR]] & COMPOUND).all()
        assert m.page_controls.page_state(mm.pfn_of(addr + NR * ps))["order"] == 9
        mv = run(mm, addr, addr + 2 * NR * ps, 0, m.dma, flags=Sel.DEVICE_PRIVATE | Sel.COMPOUND, pgmap_owner=2)
        assert mv.cpages == 2 and (mv.status == 0).all()
        assert [m.page_controls.page_state(mm.pfn_of(addr + i * NR * ps))["order"] for i in range(2)] == [9, 9]
        assert np.array_equal(mm.read(addr, 2 * NR * ps), data)
        assert check_machine(m) == []
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_compound_without_a_pmd_destination_is_split_and_counted(m, mm, engine):
    """No free PMD-sized block on the node: base-page destinations, the source split in pages()."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    held = fragment(m, 1)
    before = m.vmstat
    mv = MigrateVma(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert mv.setup() == 1
    mv.alloc_and_copy(engine=engine)
    assert ((mv.dst & FLAGS) == VALID | WRITE).all()  # one base page per slot, no COMPOUND
    mv.pages()
    assert ((mv.src & FLAGS) == VALID | MIGRATE | WRITE).all()  # the source is split: one entry per page
    mv.finalize()
    assert mv.status.tolist() == [0] * NR
    assert delta(m, before) == {"thp_migration_split": 1, "migrate_vma_success": NR, "migrate_tlb_flush": 1}
    assert mm.nodes_of(addr, NR * ps).tolist() == [1] * NR
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 0
    assert np.array_equal(mm.read(addr, NR * ps), data)
    m.put_pages(held)
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_compound_needs_the_whole_pmd_in_the_range(m, mm):
    """A range that covers part of a THP cannot take it whole: it is split, as without COMPOUND."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    before = m.vmstat
    mv = run(mm, addr, addr + 16 * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert mv.cpages == 16 and not (mv.src & COMPOUND).any()
    assert delta(m, before)["thp_migration_split"] == 1
    assert mm.nodes_of(addr, 32 * ps).tolist() == [1] * 16 + [0] * 16
    assert np.array_equal(mm.read(addr, NR * ps), data)


def test_compound_hole_becomes_one_folio(m, mm, engine):
    """An empty PMD (hmm-tests' migrate_anon_huge_empty) is one compound hole, filled by one device folio."""
    ps = m.page_size
    addr = mm.mmap(NR * ps, order=9)
    mv = MigrateVma(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert mv.setup() == 1 and int(mv.src[0]) == MIGRATE | COMPOUND and (mv.src[1:] == 0).all()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * NR
    head = mm.pfn_of(addr)
    st = m.page_controls.page_state(head)
    assert st["order"] == 9 and st["node"] == 1 and st["refcount"] == NR and st["mapcount"] == 1
    assert mm.pfns_of(addr, NR * ps).tolist() == list(range(head, head + NR))
    assert (mm.read(addr, NR * ps) == 0).all()
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_compound_hole_filled_meanwhile_is_not_inserted(m, mm):
    ps = m.page_size
    addr = mm.mmap(NR * ps, order=9)
    mv = MigrateVma(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    mv.setup()
    mv.alloc_and_copy()
    mm.write(addr + 5 * ps, b"racing fault")  # a hole has no migration entry: the fault does not wait
    mv.pages()
    mv.finalize()
    assert (mv.status == EBUSY).all()
    assert mm.read(addr + 5 * ps, 12).tobytes() == b"racing fault"
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_pinned_thp_is_not_collected_nor_split(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    mm.pin(addr + 3 * ps, ps)
    before = m.vmstat
    mv = run(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert mv.cpages == 0 and (mv.src == 0).all() and (mv.status == EBUSY).all()
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9 and "thp_migration_split" not in delta(m, before)
    mm.unpin(addr + 3 * ps, ps)
    assert np.array_equal(mm.read(addr, NR * ps), data)


def test_compound_dma_failure_restores_the_folio(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    head = mm.pfn_of(addr)
    m.dma.inject_errors(1)
    mv = run(mm, addr, addr + NR * ps, 1, m.dma, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert (mv.status == EIO).all()
    assert mm.pfn_of(addr) == head and m.page_controls.page_state(head)["order"] == 9
    assert np.array_equal(mm.read(addr, NR * ps), data)
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_compound_abort_restores_the_folio(m, mm):
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    head = mm.pfn_of(addr)
    with MigrateVma(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND) as mv:
        mv.setup()
        mv.alloc_and_copy()
    assert mm.pfn_of(addr) == head and m.page_controls.page_state(head)["order"] == 9
    st = m.page_controls.page_state(head)
    assert PageFlag.LOCKED not in st["flags"] and PageFlag.ISOLATED not in st["flags"]
    assert np.array_equal(mm.read(addr, NR * ps), data)
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_compound_folio_shared_with_a_child_moves_for_both(m, mm):
    """try_to_migrate unmaps every mapping of the folio: parent and child both follow it to the device."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    child = mm.fork()
    mv = run(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    assert mv.cpages == 1 and (mv.status == 0).all()
    new = mm.pfn_of(addr)
    assert child.pfn_of(addr) == new and m.page_controls.page_state(new)["refcount"] == 2 * NR
    for space in (mm, child):
        assert np.array_equal(space.read(addr, NR * ps), data)
    finish_within(child.close, "close")


def test_compound_with_uvm_accessor(m, mm):
    """A UVM accessor reads the device-resident folio in place; the folio stays whole."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    run(mm, addr, addr + NR * ps, 1, flags=Sel.SYSTEM | Sel.COMPOUND)
    acc = DeviceAccessor(mm, 1, UvmOptions(prefetch="none"))
    assert np.array_equal(acc.read(addr, NR * ps), data)
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9


# -- argument checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, match", [
    ("system", "MigrateVmaSelect"),
    (True, "MigrateVmaSelect"),
    (1.0, "MigrateVmaSelect"),
    (MigratePfn.MIGRATE, "MigrateVmaSelect"),
    (0x10, "bits MigrateVmaSelect does not define.*0x10.*allowed"),
    (-1, "does not define"),
])
def test_bad_flags_are_refused(m, mm, flags, match):
    addr = mm.mmap(m.page_size)
    with pytest.raises(InvalidArgument, match=match):
        MigrateVma(mm, addr, addr + m.page_size, 1, flags=flags)


@pytest.mark.parametrize("flags", [Sel.DEVICE_PRIVATE, Sel.DEVICE_COHERENT | Sel.SYSTEM])
def test_device_selection_needs_an_owner(m, mm, flags):
    addr = mm.mmap(m.page_size)
    with pytest.raises(InvalidArgument, match="pgmap_owner.*Node.owner"):
        MigrateVma(mm, addr, addr + m.page_size, 0, flags=flags)


def test_bad_owners_are_refused(m, mm):
    addr = mm.mmap(m.page_size)
    with pytest.raises(InvalidArgument, match="pgmap_owner must be hashable"):
        MigrateVma(mm, addr, addr + m.page_size, 0, flags=Sel.DEVICE_COHERENT, pgmap_owner=[1])
    with pytest.raises(InvalidArgument, match="owner must be an owner token"):
        m.nodes[1].owner = None
    with pytest.raises(InvalidArgument, match="host memory"):
        m.nodes[0].owner = "host"
    m.nodes[1].owner = "gpu0"
    assert m.nodes[1].owner == "gpu0"


def test_plain_ints_and_no_selection_are_accepted(m, mm):
    """flags is a bit mask as in the kernel: an int works, and 0 collects holes only."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr, rand(ps))
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1, flags=0)
    assert mv.setup() == 1 and (mv.src & FLAGS).tolist() == [0, MIGRATE]
    mv.abort()
    assert MigrateVma(mm, addr, addr + 2 * ps, 1, flags=1).flags == Sel.SYSTEM
