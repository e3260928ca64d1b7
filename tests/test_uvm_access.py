"""Device-side access, UVM-style: faults, batches, prefetch, ping-pong, two devices (CPU backend)."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import AddressFault, DeviceAccessor, InvalidArgument, Machine, PteFlag, UvmOptions
from dmamig.flags import Prot
from dmamig.page_loops import HAVE_NUMBA
from dmamig.uvm import density_prefetch, prefetch

PS = 4096
BLOCK = 512  # 4 KiB pages per 2 MiB block


@pytest.fixture
def m():
    mach = Machine(host_pages=4096, device_pages=2048, devices=2, backend="cpu", channels=2)
    yield mach
    mach.close()


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _free(m: Machine) -> list[int]:
    return [nd.free_pages for nd in m.nodes]


@pytest.mark.parametrize("no_copy", [True, False])
def test_device_touching_untouched_range_populates_zeroed_pages_on_the_device(m, no_copy):
    mm = m.address_space()
    a = mm.mmap(600 * PS)
    acc = DeviceAccessor(mm, 1, UvmOptions(no_copy=no_copy))
    got = acc.read(a, 600 * PS)
    assert not got.any()
    assert (mm.nodes_of(a, 600 * PS) == 1).all()
    s = acc.stats
    assert s.pages_populated == 600 and s.pages_migrated == 0
    assert s.faults == 600 and s.batches == -(-600 // 256) and s.replays == s.batches
    assert m.nodes[0].free_pages == 4096  # nothing went through the host


@pytest.mark.parametrize("no_copy", [True, False])
def test_device_touching_host_data_migrates_it_intact(m, no_copy):
    mm = m.address_space()
    n = 1000
    a = mm.mmap(n * PS)
    data = _data(n * PS)
    mm.write(a, data)
    acc = DeviceAccessor(mm, 1, UvmOptions(no_copy=no_copy, prefetch="none"))
    assert (acc.read(a + 123, n * PS - 500) == data[123: n * PS - 377]).all()
    assert (mm.nodes_of(a, n * PS) == 1).all()
    s = acc.stats
    assert s.pages_migrated == n and s.bytes_migrated == n * PS
    assert s.batches == 4 and s.pages_faulted == n
    assert (s.service_ns["dma_wait"] > 0) == no_copy
    assert (s.service_ns["copy"] > 0) == (not no_copy)
    # The second access finds every page resident: no more faults.
    acc.read(a, n * PS)
    assert acc.stats.batches == 4 and acc.stats.pages_resident == n
    assert (mm.read(a, n * PS) == data).all()


def test_device_write_then_cpu_read_and_partial_pages(m):
    mm = m.address_space()
    a = mm.mmap(10 * PS)
    base = _data(10 * PS, 1)
    mm.write(a, base)
    acc = DeviceAccessor(mm, 1)
    patch = _data(3 * PS, 2)
    acc.write(a + 100, patch)
    flags = mm.pte_flags(a + PS)
    assert flags & PteFlag.DIRTY and flags & PteFlag.WRITE
    expect = base.copy()
    expect[100: 100 + patch.size] = patch
    assert (acc.read(a, 10 * PS) == expect).all()
    assert (mm.read(a, 10 * PS) == expect).all()


def test_ping_pong_counted_both_ways(m):
    mm = m.address_space()
    n = 64
    a = mm.mmap(n * PS)
    mm.write(a, _data(n * PS, 3))
    acc = DeviceAccessor(mm, 1, UvmOptions(prefetch="none"))
    rounds = 3
    for r in range(rounds):
        acc.write(a, np.full(n * PS, r, np.uint8))
        assert (mm.nodes_of(a, n * PS) == 1).all()
        assert (mm.read(a, n * PS) == r).all()
        assert (mm.nodes_of(a, n * PS) == 0).all()
    # The device faulted every page in each round; the CPU brought every page back each round.
    assert acc.stats.pages_migrated == n * rounds and acc.stats.batches == rounds
    assert m.vmstat["migrate_to_ram"] == n * rounds


def test_scattered_pages_and_duplicates(m):
    mm = m.address_space()
    n = 2048
    a = mm.mmap(n * PS)
    data = _data(n * PS, 4)
    mm.write(a, data)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, n, 300)
    addrs = a + idx * PS
    acc = DeviceAccessor(mm, 2, UvmOptions(prefetch="none", fault_batch_size=64))
    got = acc.read_pages(addrs)
    assert (got == data.reshape(n, PS)[idx]).all()
    s = acc.stats
    # A repeat in the same batch is a duplicate; a repeat after its page came in raises no fault at all.
    assert s.pages_faulted == np.unique(idx).size
    assert s.faults - s.duplicates == np.unique(idx).size and s.faults <= 300
    assert s.batches == -(-s.faults // 64)
    assert set(np.unique(mm.nodes_of(a, n * PS)[idx])) == {2}
    rows = rng.integers(0, 256, (idx.size, PS), dtype=np.uint8)
    acc.write_pages(addrs, rows)
    expect = data.reshape(n, PS).copy()
    expect[idx] = rows  # numpy keeps the last row of a repeated index, as write_pages does
    assert (mm.read(a, n * PS).reshape(n, PS) == expect).all()


def test_faults_per_page_duplicates_are_dropped(m):
    mm = m.address_space()
    a = mm.mmap(256 * PS)
    acc = DeviceAccessor(mm, 1, UvmOptions(faults_per_page=4, prefetch="none"))
    acc.touch(a, 256 * PS)
    s = acc.stats
    assert s.faults == 4 * 256 and s.duplicates == 3 * 256 and s.pages_faulted == 256
    assert s.batches == 4


def test_prefetch_reduces_fault_batches_on_a_sequential_sweep(m):
    results = {}
    for policy in ("none", "density"):
        mm = m.address_space()
        a = mm.mmap(4 * BLOCK * PS)
        mm.populate(a, 4 * BLOCK * PS)
        acc = DeviceAccessor(mm, 1, UvmOptions(prefetch=policy, fault_batch_size=32))
        acc.touch(a, 4 * BLOCK * PS)
        assert (mm.nodes_of(a, 4 * BLOCK * PS) == 1).all()
        results[policy] = acc.stats
        mm.close()
    assert results["none"].batches == 4 * BLOCK // 32
    assert results["none"].pages_prefetched == 0
    assert results["density"].batches * 3 <= results["none"].batches
    assert results["density"].pages_prefetched > 0
    assert results["density"].pages_migrated == 4 * BLOCK


def test_density_prefetch_tree():
    bp = 16
    faulted = np.zeros((1, bp), bool)
    resident = np.zeros((1, bp), bool)
    valid = np.ones((1, bp), bool)
    faulted[0, :8] = True
    # 8 of 16 is 50%: not above 51, so only the faulted half comes.
    assert density_prefetch(faulted, resident, valid, 51).sum() == 8
    resident[0, 8] = True
    out = density_prefetch(faulted, resident, valid, 51)
    assert out[0, :8].all() and not out[0, 8] and out[0, 9:].all()
    valid[0, 15] = False
    assert not density_prefetch(faulted, resident, valid, 51)[0, 15]


def _density_by_page(faulted, resident, valid, threshold):
    """The density policy as its docstring says it, page by page: each faulted page brings the largest aligned
    subregion around it whose occupied pages are more than ``threshold`` percent of it."""
    nb, bp = faulted.shape
    occupied = (faulted | resident) & valid
    out = faulted.copy()
    for b in range(nb):
        for p in np.flatnonzero(faulted[b]).tolist():
            size = 2
            while size <= bp:
                lo = p - p % size
                if occupied[b, lo:lo + size].sum() * 100 > threshold * size:
                    out[b, lo:lo + size] = True
                size *= 2
    return out & valid & ~resident


@pytest.mark.parametrize("path", ["compiled", "numpy"])
def test_density_prefetch_picks_what_the_policy_says_on_random_blocks(monkeypatch, path):
    if path == "numpy":
        monkeypatch.setattr(prefetch, "USE_COMPILED", False)
    elif not HAVE_NUMBA:
        pytest.skip("numba is not available: the numpy path is the only one")
    rng = np.random.default_rng(11)
    for trial in range(60):
        nb, bp = int(rng.integers(1, 4)), 1 << int(rng.integers(1, 10))
        faulted = rng.random((nb, bp)) < rng.random()
        resident = (rng.random((nb, bp)) < rng.random()) & ~faulted
        valid = rng.random((nb, bp)) < 0.95
        threshold = int(rng.integers(1, 101))
        got = density_prefetch(faulted, resident, valid, threshold)
        assert np.array_equal(got, _density_by_page(faulted, resident, valid, threshold)), trial


def test_two_devices_touch_one_range_in_turn(m):
    mm = m.address_space()
    n = 700
    a = mm.mmap(n * PS)
    data = _data(n * PS, 6)
    mm.write(a, data)
    d1, d2 = DeviceAccessor(mm, 1), DeviceAccessor(mm, 2)
    for turn in range(2):
        assert (d1.read(a, n * PS) == data).all()
        assert (mm.nodes_of(a, n * PS) == 1).all()
        data = _data(n * PS, 10 + turn)
        d2.write(a, data)
        assert (mm.nodes_of(a, n * PS) == 2).all()
    assert d1.stats.pages_migrated == 2 * n and d2.stats.pages_migrated == 2 * n
    assert m.vmstat["migrate_to_ram"] == 0  # device to device: the host never held the pages again
    assert (mm.read(a, n * PS) == data).all()
    start = _free(m)
    mm.close()
    assert _free(m) == [4096, 2048, 2048] and start != _free(m)


def test_cow_after_fork_device_write_copies_for_the_writer(m):
    mm = m.address_space()
    a = mm.mmap(8 * PS)
    data = _data(8 * PS, 7)
    mm.write(a, data)
    child = mm.fork()
    acc = DeviceAccessor(mm, 1)
    acc.write(a, np.zeros(PS, np.uint8))
    assert (child.read(a, 8 * PS) == data).all()
    got = mm.read(a, 8 * PS)
    assert not got[:PS].any() and (got[PS:] == data[PS:]).all()
    child.close()
    mm.close()
    assert _free(m) == [4096, 2048, 2048]


def test_pinned_pages_are_accessed_remotely(m):
    mm = m.address_space()
    a = mm.mmap(4 * PS)
    data = _data(4 * PS, 8)
    mm.write(a, data)
    mm.pin(a, PS)
    acc = DeviceAccessor(mm, 1, UvmOptions(prefetch="none"))
    assert (acc.read(a, 4 * PS) == data).all()
    assert mm.node_of(a) == 0 and mm.node_of(a + PS) == 1
    assert acc.stats.pages_remote == 1
    mm.unpin(a, PS)


def test_bad_arguments(m):
    mm = m.address_space()
    a = mm.mmap(4 * PS)
    with pytest.raises(InvalidArgument):
        DeviceAccessor(mm, 0)
    with pytest.raises(InvalidArgument):
        UvmOptions(fault_batch_size=0)
    with pytest.raises(InvalidArgument):
        UvmOptions(prefetch="tree")
    acc = DeviceAccessor(mm, 1)
    with pytest.raises(AddressFault):
        acc.read(a + 8 * PS, PS)
    with pytest.raises(InvalidArgument):
        acc.read_pages([a + 1])
    mm.mprotect(a, 4 * PS, Prot.READ)
    with pytest.raises(AddressFault):
        acc.write(a, b"x")
    assert not acc.read(a, PS).any()


def test_access_counter_migration_maps_remote_first(m):
    mm = m.address_space()
    n = 100
    a = mm.mmap(2 * n * PS)
    data = _data(n * PS, 9)
    mm.write(a, data)  # the first n pages on the host; the next n never touched
    acc = DeviceAccessor(mm, 1, UvmOptions(access_counter_threshold=3, prefetch="none"))
    for i in range(2):
        assert (acc.read(a, n * PS) == data).all()
        assert (mm.nodes_of(a, n * PS) == 0).all()
        assert acc.stats.pages_remote == n * (i + 1) and acc.stats.pages_migrated == 0
    acc.touch(a, n * PS)  # the third access: every count reaches the threshold
    assert (mm.nodes_of(a, n * PS) == 1).all()
    assert acc.stats.pages_counter_migrated == n and acc.stats.pages_migrated == n
    # Untouched pages fault in on the device at once: there is nothing remote to count.
    acc.touch(a + n * PS, n * PS)
    assert (mm.nodes_of(a + n * PS, n * PS) == 1).all() and acc.stats.pages_populated == n
    assert (mm.read(a, n * PS) == data).all()


def test_access_counters_count_repeats_in_a_page_list():
    from dmamig.uvm.counters import AccessCounters

    c = AccessCounters(4)
    assert not c.count(np.array([10, 20]), np.array([1, 3])).any()
    reached = c.count(np.array([5, 20]), np.array([1, 1]))
    assert reached.tolist() == [False, True]
    assert c.counts_of(np.array([5, 10, 20, 30])).tolist() == [1, 1, 0, 0]
    assert len(c) == 2


def test_resident_pages_are_accessed_with_the_backend_access_kernel(m, monkeypatch):
    mm = m.address_space()
    a = mm.mmap(16 * PS)
    mm.write(a, _data(16 * PS, 11))
    calls = []
    real = type(m.backend).access_frames

    def spy(self, frames, idx, data=None):
        calls.append((frames is m.nodes[1].frames, idx.size, data is None))
        return real(self, frames, idx, data)

    monkeypatch.setattr(type(m.backend), "access_frames", spy)
    acc = DeviceAccessor(mm, 1)
    acc.read(a, 16 * PS)
    acc.write_pages([a], np.zeros((1, PS), np.uint8))
    assert calls == [(True, 16, True), (True, 1, False)]
    s = acc.stats
    assert s.service_ns["unmap"] > 0 and s.service_ns["move"] > 0 and s.service_ns["fetch"] > 0
    assert s.service_total_ns == sum(s.service_ns.values()) and s.access_ns > 0
    assert s.service_ns_per_batch == s.service_total_ns / s.batches
    d = s.as_dict()
    assert d["faults"] == s.faults and d["service_ns"]["move"] == s.service_ns["move"]


@pytest.mark.parametrize("page", [64, 4096, 100])
def test_read_touch_kernel_matches_numpy(page):
    from dmamig.backends.cpu import copy_loops as cpu_kernels

    frames = cpu_kernels.aligned_zeros(20, page)
    frames[:] = np.random.default_rng(page).integers(0, 256, frames.shape, dtype=np.uint8)
    idx = np.array([3, 0, 19, 3])
    words = frames[idx].reshape(-1)
    words = words[: words.size - words.size % 8].view(np.uint64)
    assert cpu_kernels.xor_pages(frames, idx) == int(np.bitwise_xor.reduce(words))
