"""Read duplication (UVM's read-mostly memory): device copies that leave pages where they are."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import DeviceAccessor, Machine, UvmOptions

PS = 4096
DUP = UvmOptions(read_duplication=True, prefetch="none")


@pytest.fixture
def m():
    mach = Machine(host_pages=8192, device_pages=2048, devices=2, backend="cpu", channels=2)
    yield mach
    mach.close()


def _free(m: Machine) -> list[int]:
    return [nd.free_pages for nd in m.nodes]


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("no_copy", [True, False])
def test_device_reads_copy_and_leave_pages_in_place(m, no_copy):
    start = _free(m)
    mm = m.address_space()
    n = 600
    a = mm.mmap(n * PS)
    data = _data(n * PS, 0)
    mm.write(a, data)
    acc = DeviceAccessor(mm, 1, UvmOptions(read_duplication=True, no_copy=no_copy))
    assert (acc.read(a, n * PS) == data).all()
    assert (mm.nodes_of(a, n * PS) == 0).all()
    assert acc.stats.pages_read_duplicated == n and acc.stats.pages_migrated == 0
    assert m.nodes[1].free_pages == start[1] - n
    batches = acc.stats.batches
    assert (acc.read(a, n * PS) == data).all() and acc.stats.batches == batches  # the copies serve it
    assert (mm.read(a, n * PS) == data).all() and m.vmstat["migrate_to_ram"] == 0
    # A CPU write collapses the copies of the pages it writes; the device reads the new bytes.
    mm.write(a + 10 * PS, np.full(2 * PS, 7, np.uint8))
    data[10 * PS: 12 * PS] = 7
    assert acc.stats.pages_collapsed == 2
    assert (acc.read(a, n * PS) == data).all()
    assert acc.stats.pages_read_duplicated == n + 2
    # A device write collapses the range's copies and migrates the pages it writes.
    acc.write(a, np.full(PS, 9, np.uint8))
    data[:PS] = 9
    assert mm.node_of(a) == 1 and mm.node_of(a + PS) == 0
    assert (acc.read(a, n * PS) == data).all() and (mm.read(a, n * PS) == data).all()
    mm.close()
    assert _free(m) == start


def test_two_devices_duplicate_and_a_cpu_write_collapses_both(m):
    mm = m.address_space()
    n = 100
    a = mm.mmap(n * PS)
    data = _data(n * PS, 1)
    mm.write(a, data)
    d1, d2 = DeviceAccessor(mm, 1, DUP), DeviceAccessor(mm, 2, DUP)
    assert (d1.read(a, n * PS) == data).all() and (d2.read(a, n * PS) == data).all()
    assert _free(m)[1:] == [2048 - n, 2048 - n]
    mm.write(a, np.zeros(n * PS, np.uint8))
    assert _free(m)[1:] == [2048, 2048]
    assert d1.stats.pages_collapsed == n and d2.stats.pages_collapsed == n
    assert not d1.read(a, n * PS).any() and not d2.read(a, n * PS).any()
    mm.munmap(a, n * PS)
    assert _free(m)[1:] == [2048, 2048]


def test_copies_make_room_first_when_the_device_is_full(m):
    mm = m.address_space()
    n = 3000
    a = mm.mmap(n * PS)
    data = _data(n * PS, 2)
    mm.write(a, data)
    acc = DeviceAccessor(mm, 1, DUP)
    assert (acc.read(a, n * PS) == data).all()
    s = acc.stats
    assert s.pages_read_duplicated == n and s.pages_collapsed >= n - 2048 and s.pages_evicted == 0
    assert (mm.nodes_of(a, n * PS) == 0).all()
    mm.close()
    assert _free(m) == [8192, 2048, 2048]


def test_shared_mappings_migrate_instead(m):
    mm = m.address_space()
    a = mm.mmap(8 * PS, shared=True)
    mm.write(a, _data(8 * PS, 3))
    acc = DeviceAccessor(mm, 1, DUP)
    acc.read(a, 8 * PS)
    assert (mm.nodes_of(a, 8 * PS) == 1).all() and acc.stats.pages_read_duplicated == 0


def test_a_write_inside_a_page_collapses_its_copy(m):
    mm = m.address_space()
    a = mm.mmap(2 * PS)
    acc = DeviceAccessor(mm, 2, DUP)
    DeviceAccessor(mm, 1).read(a, 1)  # untouched: populated on device 1
    assert acc.read(a, 2).tolist() == [0, 0] and acc.stats.pages_read_duplicated == 1
    mm.write(a + 1, b"\x5f")  # one byte in the middle of the page
    assert acc.stats.pages_collapsed == 1
    assert acc.read(a, 2).tolist() == [0, 0x5F]


def test_closing_the_accessor_frees_its_copies(m):
    mm = m.address_space()
    a = mm.mmap(50 * PS)
    mm.write(a, _data(50 * PS, 5))
    with DeviceAccessor(mm, 1, DUP) as acc:
        acc.read(a, 50 * PS)
        assert m.nodes[1].free_pages == 2048 - 50
    assert m.nodes[1].free_pages == 2048 and acc.stats.pages_collapsed == 50
    mm.write(a, b"x")  # the notifier is gone: nothing left to collapse
    assert acc.stats.pages_collapsed == 50
    acc.close()
