"""The shared zero page: read faults on untouched private memory, and what writes, migrations, MigrateVma,
fork, pins and populate do with it. Each test names the kernel function it mirrors."""

from __future__ import annotations

import errno

import pytest
from support import delta, filled, free, run_migrate_vma, used

from dmamig import MigrateVma, PteFlag
from dmamig.flags import MIGRATE_PFN_SHIFT, MigratePfn
from dmamig.vma import ZERO_PFN

EFAULT = -errno.EFAULT
HOST = 1024
DEV = 1024
START = [HOST, DEV, DEV]


# -- the zero page ----------------------------------------------------------------------------------------------
def test_read_fault_maps_the_zero_page(m, mm):
    """do_anonymous_page: a read fault maps the shared zero page, read-only and special; no frame is used."""
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    before = m.vmstat
    assert not mm.read(addr, 8 * ps).any()
    assert free(m) == START
    assert (mm.pfns_of(addr, 8 * ps) == ZERO_PFN).all() and (mm.nodes_of(addr, 8 * ps) == -1).all()
    assert mm.pte_flags(addr) == PteFlag.PRESENT | PteFlag.YOUNG | PteFlag.SPECIAL
    assert delta(m, before) == {"pgfault": 8}
    mm.read(addr, 8 * ps)  # mapped now: no more faults
    assert delta(m, before) == {"pgfault": 8}


def test_write_to_the_zero_page_allocates_a_page(m, mm):
    """do_wp_page on the zero page: a new zeroed page, writable, for that slot alone."""
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.read(addr, 4 * ps)
    mm.write(addr + ps + 1, b"z")
    assert mm.pfns_of(addr, 4 * ps).tolist()[0] == ZERO_PFN and mm.node_of(addr + ps) == 0
    assert used(m) == 1 and PteFlag.WRITE in mm.pte_flags(addr + ps)
    out = mm.read(addr, 4 * ps)
    assert out[ps + 1] == ord("z") and out.sum() == ord("z")


def test_write_to_a_zero_large_folio_range_allocates_the_folio(m, mm):
    """A write over zero-page slots of a large-folio mapping faults in the whole folio."""
    ps = m.page_size
    addr = mm.mmap(16 * ps, order=4)
    mm.read(addr, 16 * ps)
    mm.write(addr, b"f")
    assert m.page_controls.page_state(mm.pfn_of(addr + 15 * ps))["order"] == 4 and used(m) == 16


def test_migrate_skips_the_zero_page(m, mm):
    """add_folio_for_migration: the zero page is -EFAULT, not moved, not a failure; node accounting stays."""
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.read(addr, 2 * ps)
    mm.write(addr + 2 * ps, b"x")
    res = mm.migrate(addr, 4 * ps, 1)
    assert res.status.tolist() == [EFAULT, EFAULT, 0, -errno.ENOENT]
    assert res.nr_succeeded == 1 and res.nr_failed == 0
    assert free(m) == [HOST, DEV - 1, DEV]
    assert mm.pfns_of(addr, 2 * ps).tolist() == [ZERO_PFN, ZERO_PFN]


def test_migrate_vma_treats_the_zero_page_as_a_hole(m, mm):
    """migrate_vma_collect_pmd: the zero page is selected MIGRATE without a pfn; finalize maps a new page."""
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.read(addr, 2 * ps)
    mm.write(addr + 2 * ps, b"d")
    before = m.vmstat
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    assert mv.setup() == 4
    assert mv.src[:2].tolist() == [int(MigratePfn.MIGRATE)] * 2 and mv.src[3] == int(MigratePfn.MIGRATE)
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * 4
    assert (mm.nodes_of(addr, 4 * ps) == 1).all()
    assert mm.pfns_of(addr, 4 * ps).tolist() == (mv.dst >> MIGRATE_PFN_SHIFT).tolist()
    # migrate_device.c counts no pgmigrate_* events
    assert delta(m, before) == {"migrate_vma_success": 4, "migrate_tlb_flush": 1}
    out = mm.read(addr, 4 * ps)
    assert out[2 * ps] == ord("d") and out.sum() == ord("d")


def test_migrate_vma_counts_failures_of_its_own(m, mm):
    """MigrateVma's vmstat: migrate_vma_success and migrate_vma_fail, never pgmigrate_*."""
    ps = m.page_size
    addr, _ = filled(m, mm, 4)
    held = m.alloc_pages(1, DEV - 2)
    before = m.vmstat
    mv = run_migrate_vma(mm, addr, addr + 4 * ps, 1)
    assert sorted(mv.status.tolist()) == [-errno.ENOMEM] * 2 + [0] * 2
    assert delta(m, before) == {"migrate_vma_success": 2, "migrate_vma_fail": 2, "migrate_tlb_flush": 1}
    m.put_pages(held)


def test_zero_page_is_shared_by_fork_and_freed_by_nobody(m, mm):
    """copy_present_pte copies a zero-page PTE as it is: no reference, no frame, in either process."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.read(addr, 2 * ps)
    child = mm.fork()
    assert (child.pfns_of(addr, 2 * ps) == ZERO_PFN).all()
    child.write(addr, b"c")
    assert not mm.read(addr, 2 * ps).any()
    child.close()
    mm.munmap(addr, 2 * ps)
    assert free(m) == START


@pytest.mark.parametrize("how", ["pin", "populate"])
def test_pin_and_populate_replace_the_zero_page(m, mm, how):
    """Pins and MAP_POPULATE of a writable mapping fault for writing: real pages replace the zero page."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.read(addr, 2 * ps)
    mm.pin(addr, 2 * ps) if how == "pin" else mm.populate(addr, 2 * ps, node=2)
    assert (mm.pfns_of(addr, 2 * ps) >= 0).all() and used(m) == 2
    assert not mm.read(addr, 2 * ps).any()
