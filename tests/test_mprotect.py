"""mprotect and mremap of mappings whose pages are being or have been migrated. Each test names the kernel
function it mirrors."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from support import WAIT, filled, free, run_migrate_vma, used

from dmamig import AddressFault, InvalidArgument, MigrateVma, PteFlag
from dmamig.check import check_machine
from dmamig.flags import Prot

EFAULT = -errno.EFAULT
HOST = 1024
DEV = 1024
START = [HOST, DEV, DEV]


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


def test_change_pte_range_makes_a_writable_migration_entry_readable_when_write_stays(m, mm):
    """change_pte_range makes every writable migration entry readable (exclusive) on a change of rights, even
    one that keeps write allowed: the migrated page maps read-only until a write fault."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
    mv.setup()
    mm.mprotect(addr, ps, Prot.WRITE)  # rights change, write stays allowed
    mm.mprotect(addr, ps, Prot.READ | Prot.WRITE)
    assert PteFlag.WRITE not in mm.pte_flags(addr) and PteFlag.MIGRATION in mm.pte_flags(addr)
    assert PteFlag.WRITE in mm.pte_flags(addr + ps)  # outside the range: untouched
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert (mm.nodes_of(addr, 2 * ps) == 1).all()
    assert PteFlag.WRITE not in mm.pte_flags(addr) and PteFlag.WRITE in mm.pte_flags(addr + ps)
    mm.write(addr, b"ok")  # a write fault (here bringing the device page back) maps it writable
    assert PteFlag.WRITE in mm.pte_flags(addr)
    assert mm.read(addr, 2).tobytes() == b"ok" and np.array_equal(mm.read(addr + 2, 2 * ps - 2), data[2:])


def test_mprotect_fixup_that_changes_nothing_is_a_no_op(m, mm):
    """mprotect_fixup returns at once when a VMA's rights do not change: no split, no merge, and a writable
    migration entry stays writable, so the migrated page maps writable."""
    ps = m.page_size
    addr, _ = filled(m, mm, 4)
    (vma,) = mm.vmas
    mv = MigrateVma(mm, addr, addr + 4 * ps, 1)
    mv.setup()
    mm.mprotect(addr + ps, 2 * ps, Prot.READ | Prot.WRITE)
    assert mm.vmas == (vma,)  # the same VMA object: never split (and merged back)
    assert PteFlag.WRITE in mm.pte_flags(addr + ps)
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert all(PteFlag.WRITE in mm.pte_flags(addr + i * ps) for i in range(4))


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


def test_mremap_shrink_drops_migration_entries_without_waiting(m, mm):
    """mremap's shrink is do_vmi_munmap, whose zap_pte_range drops a migration entry without waiting: the
    migration then finds no PTE to restore, and its new page, mapped by nobody, is freed with the old one."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mv = MigrateVma(mm, addr + ps, addr + 4 * ps, 1)
    mv.setup()
    out: list = []
    t = threading.Thread(target=lambda: out.append(mm.mremap(addr, 4 * ps, 2 * ps)), daemon=True)
    t.start()
    t.join(WAIT)
    assert not t.is_alive(), "a shrinking mremap waited for a migration in flight"
    assert out == [addr] and [(v.start, v.npages) for v in mm.vmas] == [(addr, 2)]
    assert PteFlag.MIGRATION in mm.pte_flags(addr + ps)  # kept: only the tail went
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    assert mm.node_of(addr + ps) == 1 and used(m) == 2
    assert np.array_equal(mm.read(addr, 2 * ps), data[: 2 * ps])
    assert not check_machine(m)
    mm.close()
    assert free(m) == START


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
