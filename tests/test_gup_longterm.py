"""Long-term pins (``FOLL_LONGTERM``): device pages, coherent and device-private alike, are not long-term
pinnable, so ``AddressSpace.pin`` migrates them to host memory first, waiting for migrations in flight.

Thread tests are bounded in operation count; joins carry a timeout only so that a deadlock fails the test.
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
from support import WAIT, filled, finish_within

from dmamig import (
    DeviceAccessor,
    InvalidArgument,
    Machine,
    MigrateMode,
    MigrateVma,
    OutOfMemory,
    PageFlag,
    UvmOptions,
)
from dmamig.check import check_machine
from dmamig.migrate.isolate import isolate_folios, putback_folios

EAGAIN, EBUSY = -errno.EAGAIN, -errno.EBUSY
HOST = DEV = 2048
MODES = [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]


@pytest.fixture(params=["coherent", "private"])
def dm(request):
    """A CPU machine with two devices whose memory is coherent or device-private."""
    mach = Machine(host_pages=HOST, device_pages=DEV, devices=2, backend="cpu", channels=2,
                   device_memory=request.param)
    yield mach
    finish_within(mach.close, "Machine.close")


def test_pin_brings_device_pages_to_host_and_they_stay(dm):
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 8)
    mm.migrate(addr, 4 * ps, 1)
    mm.migrate(addr + 4 * ps, 4 * ps, 2)
    before = m.vmstat["migrate_to_ram"]
    mm.pin(addr + 2 * ps, 4 * ps)
    assert mm.nodes_of(addr, 8 * ps).tolist() == [1, 1, 0, 0, 0, 0, 2, 2]
    assert m.vmstat["migrate_to_ram"] == before + 4
    # Pinned pages stay: migrate_pages fails them with -EAGAIN, MigrateVma does not collect them.
    res = mm.migrate(addr, 8 * ps, 1, mode=MigrateMode.SYNC, move_all=True)
    assert res.status.tolist() == [0, 0] + [EAGAIN] * 4 + [0, 0]
    res = mm.migrate(addr, 8 * ps, 2, mode=MigrateMode.ASYNC, engine=m.dma)
    assert set(res.status[2:6].tolist()) == {EAGAIN}
    mv = MigrateVma(mm, addr, addr + 8 * ps, 1)
    mv.setup()
    mv.alloc_and_copy(engine=m.dma)
    mv.pages()
    mv.finalize()
    assert mv.status[2:6].tolist() == [EBUSY] * 4
    DeviceAccessor(mm, 1, UvmOptions(prefetch="none")).read(addr, 8 * ps)  # accessed remotely, not moved
    assert mm.nodes_of(addr + 2 * ps, 4 * ps).tolist() == [0] * 4
    assert np.array_equal(mm.read(addr + 2 * ps, 4 * ps), data[2 * ps: 6 * ps])
    mm.unpin(addr + 2 * ps, 4 * ps)
    assert mm.migrate(addr, 8 * ps, 1).status.tolist() == [0] * 8
    assert np.array_equal(mm.read(addr, 8 * ps), data)
    assert check_machine(m) == []
    mm.close()
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_pin_of_a_device_thp_brings_the_folio_back(dm):
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 512, order=9)
    mm.migrate(addr, 512 * ps, 1)
    mm.pin(addr + 7 * ps, ps)
    assert (mm.nodes_of(addr, 512 * ps) == 0).all()  # the whole folio migrates with the pinned page
    assert np.array_equal(mm.read(addr, 512 * ps), data)
    mm.unpin(addr + 7 * ps, ps)
    mm.close()


def test_pin_of_a_copy_on_write_device_page(dm):
    """GUP unshares a copy-on-write page for the pinner. A coherent page is present, so the pinner gets a host
    copy and the other process keeps the device page; a device-private entry is faulted back (for both
    mappers) before it is unshared."""
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 2)
    mm.migrate(addr, 2 * ps, 1)
    child = mm.fork()
    child.pin(addr, 2 * ps)
    assert child.nodes_of(addr, 2 * ps).tolist() == [0, 0]
    assert mm.nodes_of(addr, 2 * ps).tolist() == ([0, 0] if m.device_private else [1, 1])
    assert mm.pfns_of(addr, 2 * ps).tolist() != child.pfns_of(addr, 2 * ps).tolist()
    for space in (mm, child):
        assert np.array_equal(space.read(addr, 2 * ps), data)
    child.unpin(addr, 2 * ps)
    assert check_machine(m) == []
    child.close()
    mm.close()
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


def test_pin_fails_cleanly_when_pages_cannot_come_back(dm):
    """A device page that stays referenced elsewhere through every retry fails the pin, which pins nothing."""
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 2)
    mm.migrate(addr, 2 * ps, 1)
    pfn = mm.pfn_of(addr + ps)
    m.page_controls.get_page(pfn)
    with pytest.raises(OutOfMemory, match="long-term pin"):
        mm.pin(addr, 2 * ps)
    assert not mm.mm_struct.pins
    m.page_controls.put_page(pfn)
    mm.pin(addr, 2 * ps)
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 0]
    mm.unpin(addr, 2 * ps)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    mm.close()


def _blocked(t: threading.Thread) -> bool:
    t.join(0.2)
    return t.is_alive()


def test_pin_waits_for_pages_another_migration_isolated(dm):
    """A device page isolated by another thread's migration (not yet unmapped) is waited for, then pinned."""
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 2)
    mm.migrate(addr, 2 * ps, 1)
    head = np.array([mm.pfn_of(addr)])
    with m.lock:
        assert isolate_folios(m, head).tolist() == [0]
    errors: list[BaseException] = []

    def pin() -> None:
        try:
            mm.pin(addr, 2 * ps)
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    t = threading.Thread(target=pin, daemon=True)
    t.start()
    assert _blocked(t), "the pin did not wait for the isolated page"
    with m.changed:
        putback_folios(m, head)
        m.changed.notify_all()
    t.join(WAIT)
    assert not t.is_alive() and not errors
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 0]
    mm.unpin(addr, 2 * ps)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    mm.close()


def test_pin_waits_for_a_migration_entry_then_brings_the_page_back(dm):
    """A pin meeting a device migration in flight waits for its finalize, then migrates the page back."""
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 4)
    mv = MigrateVma(mm, addr, addr + 4 * ps, 2)
    mv.setup()
    t = threading.Thread(target=mm.pin, args=(addr, 4 * ps), daemon=True)
    t.start()
    # The pin meets the migration entries and waits: counted when the wait starts, so no timing is assumed.
    deadline = time.monotonic() + WAIT
    while mm.migration_stalls[0] == 0 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert mm.migration_stalls[0] == 1 and t.is_alive(), "the pin did not wait for the migration entries"
    mv.alloc_and_copy(engine=m.dma)
    mv.pages()
    mv.finalize()
    t.join(WAIT)
    assert not t.is_alive()
    assert mv.status.tolist() == [0] * 4
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0] * 4
    mm.unpin(addr, 4 * ps)
    assert np.array_equal(mm.read(addr, 4 * ps), data)
    mm.close()


def test_pins_racing_migrations_end_pinned_on_host(dm):
    """Pinners against migrators (copy and no-copy, every mode, to both devices) and a MigrateVma driver:
    every pin ends with its pages on host memory, where they stay until unpinned, and no byte changes."""
    m = dm
    ps = m.page_size
    n = 64
    mm = m.address_space()
    addr, data = filled(m, mm, n, seed=5)
    errors: list[BaseException] = []

    def guarded(fn, *args) -> threading.Thread:
        def body() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # re-raised on the test's thread
                errors.append(exc)

        return threading.Thread(target=body, daemon=True)

    def pinner(k: int) -> None:
        rng = np.random.default_rng(10 + k)
        for _ in range(40):
            first = int(rng.integers(0, n - 4))
            count = int(rng.integers(1, 5))
            a, length = addr + first * ps, count * ps
            mm.pin(a, length)
            assert (mm.nodes_of(a, length) == 0).all(), "a pin ended on device memory"
            time.sleep(0)
            assert (mm.nodes_of(a, length) == 0).all(), "a pinned page moved"
            assert np.array_equal(mm.read(a, length), data[first * ps: (first + count) * ps])
            mm.unpin(a, length)

    def migrator(k: int) -> None:
        rng = np.random.default_rng(20 + k)
        for i in range(40):
            first = int(rng.integers(0, n))
            count = int(rng.integers(1, n - first + 1))
            res = mm.migrate(addr + first * ps, count * ps, 1 + (i + k) % 2, mode=MODES[i % 3],
                             engine=m.dma if (i + k) % 2 else None)
            assert set(np.unique(res.status).tolist()) <= {0, EAGAIN, EBUSY}

    def driver() -> None:
        rng = np.random.default_rng(30)
        for _ in range(20):
            first = int(rng.integers(0, n - 8))
            with MigrateVma(mm, addr + first * ps, addr + (first + 8) * ps, int(rng.integers(1, 3))) as mv:
                mv.setup()
                mv.alloc_and_copy(engine=m.dma)
                mv.pages()
                mv.finalize()
            assert set(np.unique(mv.status).tolist()) <= {0, EAGAIN, EBUSY}

    crew = [guarded(pinner, k) for k in range(2)] + [guarded(migrator, k) for k in range(2)] + [guarded(driver)]
    for t in crew:
        t.start()
    deadline = time.monotonic() + WAIT
    for t in crew:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in crew if t.is_alive()], "threads did not finish: a deadlock or a lost wakeup"
    if errors:
        raise errors[0]
    assert not mm.mm_struct.pins
    assert np.array_equal(mm.read(addr, n * ps), data)
    assert check_machine(m) == []
    finish_within(mm.close, "close")
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


# -- writes through a pin ---------------------------------------------------------------------------------------
def test_write_pinned_writes_the_pinned_frames_and_dirties_them(m, mm):
    """A pin holder writes straight to the pinned pages (set_page_dirty_lock after its DMA): the bytes are
    what the mapping reads, at any alignment, and the folio is dirty."""
    ps = m.page_size
    addr = mm.mmap(4 * ps, shared=True)
    mm.populate(addr, 4 * ps)
    data = np.zeros(4 * ps, dtype=np.uint8)
    mm.pin(addr + ps, 2 * ps)
    assert PageFlag.DIRTY not in m.page_controls.page_flags(mm.pfn_of(addr + ps))
    payload = np.arange(ps + 10, dtype=np.uint8)
    mm.write_pinned(addr + ps + 7, payload)
    data[ps + 7: 2 * ps + 17] = payload
    assert np.array_equal(mm.read(addr, 4 * ps), data)
    assert PageFlag.DIRTY in m.page_controls.page_flags(mm.pfn_of(addr + ps))
    mm.unpin(addr + ps, 2 * ps)


def test_write_pinned_refuses_pages_it_has_not_pinned(m, mm):
    """Only the pins of this address space give access: an unpinned page, or another space's pin, is refused
    before any byte is written."""
    ps = m.page_size
    addr, data = filled(m, mm, 2)
    mm.pin(addr, ps)
    with pytest.raises(InvalidArgument, match="1 of 2 pages are not pinned"):
        mm.write_pinned(addr + ps - 1, b"xy")
    other = m.address_space()
    oaddr, _ = filled(m, other, 1)
    with pytest.raises(InvalidArgument, match="not pinned"):
        other.write_pinned(oaddr, b"x")
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    mm.unpin(addr, ps)
    with pytest.raises(InvalidArgument, match="not pinned"):
        mm.write_pinned(addr, b"x")
    other.close()



# -- a migration that never ends --------------------------------------------------------------------------------
@pytest.mark.parametrize("stuck", ["migration entries", "isolated"])
def test_a_pin_meeting_a_migration_that_never_ends_fails_clearly(dm, monkeypatch, stuck):
    """A driver that set up a MigrateVma and never finished it (or a migration that keeps a page isolated)
    makes the pin fail with MigrationStalled after LONGTERM_PIN_WAIT_S, pinning nothing, instead of hanging;
    once the migration ends, the pin succeeds."""
    import dmamig.gup as gup
    from dmamig import MigrationStalled

    monkeypatch.setattr(gup, "LONGTERM_PIN_WAIT_S", 0.2)
    m = dm
    ps = m.page_size
    mm = m.address_space()
    addr, data = filled(m, mm, 2)
    if stuck == "migration entries":
        pfns = mm.pfns_of(addr, 2 * ps)  # looked up first: a lookup waits for migration entries too
        mv = MigrateVma(mm, addr, addr + 2 * ps, 1)
        mv.setup()
        match = "stayed under migration entries"
    else:
        mm.migrate(addr, 2 * ps, 1)
        pfns = mm.pfns_of(addr, 2 * ps)
        head = pfns[:1]
        with m.lock:
            assert isolate_folios(m, head).tolist() == [0]
        match = "stayed isolated"
    refs = [m.page_controls.page_state(p)["refcount"] for p in pfns.tolist()]
    with pytest.raises(MigrationStalled, match=match):
        finish_within(lambda: mm.pin(addr, 2 * ps), "a pin meeting a stuck migration")
    assert [m.page_controls.page_state(p)["refcount"] for p in pfns.tolist()] == refs  # nothing pinned
    if stuck == "migration entries":
        mv.abort()
    else:
        with m.changed:
            putback_folios(m, head)
            m.changed.notify_all()
    mm.pin(addr, 2 * ps)
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 0]
    mm.unpin(addr, 2 * ps)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    mm.close()
