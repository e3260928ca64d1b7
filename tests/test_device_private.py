"""Device-private memory as the kernel has it (``MEMORY_DEVICE_PRIVATE``, ``migrate_device.c``, ``mm/memory.c``).

- A CPU fault on a device-private entry is ``do_swap_page``'s ``is_device_private_entry`` branch: it locks the
  page, takes a reference and calls the owner's ``migrate_to_ram``, a ``migrate_vma`` of the faulting page with
  ``fault_page`` set (``dmirror_devmem_fault``). Device migration counts no ``pgmigrate_*`` events.
- ``migrate_vma_setup`` with ``fault_page`` expects the fault handler's lock and reference on that page.
"""

from __future__ import annotations

import errno

import numpy as np

from dmamig import Machine, MigrateVma, PageFlag, PteFlag
from dmamig import MigrateVmaSelect as Sel
from dmamig.check import check_machine

PS = 4096
NR = 512


def _machine(mode: str = "private", host_pages: int = 2048) -> Machine:
    return Machine(host_pages=host_pages, device_pages=2048, devices=1, backend="cpu", channels=2,
                   device_memory=mode)


def _to_device(m: Machine, mm, addr: int, n: int, flags: Sel = Sel.SYSTEM) -> None:
    with MigrateVma(mm, addr, addr + n * PS, 1, flags=flags) as mv:
        mv.setup()
        mv.alloc_and_copy(engine=m.dma)
        mv.pages()
        mv.finalize()
    assert (mm.nodes_of(addr, n * PS) == 1).all()


def test_do_swap_page_device_private_fault_runs_migrate_vma_of_the_fault_page():
    """do_swap_page -> migrate_to_ram: a migrate_vma of the one faulting page, no pgmigrate_* counted."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(8 * PS)
        data = np.random.default_rng(1).integers(0, 256, 8 * PS, dtype=np.uint8)
        mm.write(a, data)
        _to_device(m, mm, a, 8)
        before, events = m.vmstat, len(m.migrate_events)
        assert np.array_equal(mm.read(a + 3 * PS + 5, 10), data[3 * PS + 5: 3 * PS + 15])
        after = m.vmstat
        assert mm.nodes_of(a, 8 * PS).tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
        assert after["pgmigrate_success"] == before["pgmigrate_success"]
        assert after["migrate_vma_success"] == before["migrate_vma_success"] + 1
        assert after["migrate_to_ram"] == before["migrate_to_ram"] + 1
        assert len(m.migrate_events) == events  # no migrate_pages() call, so no mm_migrate_pages event
        assert np.array_equal(mm.read(a, 8 * PS), data)
        assert m.vmstat["pgmigrate_success"] == before["pgmigrate_success"]
        assert check_machine(m) == []
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_migrate_vma_setup_fault_page_is_collected_locked_with_its_reference():
    """migrate_vma_setup(fault_page): the handler's lock and reference do not make the page busy, and
    migrate_vma_finalize leaves the fault page locked for the handler; other locked pages are skipped."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(2 * PS)
        mm.write(a, np.full(2 * PS, 7, np.uint8))
        _to_device(m, mm, a, 2)
        p0, p1 = mm.pfn_of(a), mm.pfn_of(a + PS)
        m.page_controls.get_page(p0)
        m.page_controls.get_page(p1)  # p1 holds an extra reference too, but it is not the fault page
        ms = mm.mm_struct
        with m.lock:
            m.pages.set(np.array([p0]), PageFlag.LOCKED)  # PageFlag.LOCKED, as do_swap_page
        mv = MigrateVma(ms, a, a + 2 * PS, 0, flags=Sel.DEVICE_PRIVATE, pgmap_owner=m.nodes[1].owner,
                        fault_page=p0)
        assert mv.setup() == 1
        mv.alloc_and_copy()
        mv.pages()
        mv.finalize()
        assert mv.status.tolist() == [0, mv.status[1]] and mv.status[1] != 0
        assert m.page_controls.page_state(p0)["flags"] & PageFlag.LOCKED  # still locked: the handler unlocks it
        with m.lock:
            m.pages.clear(np.array([p0]), PageFlag.LOCKED)
        m.page_controls.put_page(p0)
        m.page_controls.put_page(p1)
        assert mm.nodes_of(a, 2 * PS).tolist() == [0, 1]
        assert (mm.read(a, 2 * PS) == 7).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_do_swap_page_on_a_large_device_private_folio():
    """A fault on a PMD-sized device-private folio brings the folio back through migrate_vma."""
    with _machine(host_pages=4 * NR) as m:
        mm = m.address_space()
        a = mm.mmap(NR * PS, order=9)
        data = np.random.default_rng(2).integers(0, 256, NR * PS, dtype=np.uint8)
        mm.write(a, data)
        _to_device(m, mm, a, NR, Sel.SYSTEM | Sel.COMPOUND)
        before = m.vmstat
        assert np.array_equal(mm.read(a + 7 * PS, PS), data[7 * PS: 8 * PS])
        assert m.vmstat["pgmigrate_success"] == before["pgmigrate_success"]
        assert np.array_equal(mm.read(a, NR * PS), data)
        assert (mm.nodes_of(a, NR * PS) == 0).all()
        assert check_machine(m) == []
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [4 * NR, 2048]


def test_do_pages_move_to_a_device_private_node_fails_with_enodev():
    """do_pages_move: a target node without N_MEMORY (device-private ZONE_DEVICE memory) ends the call with
    -ENODEV after the groups before it were migrated."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(4 * PS)
        mm.write(a, np.full(4 * PS, 5, np.uint8))
        addrs = [a + i * PS for i in range(4)]
        res = mm.move_pages(addrs, [0, 1, 1, 0])
        assert res.rc == -errno.ENODEV
        assert (mm.nodes_of(a, 4 * PS) == 0).all()
        assert res.status.tolist() == [0, 0, 0, 0]  # untried addresses say where their pages are
        assert m.vmstat["pgmigrate_success"] == 0


def test_do_pages_stat_of_a_device_private_page_is_enoent():
    """folio_walk_start finds no page behind a non-present device-private entry: move_pages reports -ENOENT,
    in a query and in a move, and migrates nothing."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(2 * PS)
        mm.write(a, np.full(2 * PS, 5, np.uint8))
        _to_device(m, mm, a, 1)
        addrs = [a, a + PS]
        assert mm.move_pages(addrs, None).status.tolist() == [-errno.ENOENT, 0]
        res = mm.move_pages(addrs, [0, 0])
        assert res.status.tolist() == [-errno.ENOENT, 0] and res.rc == 0
        assert mm.nodes_of(a, 2 * PS).tolist() == [1, 0]
    with _machine("coherent") as m:  # coherent device memory is present: its node is reported
        mm = m.address_space()
        a = mm.mmap(PS)
        mm.write(a, np.full(PS, 5, np.uint8))
        _to_device(m, mm, a, 1)
        assert mm.move_pages([a], None).status.tolist() == [1]


def _on_device(m: Machine, n: int = 4):
    mm = m.address_space()
    a = mm.mmap(n * PS)
    mm.write(a, np.arange(n * PS, dtype=np.uint32).astype(np.uint8))
    _to_device(m, mm, a, n)
    return mm, a


def test_faultin_page_any_gup_faults_device_private_pages_back():
    """__get_user_pages -> faultin_page: a short-term pin (no FOLL_LONGTERM) meets non-present
    device-private entries and faults them back through migrate_to_ram, counting no pgmigrate_* events."""
    with _machine() as m:
        mm, a = _on_device(m)
        before, events = m.vmstat, len(m.migrate_events)
        mm.pin(a, 4 * PS, longterm=False)
        assert (mm.nodes_of(a, 4 * PS) == 0).all()
        after = m.vmstat
        assert after["pgmigrate_success"] == before["pgmigrate_success"]
        assert after["migrate_to_ram"] == before["migrate_to_ram"] + 4
        assert after["migrate_vma_success"] == before["migrate_vma_success"] + 4
        assert len(m.migrate_events) == events
        assert np.array_equal(mm.read(a, 4 * PS), np.arange(4 * PS, dtype=np.uint32).astype(np.uint8))
        mm.unpin(a, 4 * PS)
        assert check_machine(m) == []


def test_long_term_pin_faults_device_private_pages_without_migrate_pages():
    """__gup_longterm_locked: device-private pages come back by the fault, not by migrate_pages()."""
    with _machine() as m:
        mm, a = _on_device(m)
        before, events = m.vmstat, len(m.migrate_events)
        mm.pin(a, 4 * PS)
        assert (mm.nodes_of(a, 4 * PS) == 0).all()
        assert m.vmstat["pgmigrate_success"] == before["pgmigrate_success"]
        assert len(m.migrate_events) == events
        mm.unpin(a, 4 * PS)


def test_short_term_pin_takes_device_coherent_pages_in_place():
    """folio_is_longterm_pinnable matters only to FOLL_LONGTERM: a short-term pin of present
    device-coherent pages pins them on the device."""
    with _machine("coherent") as m:
        mm, a = _on_device(m)
        mm.pin(a, 4 * PS, longterm=False)
        assert (mm.nodes_of(a, 4 * PS) == 1).all()
        mm.unpin(a, 4 * PS)
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_migrate_device_coherent_folio_for_a_long_term_pin():
    """migrate_longterm_unpinnable_folios -> migrate_device_coherent_folio: each device-coherent folio is a
    device migration of its pfn (no pgmigrate_* events, no mm_migrate_pages record)."""
    with _machine("coherent") as m:
        mm, a = _on_device(m)
        before, events = m.vmstat, len(m.migrate_events)
        mm.pin(a, 4 * PS)
        assert (mm.nodes_of(a, 4 * PS) == 0).all()
        after = m.vmstat
        assert after["pgmigrate_success"] == before["pgmigrate_success"]
        assert after["migrate_to_ram"] == before["migrate_to_ram"] + 4
        assert len(m.migrate_events) == events
        data = np.arange(4 * PS, dtype=np.uint32).astype(np.uint8)
        assert np.array_equal(mm.read(a, 4 * PS), data)
        mm.unpin(a, 4 * PS)
        assert check_machine(m) == []
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_migrate_device_coherent_folio_is_ebusy_with_an_extra_reference():
    """migrate_device_coherent_folio: a folio with a reference besides its mappings stays (-EBUSY)."""
    from dmamig.migrate.device import migrate_device_coherent_folio

    with _machine("coherent") as m:
        mm, a = _on_device(m, 1)
        p = mm.pfn_of(a)
        m.page_controls.get_page(p)
        with m.lock:
            assert migrate_device_coherent_folio(m, p) == -errno.EBUSY
        assert mm.node_of(a) == 1 and m.page_controls.page_state(p)["refcount"] == 2
        m.page_controls.put_page(p)
        with m.lock:
            assert migrate_device_coherent_folio(m, p) == 0
        assert mm.node_of(a) == 0
        assert check_machine(m) == []


def _raw_pte(mm, addr: int) -> PteFlag:
    """The entry in the page table itself, not a relabelled view of it."""
    ((v, s, _e),) = mm.mm_struct.segments(addr, PS)
    return PteFlag(int(v.pte_flags[s]))


def test_remove_migrate_pte_makes_a_device_private_entry():
    """remove_migrate_pte: a migration entry that now names a device-private page becomes a non-present
    device-private entry (make_writable_device_private_entry), keeping its write bit; in the page table
    itself, for migrate_vma and the migrate_pages() core alike."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(4 * PS)
        mm.write(a, np.full(4 * PS, 3, np.uint8))
        _to_device(m, mm, a, 2)
        assert mm.migrate(a + 2 * PS, 2 * PS, 1).nr_succeeded == 2
        for i in range(4):
            f = _raw_pte(mm, a + i * PS)
            assert f & PteFlag.DEVICE_PRIVATE and f & PteFlag.WRITE and not f & PteFlag.PRESENT
        assert mm.pte_flags(a) == _raw_pte(mm, a)
        assert check_machine(m) == []
        mm.read(a, PS)
        f = _raw_pte(mm, a)
        assert f & PteFlag.PRESENT and not f & PteFlag.DEVICE_PRIVATE


def test_try_to_migrate_one_takes_device_private_entries_and_copy_nonpresent_pte():
    """try_to_migrate_one turns device-private entries into migration entries too (a migration off the
    device finds every mapper); fork copies a device-private entry (copy_nonpresent_pte), write-protected in
    both processes of a private mapping."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(2 * PS)
        mm.write(a, np.full(2 * PS, 4, np.uint8))
        _to_device(m, mm, a, 2)
        child = mm.fork()
        for who in (mm, child):
            f = _raw_pte(who, a)
            assert f & PteFlag.DEVICE_PRIVATE and not f & (PteFlag.PRESENT | PteFlag.WRITE)
        assert m.page_controls.page_state(mm.pfn_of(a))["mapcount"] == 2
        assert check_machine(m) == []
        # Every mapper's entry becomes a migration entry, then maps the new page.
        with MigrateVma(mm, a, a + 2 * PS, 0, flags=Sel.DEVICE_PRIVATE, pgmap_owner=m.nodes[1].owner) as mv:
            assert mv.setup() == 2
            mv.alloc_and_copy()
            mv.pages()
            mv.finalize()
        assert (mv.status == 0).all()
        for who in (mm, child):
            assert who.node_of(a) == 0 and _raw_pte(who, a) & PteFlag.PRESENT
        assert (child.read(a, 2 * PS) == 4).all()
        child.close()
        mm.close()
        assert check_machine(m) == [] and [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_device_private_faults_race_device_accesses_without_losing_a_byte():
    """CPU faults (migrate_to_ram on each device-private entry) against device accesses migrating the same
    pages to the device, on threads: each side writes its own bytes; none is lost, no frame leaks."""
    import threading

    from dmamig import DeviceAccessor, UvmOptions

    n, rounds = 16, 150
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(n * PS)
        mm.write(a, np.zeros(n * PS, np.uint8))
        acc = DeviceAccessor(mm, 1, UvmOptions(prefetch="none"))
        errors: list[BaseException] = []

        def cpu() -> None:
            try:
                for r in range(rounds):
                    i = r % n
                    mm.write(a + i * PS, np.array([r % 251], np.uint8))
                    assert mm.read(a + i * PS, 1)[0] == r % 251
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def device() -> None:
            try:
                for r in range(rounds):
                    i = (r * 7) % n
                    acc.write(a + i * PS + 1, np.array([r % 241], np.uint8))
                    assert acc.read(a + i * PS + 1, 1)[0] == r % 241
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=cpu), threading.Thread(target=device)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        want = np.zeros((n, PS), np.uint8)
        for r in range(rounds):
            want[r % n, 0] = r % 251
            want[(r * 7) % n, 1] = r % 241
        assert np.array_equal(mm.read(a, n * PS).reshape(n, PS), want)
        assert m.vmstat["pgmigrate_fail"] == 0
        assert check_machine(m) == []
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_do_swap_page_splits_a_large_device_private_folio_and_unlocks_its_other_pages():
    """A fault on a large device-private folio that is not PMD-mapped whole: migrate_vma_collect splits it
    (split_folio), and every page but the one the fault handler holds locked is unlocked, as
    __split_huge_page unlocks them; the whole folio's range comes back."""
    with _machine() as m:
        mm = m.address_space()
        a = mm.mmap(4 * PS, order=2)
        data = np.random.default_rng(3).integers(0, 256, 4 * PS, dtype=np.uint8)
        mm.write(a, data)
        assert mm.migrate(a, 4 * PS, 1).nr_succeeded == 4
        assert m.page_controls.page_state(mm.pfn_of(a))["order"] == 2
        assert np.array_equal(mm.read(a + PS, PS), data[PS: 2 * PS])
        assert (mm.nodes_of(a, 4 * PS) == 0).all()
        for i in range(4):
            assert not m.page_controls.page_state(mm.pfn_of(a + i * PS))["flags"] & PageFlag.LOCKED
        assert mm.migrate(a, 4 * PS, 1).nr_succeeded == 4  # nothing is left locked to wait on
        assert np.array_equal(mm.read(a, 4 * PS), data)
        assert check_machine(m) == []
