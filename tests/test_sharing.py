"""Sharing as the kernel does it: copy-on-write after fork, -EACCES without move_all, the zero page, and
mprotect/mremap of mappings whose pages are (being) migrated. Each test names the kernel function it mirrors."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from support import filled

from dmamig import AddressFault, InvalidArgument, MigrateVma, PteFlag
from dmamig.flags import MIGRATE_PFN_SHIFT, MigratePfn, Prot
from dmamig.vma import ZERO_PFN

HOST = 1024
DEV = 1024
START = [HOST, DEV, DEV]
EACCES, EFAULT = -errno.EACCES, -errno.EFAULT


def free(m) -> list[int]:
    return [n.free_pages for n in m.nodes]


def used(m) -> int:
    return sum(n.total_pages - n.free_pages for n in m.nodes)


def delta(m, before: dict) -> dict:
    return {k: v - before[k] for k, v in m.vmstat.items() if v != before[k]}


def run_migrate_vma(mm, start, end, node, engine=None) -> MigrateVma:
    mv = MigrateVma(mm, start, end, node)
    mv.setup()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    return mv


# -- copy-on-write after fork -----------------------------------------------------------------------------------
def test_fork_maps_one_frame_write_protected_in_both(m, mm):
    """copy_present_pte: the child maps the parent's frame; the PTE loses its write bit in both."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    pfns = mm.pfns_of(addr, 4 * ps)
    child = mm.fork()
    assert np.array_equal(child.pfns_of(addr, 4 * ps), pfns)
    assert used(m) == 4
    for i in range(4):
        st = m.page_state(int(pfns[i]))
        assert (st["mapcount"], st["refcount"]) == (2, 2)
        for space in (mm, child):
            assert PteFlag.WRITE not in space.pte_flags(addr + i * ps)
    assert np.array_equal(child.read(addr, 4 * ps), data)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_first_write_copies_the_page_for_the_writer_alone(m, mm):
    """wp_page_copy: the writer gets a new frame with the old content; the other process keeps the old one."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    old = mm.pfn_of(addr)
    child = mm.fork()
    mm.write(addr + 7, b"parent")
    assert mm.pfn_of(addr) != old and child.pfn_of(addr) == old
    assert used(m) == 3
    assert PteFlag.WRITE in mm.pte_flags(addr) and PteFlag.WRITE not in child.pte_flags(addr)
    expect = data[:ps].copy()
    expect[7:13] = np.frombuffer(b"parent", np.uint8)
    assert np.array_equal(mm.read(addr, ps), expect)
    assert np.array_equal(child.read(addr, ps), data[:ps])
    for space in (mm, child):
        st = m.page_state(space.pfn_of(addr))
        assert (st["mapcount"], st["refcount"]) == (1, 1)
    assert m.page_state(mm.pfn_of(addr))["mapping"] == mm.vmas[0].obj.id


def test_last_mapper_reuses_the_page(m, mm):
    """wp_can_reuse_anon_folio: once the other process copied, the remaining mapper just regains write."""
    addr, _ = filled(m, mm, 1)
    old = mm.pfn_of(addr)
    child = mm.fork()
    child.write(addr, b"c")
    assert used(m) == 2
    mm.write(addr, b"p")
    assert mm.pfn_of(addr) == old and used(m) == 2
    assert PteFlag.WRITE in mm.pte_flags(addr)
    assert child.read(addr, 1).tobytes() == b"c" and mm.read(addr, 1).tobytes() == b"p"


def test_an_extra_reference_makes_the_last_mapper_copy(m, mm):
    """wp_can_reuse_anon_folio refuses a folio with references beyond its PTEs: the writer copies it."""
    addr, data = filled(m, mm, 1)
    old = mm.pfn_of(addr)
    mm.fork().close()
    assert m.page_state(old)["mapcount"] == 1 and PteFlag.WRITE not in mm.pte_flags(addr)
    m.get_page(old)
    mm.write(addr, b"w")
    assert mm.pfn_of(addr) != old
    assert m.page_state(old)["refcount"] == 1  # only the speculative reference is left
    m.put_page(old)
    assert used(m) == 1
    assert mm.read(addr, 1).tobytes() == b"w" and np.array_equal(mm.read(addr + 1, 99), data[1:100])


def test_migration_moves_a_cow_page_for_both_processes(m, mm):
    """try_to_migrate / remove_migration_ptes: the rmap finds the PTEs of parent and child (shared anon_vma)."""
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    child = mm.fork()
    res = child.migrate(addr, 8 * ps, 1, move_all=True)
    assert res.ok and res.nr_succeeded == 8
    assert (mm.nodes_of(addr, 8 * ps) == 1).all()
    assert np.array_equal(mm.pfns_of(addr, 8 * ps), child.pfns_of(addr, 8 * ps))
    assert free(m) == [HOST, DEV - 8, DEV]
    for i in range(8):
        st = m.page_state(mm.pfn_of(addr + i * ps))
        assert (st["mapcount"], st["refcount"]) == (2, 2)
        assert PteFlag.WRITE not in mm.pte_flags(addr + i * ps)  # the migration entry kept the bits
    child.write(addr, b"child")  # still copy-on-write after the move
    assert np.array_equal(mm.read(addr, 8 * ps), data)
    assert child.read(addr, 5).tobytes() == b"child"
    child.close()
    mm.close()
    assert free(m) == START


def test_migrate_pages_moves_a_cow_page_without_any_check(m, mm):
    """migrate_pages() (kernel-internal) has no MPOL_MF_MOVE_ALL check: a page mapped twice moves."""
    addr, data = filled(m, mm, 1)
    child = mm.fork()
    res = m.migrate_pages([mm.pfn_of(addr)], 2)
    assert res.ok and mm.node_of(addr) == child.node_of(addr) == 2
    assert np.array_equal(child.read(addr, m.page_size), data)


def test_migrate_vma_moves_a_cow_page_for_both_processes(m, mm):
    """migrate_vma_setup unmaps every mapping (try_to_migrate); finalize remaps them all to the device page."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    child = mm.fork()
    mv = run_migrate_vma(mm, addr, addr + 4 * ps, 2)
    assert mv.status.tolist() == [0] * 4
    assert ((mv.src & int(MigratePfn.WRITE)) == 0).all()  # write-protected PTEs give read-only entries
    assert (child.nodes_of(addr, 4 * ps) == 2).all()
    assert np.array_equal(child.pfns_of(addr, 4 * ps), mm.pfns_of(addr, 4 * ps))
    assert np.array_equal(child.read(addr, 4 * ps), data)
    child.close()
    mm.close()
    assert free(m) == START


def test_munmap_and_close_in_any_order_free_every_frame(m, mm):
    """The last unmap of a COW page frees it; the anon_vma lives as long as a VMA is linked to it."""
    ps = m.page_size
    addr, data = filled(m, mm, 6)
    child = mm.fork()
    grandchild = child.fork()
    assert used(m) == 6
    child.write(addr + ps, b"c")
    grandchild.write(addr + 2 * ps, b"g")
    mm.munmap(addr, 3 * ps)
    assert np.array_equal(grandchild.read(addr, ps), data[:ps])
    mm.close()
    grandchild.migrate(addr, 6 * ps, 1, move_all=True)
    assert np.array_equal(child.read(addr + 3 * ps, 3 * ps), data[3 * ps:])
    child.close()
    assert grandchild.read(addr + 2 * ps, 1).tobytes() == b"g"
    assert np.array_equal(grandchild.read(addr + 3 * ps, 3 * ps), data[3 * ps:])
    grandchild.close()
    assert free(m) == START


def test_write_to_a_shared_large_folio_copies_one_base_page(m, mm):
    """do_wp_page on a PTE-mapped large folio copies the base page written, not the folio."""
    ps = m.page_size
    nr = 16
    addr, data = filled(m, mm, nr, order=4)
    child = mm.fork()
    child.write(addr + 3 * ps, b"x")
    assert used(m) == nr + 1
    assert m.page_state(child.pfn_of(addr + 3 * ps))["order"] == 0
    assert m.page_state(child.pfn_of(addr + 4 * ps))["order"] == 4
    assert np.array_equal(mm.read(addr, nr * ps), data)
    assert child.read(addr + 3 * ps, 1).tobytes() == b"x"
    child.close()
    mm.close()
    assert free(m) == START


def test_pinned_page_is_copied_at_fork(m, mm):
    """copy_present_page: a maybe-DMA-pinned page is copied for the child, the parent keeps it writable."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mm.pin(addr, ps)
    child = mm.fork()
    assert child.pfn_of(addr) != mm.pfn_of(addr)
    assert child.pfn_of(addr + ps) == mm.pfn_of(addr + ps)
    assert PteFlag.WRITE in mm.pte_flags(addr)
    assert np.array_equal(child.read(addr, 2 * ps), data)
    mm.unpin(addr, ps)


def test_pin_breaks_copy_on_write(m, mm):
    """gup_must_unshare: a pin on a COW page first makes the page the pinner's own."""
    addr, _ = filled(m, mm, 1)
    child = mm.fork()
    child.pin(addr, m.page_size)
    assert child.pfn_of(addr) != mm.pfn_of(addr)
    child.write(addr, b"pinned")  # no copy now: the pinned page is the mapped page
    assert m.page_state(child.pfn_of(addr))["refcount"] == 2
    child.unpin(addr, m.page_size)


# -- MPOL_MF_MOVE vs MPOL_MF_MOVE_ALL ----------------------------------------------------------------------------
def test_page_mapped_by_another_process_needs_move_all(m, mm):
    """add_folio_for_migration: folio_maybe_mapped_shared without MPOL_MF_MOVE_ALL gives -EACCES."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    child = mm.fork()
    before = m.vmstat
    res = mm.migrate(addr, 4 * ps, 1)
    assert res.status.tolist() == [EACCES] * 4
    assert res.nr_failed == 0 and res.nr_succeeded == 0 and delta(m, before) == {}  # not a failure
    assert (mm.nodes_of(addr, 4 * ps) == 0).all()
    res = mm.migrate(addr, 4 * ps, 1, move_all=True)
    assert res.ok and (child.nodes_of(addr, 4 * ps) == 1).all()
    assert np.array_equal(child.read(addr, 4 * ps), data)


def test_only_pages_still_shared_are_refused(m, mm):
    """A page the child copied is the parent's alone again and moves; the still-shared ones stay."""
    ps = m.page_size
    addr, _ = filled(m, mm, 4)
    child = mm.fork()
    child.write(addr + ps, b"c")
    res = mm.migrate(addr, 4 * ps, 2)
    assert res.status.tolist() == [EACCES, 0, EACCES, EACCES]
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0, 2, 0, 0]


def test_shared_memory_mapped_twice_needs_move_all(m, mm):
    """The check applies to shared memory too: a page mapped in two processes."""
    ps = m.page_size
    addr, _ = filled(m, mm, 2, shared=True)
    child = mm.fork()
    assert mm.migrate(addr, 2 * ps, 1).status.tolist() == [EACCES, EACCES]
    child.munmap(addr + ps, ps)
    assert mm.migrate(addr, 2 * ps, 1).status.tolist() == [EACCES, 0]


def test_page_already_on_the_node_is_done_before_the_check(m, mm):
    """add_folio_for_migration reports a page on the target node done before it looks at sharing."""
    ps = m.page_size
    addr, _ = filled(m, mm, 1)
    mm.fork()
    assert mm.migrate(addr, ps, 0).status.tolist() == [0]


def test_large_folio_shared_in_part_is_refused_whole(m, mm):
    """A folio counts as shared when any of its pages is mapped twice, even outside the range asked."""
    ps = m.page_size
    addr, _ = filled(m, mm, 16, order=4)
    child = mm.fork()
    child.munmap(addr + 8 * ps, 8 * ps)
    assert set(mm.migrate(addr + 8 * ps, 8 * ps, 1).status.tolist()) == {EACCES}
    child.munmap(addr, 8 * ps)
    res = mm.migrate(addr + 8 * ps, 8 * ps, 1)
    assert res.ok and res.nr_succeeded == 16  # the whole folio moved


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
    assert m.page_state(mm.pfn_of(addr + 15 * ps))["order"] == 4 and used(m) == 16


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


# -- mprotect and mremap ----------------------------------------------------------------------------------------
def test_mprotect_read_only_refuses_writes_and_splits_the_vma(m, mm):
    """mprotect_fixup splits the VMA (and vma_merge joins it again); a write to a read-only mapping faults."""
    ps = m.page_size
    addr, data = filled(m, mm, 6)
    mm.mprotect(addr + 2 * ps, 2 * ps, Prot.READ)
    assert [(v.start, v.npages, v.prot) for v in mm.vmas] == [
        (addr, 2, Prot.READ | Prot.WRITE), (addr + 2 * ps, 2, Prot.READ), (addr + 4 * ps, 2, Prot.READ | Prot.WRITE)]
    with pytest.raises(AddressFault, match="not writable"):
        mm.write(addr + ps, np.ones(2 * ps, np.uint8))  # spans into the read-only part: nothing written
    assert np.array_equal(mm.read(addr, 6 * ps), data)
    mm.mprotect(addr, 6 * ps, Prot.NONE)
    with pytest.raises(AddressFault):
        mm.read(addr, 1)
    mm.mprotect(addr, 6 * ps, Prot.READ | Prot.WRITE)
    assert [(v.start, v.npages) for v in mm.vmas] == [(addr, 6)]  # vma_merge joined the pieces again
    old = mm.pfn_of(addr + 2 * ps)
    mm.write(addr + 2 * ps, b"w")
    assert mm.pfn_of(addr + 2 * ps) == old  # write access back: the page is reused, not copied


def test_read_only_mapping_stays_read_only_through_migration(m, mm):
    """The migration entry keeps the PTE's write bit: a read-only page comes back read-only."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.mprotect(addr, 4 * ps, Prot.READ)
    assert mm.migrate(addr, 4 * ps, 1).ok
    assert all(PteFlag.WRITE not in mm.pte_flags(addr + i * ps) for i in range(4))
    with pytest.raises(AddressFault):
        mm.write(addr, b"x")
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_mprotect_during_migration_makes_the_entry_read_only(m, mm):
    """change_pte_range turns a writable migration entry into a readable one; the new page maps read-only."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    mv.setup()
    assert PteFlag.WRITE in mm.pte_flags(addr)  # the entry still holds the write bit
    mm.mprotect(addr, 2 * ps, Prot.READ)  # does not wait for the migration
    assert PteFlag.WRITE not in mm.pte_flags(addr) and PteFlag.MIGRATION in mm.pte_flags(addr)
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0, 0] and (mm.nodes_of(addr, 2 * ps) == 1).all()
    assert PteFlag.WRITE not in mm.pte_flags(addr)
    mm.mprotect(addr, 2 * ps, Prot.READ | Prot.WRITE)
    mm.write(addr, b"ok")  # write access back: the fault sets the bit
    assert mm.read(addr, 2).tobytes() == b"ok"
    assert np.array_equal(mm.read(addr + 2, 2 * ps - 2), data[2:])


def test_mremap_moves_a_mapping_with_its_frames(m, mm):
    """move_vma: the page table moves; same frames, same data, and the rmap still finds the pages."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    blocker = mm.mmap(ps)  # the addresses after the mapping are taken: growing must move it
    assert blocker > addr
    pfns = mm.pfns_of(addr, 4 * ps)
    new = mm.mremap(addr, 4 * ps, 6 * ps)
    assert new != addr
    with pytest.raises(AddressFault):
        mm.read(addr, 1)
    assert np.array_equal(mm.pfns_of(new, 4 * ps), pfns)
    assert np.array_equal(mm.read(new, 4 * ps), data) and not mm.read(new + 4 * ps, 2 * ps).any()
    assert mm.migrate(new, 6 * ps, 2).status.tolist() == [0] * 4 + [EFAULT] * 2
    assert np.array_equal(mm.read(new, 4 * ps), data)
    mm.close()
    assert free(m) == START


def test_mremap_during_migration_keeps_the_pages(m, mm):
    """A mapping moved while its pages are under migration: finalize still finds its migration entries."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.mmap(ps)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 2)
    mv.setup()
    new = mm.mremap(addr, 4 * ps, 8 * ps)
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert mv.status.tolist() == [0] * 4
    assert (mm.nodes_of(new, 4 * ps) == 2).all()
    assert np.array_equal(mm.read(new, 4 * ps), data)


def test_mremap_of_a_cow_range_keeps_the_rmap_of_both_processes(m, mm):
    """The child moves its copy-on-write range; a migration from the parent still updates both PTEs."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    child = mm.fork()
    new = child.mremap(addr + ps, 2 * ps, 2 * ps + ps)
    assert mm.migrate(addr, 4 * ps, 1, move_all=True).ok
    assert (child.nodes_of(new, 2 * ps) == 1).all()
    assert np.array_equal(child.read(new, 2 * ps), data[ps: 3 * ps])
    child.close()
    mm.close()
    assert free(m) == START


def test_mremap_shrinks_and_grows_in_place(m, mm):
    """mremap: a smaller length unmaps the tail; a larger one grows in place when the addresses are free."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    assert mm.mremap(addr, 4 * ps, 2 * ps) == addr
    assert used(m) == 2
    assert mm.mremap(addr, 2 * ps, 5 * ps, may_move=False) == addr
    assert np.array_equal(mm.read(addr, 2 * ps), data[: 2 * ps]) and not mm.read(addr + 2 * ps, 3 * ps).any()
    mm.mmap(ps)
    with pytest.raises(InvalidArgument, match="may_move"):
        mm.mremap(addr, 5 * ps, 50 * ps, may_move=False)
    assert len(mm.vmas) == 2  # refused before anything changed


@pytest.mark.parametrize("call", [
    lambda mm, a, ps: mm.mprotect(a, ps, 4), lambda mm, a, ps: mm.mprotect(a, ps, "r"),
    lambda mm, a, ps: mm.mprotect(a + 1, ps, Prot.READ), lambda mm, a, ps: mm.mprotect(a, 0, Prot.READ),
    lambda mm, a, ps: mm.mremap(a, ps, 0), lambda mm, a, ps: mm.mremap(a + 1, ps, ps),
    lambda mm, a, ps: mm.mremap(a, ps, 1.5),
], ids=["prot-4", "prot-str", "mprotect-unaligned", "mprotect-empty", "mremap-zero", "mremap-unaligned",
        "mremap-float"])
def test_mprotect_and_mremap_bad_arguments(m, mm, call):
    ps = m.page_size
    addr, _ = filled(m, mm, 2)
    with pytest.raises(InvalidArgument):
        call(mm, addr, ps)
    assert [(v.start, v.npages, v.prot) for v in mm.vmas] == [(addr, 2, Prot.READ | Prot.WRITE)]


def test_mprotect_and_mremap_over_holes_fault(m, mm):
    ps = m.page_size
    a, _ = filled(m, mm, 2)
    b = mm.mmap(2 * ps)
    with pytest.raises(AddressFault):
        mm.mprotect(a, b + ps - a, Prot.READ)
    with pytest.raises(AddressFault):
        mm.mremap(a, b + ps - a, 8 * ps)
    b2 = mm.mmap(2 * ps)
    mm.mprotect(b2, ps, Prot.READ)  # two VMAs, no hole between them
    with pytest.raises(AddressFault, match="inside one"):
        mm.mremap(b2, 2 * ps, 4 * ps)
    assert [v.writable for v in mm.vmas] == [True, True, False, True]


# -- copy-on-write under concurrent migration -------------------------------------------------------------------
def test_cow_writers_and_migrators_race_without_losing_a_byte(m, mm):
    """Parent and child write the pages they share copy-on-write while other threads migrate them (move_all
    and not, MigrateVma too): each process reads back exactly its own writes, and no frame leaks."""
    import threading

    from support import WAIT

    ps = m.page_size
    n = 32
    addr, data = filled(m, mm, n)
    child = mm.fork()
    spaces = {"parent": mm, "child": child}
    expect = {k: data.copy() for k in spaces}
    errors: list[BaseException] = []

    def guard(fn, *args):
        def body():
            try:
                fn(*args)
            except BaseException as exc:  # re-raised on the test's thread
                errors.append(exc)
        return threading.Thread(target=body, daemon=True)

    def writer(name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        space, mine = spaces[name], expect[name]
        for _ in range(60):
            i = int(rng.integers(0, n))
            buf = rng.integers(0, 256, 16, dtype=np.uint8)
            off = i * ps + int(rng.integers(0, ps - 16))
            space.write(addr + off, buf)
            mine[off: off + 16] = buf
            assert np.array_equal(space.read(addr + i * ps, ps), mine[i * ps: (i + 1) * ps])

    def migrator(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(25):
            space = spaces["parent" if rng.random() < 0.5 else "child"]
            first = int(rng.integers(0, n - 4))
            if rng.random() < 0.2:
                mv = MigrateVma(space, addr + first * ps, addr + (first + 4) * ps, int(rng.integers(1, 3)))
                mv.setup()
                mv.alloc_and_copy()
                mv.pages()
                mv.finalize()
                continue
            res = space.migrate(addr + first * ps, 4 * ps, int(rng.integers(0, 3)), move_all=bool(rng.random() < 0.5))
            assert set(res.status.tolist()) <= {0, EACCES, -errno.EAGAIN, -errno.EBUSY}

    threads = [guard(writer, "parent", 1), guard(writer, "child", 2), guard(migrator, 3), guard(migrator, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: a deadlock or a lost wakeup"
    if errors:
        raise errors[0]
    for name, space in spaces.items():
        assert np.array_equal(space.read(addr, n * ps), expect[name]), name
    child.close()
    mm.close()
    assert free(m) == START


def test_mprotect_and_mremap_race_migrations(m, mm):
    """change_pte_range and move_vma never wait for migrations: VMAs split, lose write and move while the core
    and MigrateVma have pages of them unmapped; every page still lands, intact, where its mapping now is."""
    import threading

    from support import WAIT

    ps = m.page_size
    n = 32
    addr, data = filled(m, mm, n)
    mm.mmap(ps)  # growth cannot happen in place: mremap moves the mapping
    where = {"addr": addr}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def guard(fn, *args):
        def body():
            try:
                fn(*args)
            except BaseException as exc:  # re-raised on the test's thread
                errors.append(exc)
        return threading.Thread(target=body, daemon=True)

    def changer() -> None:
        rng = np.random.default_rng(5)
        for k in range(40):
            with lock:
                a = where["addr"]
                first = int(rng.integers(0, n - 4))
                mm.mprotect(a + first * ps, 4 * ps, Prot.READ if k % 2 == 0 else Prot.READ | Prot.WRITE)
                if k % 10 == 9:
                    mm.mprotect(a, n * ps, Prot.READ | Prot.WRITE)
                    where["addr"] = mm.mremap(a, n * ps, n * ps + ps)
                    mm.mremap(where["addr"], n * ps + ps, n * ps)

    def migrator(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            with lock:
                a = where["addr"]
            first = int(rng.integers(0, n - 4))
            try:
                if rng.random() < 0.3:
                    run_migrate_vma(mm, a + first * ps, a + (first + 4) * ps, int(rng.integers(1, 3)))
                else:
                    mm.migrate(a + first * ps, 4 * ps, int(rng.integers(0, 3)))
            except (AddressFault, InvalidArgument):
                pass  # the mapping moved or split under the call's range: nothing was changed

    threads = [guard(changer), guard(migrator, 6), guard(migrator, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: a deadlock or a lost wakeup"
    if errors:
        raise errors[0]
    assert np.array_equal(mm.read(where["addr"], n * ps), data)
    mm.close()
    assert free(m) == START
