"""File folios migrate through their mapping's callback; each test names the kernel function it models.

``migrate_folio``, ``filemap_migrate_folio``, ``buffer_migrate_folio`` and ``_norefs``,
``fallback_migrate_folio`` (with ``writeout``), ``folio_migrate_mapping`` (the page-cache slot and the per-node
counters), writeback against the modes, the no-copy refusals, the un-audited filesystem, and the hmm-tests
``migrate_file_private``-style round trip of a private file mapping through a device.
"""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

from dmamig import Machine, MigrateMode, MigrateOptions, PageFlag
from dmamig.check import check_machine
from dmamig.filemap import BH_LOCKED, BH_REF
from dmamig.migrate.core import _Migration

PS = 4096
EAGAIN, EBUSY, EINVAL = -errno.EAGAIN, -errno.EBUSY, -errno.EINVAL
ASYNC, SYNC_LIGHT, SYNC = MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC


@pytest.fixture
def m():
    mach = Machine(host_pages=512, device_pages=512, devices=1, backend="cpu", channels=2)
    mach.page_cache.writeback_interval = 3600.0  # writeback only where a test starts it
    yield mach
    mach.close()


def mapped(m, fs, npages=4, data=b"file data"):
    """A file on ``fs`` with ``data`` at the start of every page, mapped shared and faulted in."""
    f = m.open(size=npages * PS, fs=fs)
    for i in range(npages):
        f.pwrite(data + bytes([i]), i * PS)
    mm = m.address_space()
    a = mm.mmap(npages * PS, file=f, shared=True)
    mm.populate(a, npages * PS)
    return f, mm, a


def settled(m):
    assert check_machine(m) == []
    assert m.page_cache.check_counters() == []


def test_migrate_folio_shmem_keeps_the_core_path(m):
    mm = m.address_space()
    a = mm.mmap(4 * PS, shared=True)
    mm.write(a, b"shmem" * 100)
    res = mm.migrate(a, 4 * PS, 1)
    assert res.status.tolist() == [0, -errno.ENOENT, -errno.ENOENT, -errno.ENOENT]
    assert bytes(mm.read(a, 5)) == b"shmem"
    settled(m)


def test_filemap_migrate_folio_moves_private_data_and_slot(m):
    f, mm, a = mapped(m, "generic")
    old = f.folio_pfns()
    with m.lock:
        m.pages.private[old[0]] = 0x5A  # the filesystem's private folio state
    res = mm.migrate(a, 4 * PS, 1)
    assert res.nr_succeeded == 4 and (res.status == 0).all()
    new = f.folio_pfns()
    assert (m.nodemap.node_of(new) == 1).all()
    assert [mm.pfn_of(a + i * PS) for i in range(4)] == new.tolist()  # the page-cache slot moved with the PTEs
    assert PageFlag.PRIVATE in m.page_controls.page_flags(int(new[0]))
    assert m.page_controls.page_state(int(new[0]))["private"] == 0x5A
    assert bytes(f.pread(2 * PS, 10)) == b"file data\x02"
    settled(m)


def test_folio_migrate_mapping_moves_the_node_counters(m):
    f, mm, a = mapped(m, "generic")
    f.fsync()
    mm.write(a + PS, b"dirty")
    mm.write(a + 3 * PS, b"dirty")
    assert m.node_page_state(0) == {"nr_file_pages": 4, "nr_file_dirty": 2, "nr_writeback": 0, "nr_shmem": 0}
    res = mm.migrate(a, 2 * PS, 1)
    assert res.nr_succeeded == 2
    assert m.node_page_state(0) == {"nr_file_pages": 2, "nr_file_dirty": 1, "nr_writeback": 0, "nr_shmem": 0}
    assert m.node_page_state(1) == {"nr_file_pages": 2, "nr_file_dirty": 1, "nr_writeback": 0, "nr_shmem": 0}
    assert PageFlag.DIRTY in m.page_controls.page_flags(mm.pfn_of(a + PS))
    f.fsync()
    assert m.node_page_state(1)["nr_file_dirty"] == 0
    with open(f.path, "rb") as fh:
        assert fh.read()[PS:PS + 5] == b"dirty"
    settled(m)


@pytest.mark.parametrize("fs", ["buffer", "blockdev"])
def test_buffer_migrate_folio_locked_buffers(m, fs):
    f, mm, a = mapped(m, fs)
    assert f.buffer_state(0, lock=True) == BH_LOCKED
    res = mm.migrate(a, PS, 1, mode=ASYNC)
    assert res.status.tolist() == [EAGAIN]  # buffer_migrate_lock_buffers only tries in ASYNC
    done = threading.Event()
    out = {}

    def sync():
        out["res"] = mm.migrate(a, PS, 1, mode=SYNC_LIGHT)
        done.set()

    t = threading.Thread(target=sync, daemon=True)
    t.start()
    assert not done.wait(0.3)  # sync modes sleep on the buffer lock
    f.buffer_state(0, lock=False)
    assert done.wait(30)
    t.join()
    assert out["res"].status.tolist() == [0] and mm.node_of(a) == 1
    settled(m)


def test_buffer_migrate_folio_moves_held_buffers(m):
    f, mm, a = mapped(m, "buffer")
    f.buffer_state(0, get_bh=1)
    res = mm.migrate(a, PS, 1)
    assert res.status.tolist() == [0]
    assert m.page_controls.page_state(mm.pfn_of(a))["private"] == BH_REF  # the buffers moved, held as they were
    f.buffer_state(0, get_bh=-1)
    settled(m)


def test_buffer_migrate_folio_norefs_refuses_busy_buffer_heads(m):
    f, mm, a = mapped(m, "blockdev")
    f.buffer_state(0, get_bh=1)
    for mode in (ASYNC, SYNC_LIGHT, SYNC):
        res = mm.migrate(a, 2 * PS, 1, mode=mode)
        assert res.status.tolist() == [EAGAIN, 0]
        assert mm.node_of(a) == 0
    f.buffer_state(0, get_bh=-1)
    assert mm.migrate(a, PS, 1).status.tolist() == [0]
    settled(m)


def test_fallback_migrate_folio_writes_out_a_dirty_folio_in_sync(m):
    f, mm, a = mapped(m, "no-callback")
    assert PageFlag.DIRTY in m.page_controls.page_flags(mm.pfn_of(a))
    for mode in (ASYNC, SYNC_LIGHT):
        res = mm.migrate(a, PS, 1, mode=mode)
        assert res.status.tolist() == [EBUSY]
    res = mm.migrate(a, PS, 1, mode=SYNC)
    assert res.status.tolist() == [0] and mm.node_of(a) == 1
    with open(f.path, "rb") as fh:
        assert fh.read(10) == b"file data\x00"  # writeout() wrote it before the move
    # try_to_free_buffers released the buffer heads: the new folio has no private data.
    assert PageFlag.PRIVATE not in m.page_controls.page_flags(mm.pfn_of(a))
    settled(m)


def test_fallback_migrate_folio_private_data_that_cannot_be_released(m):
    f, mm, a = mapped(m, "no-callback")
    assert f.fsync() == 0
    f.buffer_state(0, get_bh=1)
    assert mm.migrate(a, PS, 1, mode=ASYNC).status.tolist() == [EBUSY]
    assert mm.migrate(a, PS, 1, mode=SYNC).status.tolist() == [EAGAIN]
    f.buffer_state(0, get_bh=-1)
    assert mm.migrate(a, PS, 1, mode=ASYNC).status.tolist() == [0]
    settled(m)


def test_writeback_folios_busy_in_async_and_sync_light_waited_for_in_sync(m):
    m.page_cache.io_delay = 0.3
    f, mm, a = mapped(m, "generic", npages=2)
    assert f.start_writeback() == 2
    assert PageFlag.WRITEBACK in m.page_controls.page_flags(mm.pfn_of(a))
    for mode in (ASYNC, SYNC_LIGHT):
        assert mm.migrate(a, 2 * PS, 1, mode=mode).status.tolist() == [EBUSY, EBUSY]
    res = mm.migrate(a, 2 * PS, 1, mode=SYNC)
    assert res.status.tolist() == [0, 0]
    assert m.node_page_state(0)["nr_writeback"] == 0
    settled(m)


def test_no_copy_through_callbacks_that_support_it(m):
    for fs in ("generic", "buffer", "blockdev", "no-callback"):
        f, mm, a = mapped(m, fs)
        f.fsync()
        before = m.vmstat["pgmigrate_no_copy"]
        res = mm.migrate(a, 4 * PS, 1, engine=m.dma)
        assert (res.status == 0).all(), fs
        assert m.vmstat["pgmigrate_no_copy"] - before == 4
        assert bytes(mm.read(a + 3 * PS, 10)) == b"file data\x03"
        mm.close()
        f.close()
    settled(m)


def test_unaudited_filesystem_no_copy_refused_by_default(m):
    f, mm, a = mapped(m, "unaudited")
    res = mm.migrate(a, 4 * PS, 1, engine=m.dma)
    assert res.status.tolist() == [EINVAL] * 4
    assert mm.node_of(a) == 0 and bytes(mm.read(a, 10)) == b"file data\x00"
    assert mm.migrate(a, 4 * PS, 1).nr_succeeded == 4  # the CPU copy is safe: it follows the reference check
    res = mm.migrate(a, 4 * PS, 0, engine=m.dma, options=MigrateOptions(unaudited_no_copy=True))
    assert (res.status == 0).all() and mm.node_of(a) == 0
    settled(m)


@pytest.mark.parametrize("fs", ["unaudited", "generic"])
def test_a_write_that_lands_after_the_dma_copy(m, monkeypatch, fs):
    """The no-copy patch's hazard: the source is unmapped and locked, the DMA engine has copied it, and a
    writer writes it before the state moves. A filesystem that writes without the folio lock loses the write
    (when the experiment setting lets no-copy move its folios); one that takes the lock waits for the move and
    writes the new folio."""
    f, mm, a = mapped(m, fs, npages=1)
    wait = _Migration._wait
    writers = []

    def write_after_copy(self, fence, moving):
        wait(self, fence, moving)
        t = threading.Thread(target=f.pwrite, args=(b"LAST", 0), daemon=True)
        t.start()
        t.join(0.3)  # the un-audited write is done by now; the other one sleeps on the folio lock
        writers.append(t)

    monkeypatch.setattr(_Migration, "_wait", write_after_copy)
    res = mm.migrate(a, PS, 1, engine=m.dma, options=MigrateOptions(unaudited_no_copy=True))
    assert res.status.tolist() == [0]
    writers[0].join(30)
    assert not writers[0].is_alive()
    if fs == "unaudited":
        assert f.unlocked_writes == 1
        assert bytes(f.pread(0, 4)) == b"file"  # the write went to the old folio after its copy: lost
    else:
        assert f.unlocked_writes == 0
        assert bytes(f.pread(0, 4)) == b"LAST"
    settled(m)


@pytest.mark.parametrize("engine", [False, True])
def test_migrate_file_private(m, engine):
    """hmm-tests ``migrate_file_private``-style: a private file mapping migrates to a device and back; the
    mapping reads what it wrote, and the file is unchanged."""
    n = 8
    f = m.open(size=n * PS)
    original = np.random.default_rng(1).integers(0, 256, n * PS, dtype=np.uint8)
    f.pwrite(original, 0)
    assert f.fsync() == 0
    mm = m.address_space()
    a = mm.mmap(n * PS, file=f, shared=False)
    expect = original.copy()
    mm.read(a, n * PS)  # every page maps its page-cache folio
    mm.write(a, b"\xff" * (n // 2 * PS))  # half of them copied on write
    expect[: n // 2 * PS] = 0xFF
    dma = m.dma if engine else None
    res = mm.migrate(a, n * PS, 1, engine=dma, move_all=True)
    assert (res.status == 0).all() and all(mm.node_of(a + i * PS) == 1 for i in range(n))
    res = mm.migrate(a, n * PS, 0, engine=dma, move_all=True)
    assert (res.status == 0).all() and all(mm.node_of(a + i * PS) == 0 for i in range(n))
    assert np.array_equal(mm.read(a, n * PS), expect)
    assert np.array_equal(f.pread(0, n * PS), original)
    with open(f.path, "rb") as fh:
        assert fh.read() == original.tobytes()
    settled(m)
    start = [nd.free_pages for nd in m.nodes]
    mm.close()
    f.close()
    assert [nd.free_pages for nd in m.nodes] != start  # frames came back
    assert m.nodes[0].free_pages == m.nodes[0].total_pages and m.nodes[1].free_pages == m.nodes[1].total_pages


def test_movable_ops_migrates_balloon_pages_off_the_lru(m):
    """``movable_ops``: non-LRU movable pages (a balloon's) are isolated, migrated and put back by their driver."""
    start = [nd.free_pages for nd in m.nodes]
    b = m.balloon(4)
    mm = m.address_space()
    a = mm.mmap(2 * PS)
    mm.write(a, b"anon" * 2048)
    pfns = np.concatenate([b.pfns, [mm.pfn_of(a), mm.pfn_of(a + PS)]])
    res = m.migrate_pages(pfns, 1)
    assert (res.status == 0).all() and res.nr_succeeded == 6
    assert (m.nodemap.node_of(b.pfns) == 1).all()  # the balloon's slots follow its pages
    assert all(PageFlag.LRU not in m.page_controls.page_flags(int(p)) for p in b.pfns)
    assert PageFlag.LRU in m.page_controls.page_flags(mm.pfn_of(a))
    assert bytes(mm.read(a, 4)) == b"anon"
    settled(m)
    b.deflate()
    mm.close()
    assert [nd.free_pages for nd in m.nodes] == start


def test_each_page_reports_its_own_status_when_balloon_pages_come_before_lru_pages(m):
    """Movable pages are isolated after the LRU ones, so the call's folios are not in the caller's order: every
    page still gets the status of its own folio."""
    b = m.balloon(2)
    mm = m.address_space()
    a = mm.mmap(2 * PS)
    mm.write(a, b"anon" * 2048)
    busy = mm.pfn_of(a + PS)
    m.page_controls.get_page(busy)  # an extra reference: -EAGAIN after every pass
    pfns = np.concatenate([b.pfns, [mm.pfn_of(a), busy]])
    res = m.migrate_pages(pfns, 1, mode=ASYNC)
    assert res.status.tolist() == [0, 0, 0, EAGAIN]
    assert m.nodemap.node_of(b.pfns).tolist() == [1, 1] and mm.nodes_of(a, 2 * PS).tolist() == [1, 0]
    m.page_controls.put_page(busy)
    settled(m)
    b.deflate()
    mm.close()


def test_movable_ops_refuses_no_copy_with_einval(m):
    b = m.balloon(3)
    dst = m.alloc_pages(1, 3)
    res = m.migrate_pages(b.pfns.copy(), 1, mode=SYNC | MigrateMode.NO_COPY, dst_pfns=dst)
    assert res.status.tolist() == [EINVAL] * 3
    assert (m.nodemap.node_of(b.pfns) == 0).all()
    assert m.migrate_pages(b.pfns.copy(), 1, mode=ASYNC).status.tolist() == [0] * 3
    settled(m)


@pytest.mark.parametrize("order", [0, 9])
def test_folio_migrate_mapping_moves_nr_shmem(m, order):
    """Shared memory is in the page cache too: ``nr_file_pages`` and ``nr_shmem`` count it, and move with it."""
    big = Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu", channels=2)
    try:
        mm = big.address_space()
        n = 1024
        a = mm.mmap(n * PS, shared=True, order=order)
        mm.populate(a, n * PS)
        assert big.node_page_state(0)["nr_shmem"] == n and big.node_page_state(0)["nr_file_pages"] == n
        for engine in (None, big.dma):
            res = mm.migrate(a, 512 * PS, 1, engine=engine)
            assert res.nr_succeeded == 512
            assert big.node_page_state(1)["nr_shmem"] == 512 and big.node_page_state(0)["nr_shmem"] == n - 512
            assert big.page_cache.check_counters() == []
            mm.migrate(a, 512 * PS, 0, engine=engine)
        mm.close()
        assert big.node_page_state(0)["nr_shmem"] == 0 and big.node_page_state(0)["nr_file_pages"] == 0
        assert big.page_cache.check_counters() == []
    finally:
        big.close()


def test_private_file_mapping_comes_back_from_device_private_memory():
    """A private file mapping maps page-cache folios until it writes them; the emulator's migrate_pages() can put
    them in device-private memory, and a CPU access brings them back through the migrate_pages() core."""
    m = Machine(host_pages=256, device_pages=256, devices=1, backend="cpu", device_memory="private")
    try:
        f = m.open(size=4 * PS)
        f.pwrite(b"abcd" * PS, 0)
        mm = m.address_space()
        a = mm.mmap(4 * PS, file=f, shared=False)
        mm.read(a, 4 * PS)
        mm.write(a, b"Z" * PS)  # page 0 is copied on write; pages 1-3 still map the page cache
        res = mm.migrate(a, 4 * PS, 1, move_all=True)
        assert (res.status == 0).all()
        assert bytes(mm.read(a, 4)) == b"ZZZZ" and bytes(mm.read(a + PS, 4)) == b"abcd"
        assert mm.node_of(a + PS) == 0
        settled(m)
        mm.close()
        f.close()
        assert [nd.free_pages for nd in m.nodes] == [256, 256]
    finally:
        m.close()
