"""Files and the page cache: pread/pwrite/fsync/ftruncate/close, shared and private file mappings, msync-style
writeback, the flusher, clear errors for bad files, and no frame leaked."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from dmamig import AddressFault, InvalidArgument, Machine, PageFlag
from dmamig.check import check_machine

PS = 4096


@pytest.fixture
def m():
    mach = Machine(host_pages=512, device_pages=512, devices=1, backend="cpu", channels=2)
    mach.page_cache.writeback_interval = 3600.0  # no background writeback unless a test asks for it
    yield mach
    mach.close()


def free_pages(m: Machine) -> list[int]:
    return [n.free_pages for n in m.nodes]


def disk(f) -> bytes:
    with open(f.path, "rb") as fh:
        return fh.read()


def test_pwrite_pread_through_the_page_cache(m):
    f = m.open(size=3 * PS)
    assert f.pwrite(b"abc" * 2000, 100) == 6000
    assert bytes(f.pread(100, 9)) == b"abcabcabc"
    assert m.node_page_state(0) == {"nr_file_pages": 2, "nr_file_dirty": 2, "nr_writeback": 0, "nr_shmem": 0}
    assert disk(f)[100:103] == b"\0\0\0"  # not written back yet
    assert f.fsync() == 0
    assert disk(f)[100:6100] == b"abc" * 2000
    assert m.node_page_state(0)["nr_file_dirty"] == 0
    assert m.page_cache.check_counters() == [] and check_machine(m) == []


def test_pread_reads_the_disk_and_stops_at_the_end(tmp_path, m):
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * 20)
    f = m.open(p)
    assert f.size == 5120
    assert bytes(f.pread(5000, 1000)) == (bytes(range(256)) * 20)[5000:]
    assert f.pread(6000, 10).size == 0


def test_pwrite_past_the_end_grows_the_file(m):
    f = m.open()
    f.pwrite(b"tail", 2 * PS + 10)
    assert f.size == 2 * PS + 14
    f.fsync()
    assert disk(f) == b"\0" * (2 * PS + 10) + b"tail"


def test_ftruncate_drops_pages_and_zeroes_the_tail(m):
    f = m.open(size=4 * PS)
    f.pwrite(b"x" * (4 * PS), 0)
    before = m.node_page_state(0)["nr_file_pages"]
    f.ftruncate(PS + 5)
    assert m.node_page_state(0)["nr_file_pages"] == before - 2
    f.ftruncate(3 * PS)
    assert bytes(f.pread(0, 3 * PS)) == b"x" * (PS + 5) + b"\0" * (2 * PS - 5)
    f.fsync()
    assert disk(f) == b"x" * (PS + 5) + b"\0" * (2 * PS - 5)
    assert m.page_cache.check_counters() == [] and check_machine(m) == []


def test_shared_file_mapping_reaches_the_file(m):
    f = m.open(size=4 * PS)
    f.pwrite(b"disk", 0)
    mm = m.address_space()
    a = mm.mmap(4 * PS, file=f, shared=True)
    assert bytes(mm.read(a, 4)) == b"disk"
    mm.write(a + PS, b"mapped")
    assert bytes(f.pread(PS, 6)) == b"mapped"  # one page cache: the mapping and pread see the same folio
    assert m.node_page_state(0)["nr_file_dirty"] == 2
    f.fsync()  # msync(MS_SYNC)
    assert disk(f)[PS:PS + 6] == b"mapped"
    assert check_machine(m) == []
    mm.close()
    f.close()


def test_file_mapping_with_offset(m):
    f = m.open(size=4 * PS)
    f.pwrite(b"third", 2 * PS)
    mm = m.address_space()
    a = mm.mmap(2 * PS, file=f, offset=2 * PS, shared=True)
    assert bytes(mm.read(a, 5)) == b"third"


def test_private_file_mapping_is_copy_on_write(m):
    f = m.open(size=2 * PS)
    f.pwrite(b"original", 0)
    mm = m.address_space()
    a = mm.mmap(2 * PS, file=f, shared=False)
    assert bytes(mm.read(a, 8)) == b"original"
    assert mm.pfn_of(a) == f.folio_pfns(0, 1)[0]  # a read maps the page-cache folio itself
    mm.write(a, b"changed!")
    assert bytes(mm.read(a, 8)) == b"changed!"
    assert mm.pfn_of(a) != f.folio_pfns(0, 1)[0]
    assert bytes(f.pread(0, 8)) == b"original"
    f.fsync()
    assert disk(f)[:8] == b"original"
    assert check_machine(m) == []


def test_access_past_the_end_of_the_file_faults(m):
    f = m.open(size=PS)
    mm = m.address_space()
    a = mm.mmap(3 * PS, file=f, shared=True)
    mm.read(a, 10)
    with pytest.raises(AddressFault, match="past its end"):
        mm.read(a + 2 * PS, 10)


def test_the_flusher_writes_dirty_folios_back(m):
    m.page_cache.writeback_interval = 0.001
    f = m.open(size=PS)
    f.pwrite(b"flushed", 0)
    deadline = time.monotonic() + 10
    while disk(f)[:7] != b"flushed" or m.node_page_state(0)["nr_file_dirty"]:
        assert time.monotonic() < deadline, "the flusher never wrote the folio back"
        time.sleep(0.005)
    assert PageFlag.DIRTY not in m.page_controls.page_flags(int(f.folio_pfns(0, 1)[0]))


def test_start_writeback_puts_folios_under_writeback(m):
    m.page_cache.io_delay = 0.3
    f = m.open(size=2 * PS)
    f.pwrite(b"a" * 2 * PS, 0)
    assert f.start_writeback() == 2
    pfn = int(f.folio_pfns(0, 1)[0])
    assert PageFlag.WRITEBACK in m.page_controls.page_flags(pfn)
    assert m.node_page_state(0)["nr_writeback"] == 2
    assert f.fsync() == 0  # waits for the writeback in flight
    assert PageFlag.WRITEBACK not in m.page_controls.page_flags(pfn)
    assert disk(f) == b"a" * 2 * PS


def test_close_and_munmap_free_every_frame(m):
    start = free_pages(m)
    f = m.open(size=8 * PS)
    f.pwrite(b"z" * 3 * PS, PS)
    mm = m.address_space()
    a = mm.mmap(8 * PS, file=f, shared=True)
    b = mm.mmap(8 * PS, file=f, shared=False)
    mm.write(a + 5 * PS, b"shared")
    mm.write(b + 6 * PS, b"private")
    f.close()  # the mappings keep the file
    assert bytes(mm.read(a + 5 * PS, 6)) == b"shared"
    mm.munmap(a, 8 * PS)
    mm.close()
    assert free_pages(m) == start
    assert disk(f)[5 * PS:5 * PS + 6] == b"shared"  # written back when the last user let go
    assert disk(f)[6 * PS:6 * PS + 7] == b"\0" * 7
    assert m.page_cache.files == [] and check_machine(m) == []


def test_machine_close_releases_open_files(tmp_path):
    m = Machine(host_pages=64, device_pages=64, devices=1, backend="cpu")
    f = m.open(tmp_path / "kept")
    f.pwrite(b"kept", 0)
    m.close()
    assert (tmp_path / "kept").read_bytes() == b"kept"


def test_bad_path(m, tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        m.open(tmp_path / "missing-folder" / "f")
    with pytest.raises(InvalidArgument, match="path must be"):
        m.open("")


def test_directory(m, tmp_path):
    with pytest.raises(InvalidArgument, match="is a directory"):
        m.open(tmp_path)


def test_read_only_file(m, tmp_path):
    p = tmp_path / "ro"
    p.write_bytes(b"read only")
    p.chmod(0o444)
    with pytest.raises(InvalidArgument, match="read-only"):
        m.open(p)
    f = m.open(p, writable=False)
    assert bytes(f.pread(0, 9)) == b"read only"
    with pytest.raises(InvalidArgument, match="read-only"):
        f.pwrite(b"x", 0)
    mm = m.address_space()
    with pytest.raises(InvalidArgument, match="read-only"):
        mm.mmap(PS, file=f, shared=True)
    a = mm.mmap(PS, file=f, shared=False)  # a private mapping is fine: its writes never reach the file
    mm.write(a, b"X")
    assert bytes(mm.read(a, 9)) == b"Xead only"


def test_file_that_vanishes(m, tmp_path):
    start = free_pages(m)
    p = tmp_path / "gone"
    p.write_bytes(b"soon gone")
    f = m.open(p)
    assert bytes(f.pread(0, 4)) == b"soon"
    os.remove(p)
    with pytest.raises(InvalidArgument, match="no such file"):
        m.open(p, create=False)
    f.pwrite(b"still", 0)  # as on Linux, the open file outlives its name
    assert f.fsync() == 0
    f.close()
    assert free_pages(m) == start


def test_bad_arguments(m):
    f = m.open(size=PS)
    mm = m.address_space()
    with pytest.raises(InvalidArgument, match="page-aligned"):
        mm.mmap(PS, file=f, offset=10)
    with pytest.raises(InvalidArgument, match="base pages"):
        mm.mmap(PS, file=f, order=9)
    with pytest.raises(InvalidArgument, match="File"):
        mm.mmap(PS, file="not a file")
    with pytest.raises(InvalidArgument, match="fs must be"):
        m.open(fs="ntfs")
    f.close()
    with pytest.raises(InvalidArgument, match="closed"):
        f.pread(0, 1)
    with pytest.raises(InvalidArgument, match="closed"):
        mm.mmap(PS, file=f)


def test_pwrite_waits_for_a_locked_folio(m):
    f = m.open(size=PS)
    f.pwrite(b"before", 0)
    pfn = int(f.folio_pfns(0, 1)[0])
    m.page_controls.lock_page(pfn)
    done = threading.Event()
    t = threading.Thread(target=lambda: (f.pwrite(b"after!", 0), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.2)  # generic_perform_write sleeps on the folio lock
    m.page_controls.unlock_page(pfn)
    assert done.wait(10)
    assert bytes(f.pread(0, 6)) == b"after!"
    data = np.frombuffer(disk(f), dtype=np.uint8)
    assert data.size == PS


@pytest.mark.parametrize(("point", "err"), [("writeback", -5), ("disk_full", -28)])
def test_a_failed_writeback_keeps_the_folio_dirty_and_fsync_reports_it(m, point, err):
    f = m.open(size=2 * PS)
    f.pwrite(b"kept dirty", 0)
    with m.faults.injecting(point, probability=1.0, times=1):
        assert f.fsync() == err  # the error, once
    pfn = int(f.folio_pfns(0, 1)[0])
    assert PageFlag.DIRTY in m.page_controls.page_flags(pfn)
    assert m.faults.injected[point] == 1
    assert f.fsync() == 0  # written this time
    assert disk(f)[:10] == b"kept dirty"
    assert m.page_cache.check_counters() == [] and check_machine(m) == []


def test_the_flusher_meets_an_io_error_and_fsync_reports_it(m):
    m.page_cache.writeback_interval = 0.001
    f = m.open(size=PS)
    with m.faults.injecting("writeback", probability=1.0, times=1):
        f.pwrite(b"retried", 0)
        deadline = time.monotonic() + 10
        while m.faults.injected["writeback"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.002)
    assert f.fsync() == -5
    deadline = time.monotonic() + 10
    while disk(f)[:7] != b"retried":  # the flusher (or fsync) wrote the still-dirty folio again
        assert time.monotonic() < deadline
        f.fsync()
        time.sleep(0.002)


def test_msync_writes_back_the_files_a_range_maps(m):
    f = m.open(size=4 * PS)
    g = m.open(size=4 * PS)
    mm = m.address_space()
    a = mm.mmap(4 * PS, file=f, shared=True)
    b = mm.mmap(4 * PS, file=g, shared=False)
    mm.write(a + PS, b"msync")
    mm.write(b, b"private")
    assert mm.msync(a, 4 * PS) == 0
    assert disk(f)[PS:PS + 5] == b"msync"
    assert mm.msync(b, 4 * PS) == 0 and disk(g) == b"\0" * 4 * PS
    mm.write(a, b"async")
    assert mm.msync(a, PS, sync=False) == 0
    assert f.fsync() == 0 and disk(f)[:5] == b"async"
    with m.faults.injecting("writeback", probability=1.0, times=1):
        mm.write(a, b"error")
        assert mm.msync(a, PS) == -5
    assert mm.msync(a, PS) == 0 and disk(f)[:5] == b"error"


def test_a_file_too_large_for_its_page_cache_is_refused(m):
    from dmamig.filemap import MAX_FILE_PAGES
    f = m.open(size=PS)
    limit = MAX_FILE_PAGES * PS
    with pytest.raises(InvalidArgument, match="at most"):
        f.pwrite(b"x", limit)
    with pytest.raises(InvalidArgument, match="at most"):
        f.ftruncate(limit + 1)
    with pytest.raises(InvalidArgument, match="at most"):
        m.open(size=limit + 1)
    mm = m.address_space()
    with pytest.raises(InvalidArgument, match="at most"):
        mm.mmap(2 * PS, file=f, offset=limit - PS)
    assert f.size == PS
