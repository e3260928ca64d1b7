"""Sharing as the kernel does it: copy-on-write after fork and -EACCES without move_all. Each test names the
kernel function it mirrors. The zero page is in test_zero_page.py, mprotect and mremap in test_mprotect.py."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from support import WAIT, delta, filled, free, run_migrate_vma, used

from dmamig import MigrateVma, PteFlag
from dmamig.check import check_machine
from dmamig.flags import MigratePfn

HOST = 1024
DEV = 1024
START = [HOST, DEV, DEV]
EACCES, EFAULT = -errno.EACCES, -errno.EFAULT


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
        st = m.page_controls.page_state(int(pfns[i]))
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
        st = m.page_controls.page_state(space.pfn_of(addr))
        assert (st["mapcount"], st["refcount"]) == (1, 1)
    assert m.page_controls.page_state(mm.pfn_of(addr))["mapping"] == mm.vmas[0].obj.id


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
    assert m.page_controls.page_state(old)["mapcount"] == 1 and PteFlag.WRITE not in mm.pte_flags(addr)
    m.page_controls.get_page(old)
    mm.write(addr, b"w")
    assert mm.pfn_of(addr) != old
    assert m.page_controls.page_state(old)["refcount"] == 1  # only the speculative reference is left
    m.page_controls.put_page(old)
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
        st = m.page_controls.page_state(mm.pfn_of(addr + i * ps))
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
    assert m.page_controls.page_state(child.pfn_of(addr + 3 * ps))["order"] == 0
    assert m.page_controls.page_state(child.pfn_of(addr + 4 * ps))["order"] == 4
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
    assert m.page_controls.page_state(child.pfn_of(addr))["refcount"] == 2
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



@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_copy_nonpresent_pte_fork_copies_a_migration_entry(m, mm, monkeypatch, shared):
    """copy_nonpresent_pte: fork copies a migration entry instead of waiting for the migration; in a
    copy-on-write mapping the entry becomes readable in both processes. The migration then maps its new page
    in both (remove_migration_ptes walks the rmap), and a write is copy-on-write as usual."""
    from dmamig.migrate import batch_loops, core

    # The fork lands between the general path's unmap and move passes (a fused batch makes them in compiled calls).
    monkeypatch.setattr(batch_loops, "fused_batch", None)
    ps = m.page_size
    addr, data = filled(m, mm, 2, shared=shared)
    forked: list = []
    real = core._Migration._move_pass

    def move_pass(self, moving):
        if not forked:  # the batch is unmapped: its pages are behind migration entries
            forked.append(mm.fork())
            forked.append([(sp.pte_flags(addr), sp.pte_flags(addr + ps)) for sp in (mm, forked[0])])
        return real(self, moving)

    monkeypatch.setattr(core._Migration, "_move_pass", move_pass)
    out: list = []
    t = threading.Thread(target=lambda: out.append(mm.migrate(addr, ps, 1, move_all=True)), daemon=True)
    t.start()
    t.join(WAIT)
    assert not t.is_alive(), "fork waited for the migration in flight"
    monkeypatch.undo()
    child, flags = forked
    for entry, present in flags:
        assert PteFlag.MIGRATION in entry and (PteFlag.WRITE in entry) == shared
        assert PteFlag.PRESENT in present
    assert out[0].ok
    pfn = mm.pfn_of(addr)
    assert child.pfn_of(addr) == pfn and mm.node_of(addr) == 1 and m.page_controls.page_state(pfn)["mapcount"] == 2
    assert (PteFlag.WRITE in mm.pte_flags(addr)) == shared
    assert not check_machine(m)
    child.write(addr, b"child")
    assert child.read(addr, 5).tobytes() == b"child"
    assert mm.read(addr, 5).tobytes() == (b"child" if shared else data[:5].tobytes())
    assert np.array_equal(mm.read(addr + ps, ps), data[ps:])
    child.close()
    mm.close()
    assert not check_machine(m) and free(m) == START
