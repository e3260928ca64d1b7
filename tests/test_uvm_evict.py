"""Oversubscription and eviction: working sets beyond device memory, LRU victims, bulk eviction."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import DeviceAccessor, InvalidArgument, Machine, UvmOptions
from dmamig.uvm import migrate_device_range, tracker_of

PS = 4096
BLOCK = 512


@pytest.fixture
def m():
    mach = Machine(host_pages=8192, device_pages=2048, devices=1, backend="cpu", channels=2)
    yield mach
    mach.close()


def _free(m: Machine) -> list[int]:
    return [nd.free_pages for nd in m.nodes]


@pytest.mark.parametrize("order", [0, 9], ids=["4k", "2m"])
@pytest.mark.parametrize("factor", [1.5, 2.0])
@pytest.mark.parametrize("no_copy", [True, False])
def test_oversubscribed_sweeps_keep_every_byte_and_leak_no_frame(m, factor, no_copy, order):
    start = _free(m)
    mm = m.address_space()
    n = int(2048 * factor)
    a = mm.mmap(n * PS, order=order)
    data = np.random.default_rng(1).integers(0, 256, n * PS, dtype=np.uint8)
    mm.write(a, data)
    acc = DeviceAccessor(mm, 1, UvmOptions(no_copy=no_copy))
    for sweep in range(2):
        assert (acc.read(a, n * PS) == data).all()
        # Every other page changes on the device: evicted pages must carry the new bytes back.
        data.reshape(n, PS)[sweep::2, :8] = sweep + 1
        acc.write_pages(a + np.arange(sweep, n, 2) * PS, data.reshape(n, PS)[sweep::2])
    s = acc.stats
    assert s.pages_evicted > 0 and s.blocks_evicted > 0 and s.bytes_evicted == s.pages_evicted * PS
    assert s.pages_remote == 0
    assert m.nodes[1].free_pages >= 0
    assert (mm.read(a, n * PS) == data).all()
    mm.close()
    assert _free(m) == start


def test_oversubscription_with_untouched_pages_populates_and_evicts(m):
    mm = m.address_space()
    n = 2 * 2048
    a = mm.mmap(n * PS)
    acc = DeviceAccessor(mm, 1)
    acc.write(a, np.full(n * PS, 7, np.uint8))
    assert acc.stats.pages_populated == n
    assert (mm.read(a, n * PS) == 7).all()
    mm.close()
    assert _free(m) == [8192, 2048]


def test_eviction_chooses_least_recently_used_blocks(m):
    mm = m.address_space()
    a = mm.mmap(5 * BLOCK * PS)  # five 2 MiB blocks; the device holds four
    mm.populate(a, 5 * BLOCK * PS)
    acc = DeviceAccessor(mm, 1)
    blk = [a + i * BLOCK * PS for i in range(5)]
    for i in range(4):
        acc.touch(blk[i], BLOCK * PS)
    acc.touch(blk[0], BLOCK * PS)  # block 0 is now the most recent; block 1 the least
    acc.touch(blk[4], BLOCK * PS)
    nodes = [int(mm.nodes_of(b, BLOCK * PS).max()) for b in blk]
    assert nodes == [1, 0, 1, 1, 1]
    assert acc.stats.blocks_evicted == 1 and acc.stats.pages_evicted == BLOCK


def test_fifo_policy_evicts_the_first_block_made_resident(m):
    mm = m.address_space()
    a = mm.mmap(5 * BLOCK * PS)
    mm.populate(a, 5 * BLOCK * PS)
    acc = DeviceAccessor(mm, 1, UvmOptions(eviction="fifo"))
    blk = [a + i * BLOCK * PS for i in range(5)]
    for i in (0, 1, 2, 3, 0, 4):
        acc.touch(blk[i], BLOCK * PS)
    nodes = [int(mm.nodes_of(b, BLOCK * PS).max()) for b in blk]
    assert nodes == [0, 1, 1, 1, 1]


def test_migrate_device_range_evicts_every_page_in_use(m):
    mm = m.address_space()
    n = 700
    a = mm.mmap(n * PS)
    data = np.random.default_rng(2).integers(0, 256, n * PS, dtype=np.uint8)
    mm.write(a, data)
    DeviceAccessor(mm, 1).read(a, n * PS)
    nd = m.nodes[1]
    res = migrate_device_range(m, nd.base_pfn, nd.total_pages, engine=m.dma)
    assert (res.status == 0).sum() == n and res.nr_succeeded == n
    assert (mm.nodes_of(a, n * PS) == 0).all()
    assert (mm.read(a, n * PS) == data).all()
    assert m.vmstat["migrate_to_ram"] == 0  # evicted by the driver, not faulted back by the CPU
    assert nd.free_pages == nd.total_pages
    with pytest.raises(InvalidArgument):
        migrate_device_range(m, 0, 10)  # host frames


def test_closed_address_space_blocks_are_skipped(m):
    mm1, mm2 = m.address_space(), m.address_space()
    a1 = mm1.mmap(3 * BLOCK * PS)
    a2 = mm2.mmap(3 * BLOCK * PS)
    DeviceAccessor(mm1, 1).touch(a1, 3 * BLOCK * PS, write=True)
    mm1.close()
    acc = DeviceAccessor(mm2, 1)
    acc.touch(a2, 3 * BLOCK * PS, write=True)
    assert (mm2.nodes_of(a2, 3 * BLOCK * PS) == 1).all()
    assert len(tracker_of(m, 1)) == 3
    mm2.close()
    assert _free(m) == [8192, 2048]


@pytest.mark.parametrize("no_copy", [True, False])
def test_explicit_prefetch_and_evict(m, no_copy):
    mm = m.address_space()
    n = 1500
    a = mm.mmap(n * PS)
    data = np.random.default_rng(3).integers(0, 256, n * PS, dtype=np.uint8)
    mm.write(a, data[: 1000 * PS])  # the last 500 pages are untouched
    data[1000 * PS:] = 0
    acc = DeviceAccessor(mm, 1, UvmOptions(no_copy=no_copy))
    assert acc.prefetch(a, n * PS) == n
    assert acc.stats.faults == 0 and acc.stats.pages_migrated == 1000 and acc.stats.pages_populated == 500
    assert (acc.read(a, n * PS) == data).all() and acc.stats.faults == 0
    assert acc.evict(a + 100 * PS, 200 * PS) == 200
    nodes = mm.nodes_of(a, n * PS)
    assert (nodes[100:300] == 0).all() and (nodes[:100] == 1).all() and (nodes[300:] == 1).all()
    assert acc.evict(a + 100 * PS, 200 * PS) == 0
    # Prefetching as much as the device holds (2 MiB-aligned, 2 MiB folios) evicts everything else.
    b = mm.mmap(2048 * PS, order=9)
    assert acc.prefetch(b, 2048 * PS) == 2048
    assert (mm.nodes_of(a, n * PS) == 0).all()
    assert (mm.read(a, n * PS) == data).all()
    mm.close()
    assert _free(m) == [8192, 2048]


def test_a_device_smaller_than_the_block_it_serves_reads_the_rest_remotely():
    with Machine(host_pages=1024, device_pages=256, devices=1, backend="cpu", channels=2) as m:
        mm = m.address_space()
        a = mm.mmap(BLOCK * PS)  # one 2 MiB block, twice the device: the block in service cannot be evicted
        data = np.random.default_rng(4).integers(0, 256, BLOCK * PS, dtype=np.uint8)
        mm.write(a, data)
        acc = DeviceAccessor(mm, 1)
        assert (acc.read(a, BLOCK * PS) == data).all()
        assert acc.stats.pages_migrated == 256 and acc.stats.pages_remote == BLOCK - 256
        assert acc.stats.pages_evicted == 0
        mm.close()
        assert _free(m) == [1024, 256]
