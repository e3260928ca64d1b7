"""The DMA engine on the CPU backend: exact copies, fences, timeouts, fault injection, validation, stats."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dmamig import Machine
from dmamig.backends.cpu import copy_loops as cpu_kernels
from dmamig.backends.cpu.backend import CpuBackend
from dmamig.backends.cpu.channel import CpuChannel
from dmamig.dma import DmaEngine, DmaStats, Fence, PlanOptions, page_checksums
from dmamig.errors import DmaError, InvalidArgument
from dmamig.nodes import Node, NodeMap

PAGE = 256  # small pages keep the tests fast; a multiple of 64 so the streaming kernel is used


def make_nodes(backend, sizes=(64, 48, 40), page_size=PAGE, seed=0):
    rng = np.random.default_rng(seed)
    nodes, base = [], 0
    for i, n in enumerate(sizes):
        frames = backend.alloc_frames("host" if i == 0 else "device", i - 1, n, page_size)
        frames[:] = rng.integers(0, 256, frames.shape, dtype=np.uint8)
        nodes.append(Node(i, "host" if i == 0 else "device", i - 1, base, n, frames))
        base += n
    return tuple(nodes)


def snapshot(nodes):
    return np.concatenate([n.frames for n in nodes])


@pytest.fixture
def cpu_engine():
    backend = CpuBackend()
    nodes = make_nodes(backend)
    engine = DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE, channels=3)
    yield engine, nodes
    engine.close()


def random_submission(rng, total, n):
    """n distinct destinations and n sources that are not destinations."""
    perm = rng.permutation(total)
    dst = perm[:n]
    src = rng.choice(perm[n:], size=n, replace=True)
    return src, dst


# -- exact copies ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_random_copies_match_numpy_reference(channels):
    backend = CpuBackend()
    nodes = make_nodes(backend, seed=channels)
    total = sum(n.total_pages for n in nodes)
    rng = np.random.default_rng(10 + channels)
    with DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE,
                   channels=channels) as engine:
        for _ in range(15):
            n = int(rng.integers(1, total // 2))
            src, dst = random_submission(rng, total, n)
            before = snapshot(nodes)
            expect = before.copy()
            expect[dst] = before[src]
            assert engine.copy(src, dst).wait(timeout=30)
            np.testing.assert_array_equal(snapshot(nodes), expect)


def test_contiguous_blocks_between_every_node_pair(cpu_engine):
    engine, nodes = cpu_engine
    for s in nodes:
        for d in nodes:
            if s is d:
                continue
            n = 20
            src = s.base_pfn + 3 + np.arange(n)
            dst = d.base_pfn + 10 + np.arange(n)
            expect = s.frames[3:3 + n].copy()
            engine.copy(src, dst).wait()
            np.testing.assert_array_equal(d.frames[10:10 + n], expect)


def test_within_one_node(cpu_engine):
    engine, nodes = cpu_engine
    frames = nodes[1].frames
    expect = frames[0:10].copy()
    base = nodes[1].base_pfn
    engine.copy(base + np.arange(10), base + 20 + np.arange(10)[::-1]).wait()
    np.testing.assert_array_equal(frames[20:30][::-1], expect)


def test_one_huge_contiguous_copy_uses_every_channel():
    backend = CpuBackend()
    nodes = make_nodes(backend, sizes=(600, 600))
    with DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE, channels=4,
                   options=PlanOptions(split_min_pages=16)) as engine:
        src = np.arange(600)
        expect = nodes[0].frames.copy()
        engine.copy(src, src + 600).wait()
        np.testing.assert_array_equal(nodes[1].frames, expect)
        busy = engine.stats.busy_seconds
        assert len(busy) == 4 and all(b > 0 for b in busy)
        assert engine.stats.memcpy_calls == 4


def test_unaligned_page_size_uses_cached_kernel():
    backend = CpuBackend()
    nodes = make_nodes(backend, sizes=(30, 30), page_size=100)
    assert not cpu_kernels.stream_copy_ok(nodes[0].frames, nodes[1].frames)
    with DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=100, channels=2) as engine:
        src = np.array([3, 1, 4, 15, 9, 26, 5])
        expect = nodes[0].frames[src].copy()
        engine.copy(src, 30 + np.arange(7)).wait()
        np.testing.assert_array_equal(nodes[1].frames[:7], expect)


def test_numpy_fallback_copies_the_same(monkeypatch, cpu_engine):
    engine, nodes = cpu_engine
    monkeypatch.setattr(cpu_kernels, "HAVE_NUMBA", False)
    rng = np.random.default_rng(5)
    src, dst = random_submission(rng, 152, 60)
    before = snapshot(nodes)
    expect = before.copy()
    expect[dst] = before[src]
    engine.copy(src, dst).wait()
    np.testing.assert_array_equal(snapshot(nodes), expect)


# -- fences -----------------------------------------------------------------------------------------------------
def test_empty_submission_is_already_done(cpu_engine):
    engine, _ = cpu_engine
    fence = engine.copy(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert isinstance(fence, Fence) and fence.done and fence.wait(timeout=0)
    assert engine.stats.submissions == 0


class GatedChannel(CpuChannel):
    """A channel that holds its jobs until the test opens the gate (deterministic timeouts)."""

    def __init__(self, index, gate, fail=False):
        self.gate, self.fail = gate, fail
        super().__init__(index)

    def _execute(self, work):
        self.gate.wait()
        if self.fail:
            raise RuntimeError("simulated copy-engine fault")
        super()._execute(work)


class GatedBackend(CpuBackend):
    def __init__(self, fail=False):
        self.gate = threading.Event()
        self.fail = fail

    def open_channels(self, count):
        return [GatedChannel(i, self.gate, self.fail) for i in range(count)]


def gated_engine(fail=False, channels=2):
    backend = GatedBackend(fail)
    nodes = make_nodes(backend, sizes=(32, 32))
    return DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE,
                     channels=channels), nodes, backend.gate


def test_copy_returns_before_the_copy_and_wait_times_out():
    engine, nodes, gate = gated_engine()
    try:
        expect = nodes[0].frames[:8].copy()
        fence = engine.copy(np.arange(8), 32 + np.arange(8))
        assert not fence.done
        assert fence.wait(timeout=0) is False
        assert fence.wait(timeout=0.05) is False
        gate.set()
        assert fence.wait(timeout=30) is True
        assert fence.done and fence.wait() is True
        np.testing.assert_array_equal(nodes[1].frames[:8], expect)
    finally:
        gate.set()
        engine.close()


def test_channel_failure_raises_dma_error_on_every_wait():
    engine, nodes, gate = gated_engine(fail=True)
    gate.set()
    try:
        fence = engine.copy(np.arange(4), 32 + np.arange(4))
        for _ in range(2):
            with pytest.raises(DmaError, match="simulated copy-engine fault") as info:
                fence.wait(timeout=30)
            assert isinstance(info.value.__cause__, RuntimeError)
        assert fence.done
        assert engine.stats.errors == 1
    finally:
        engine.close()


# -- injected errors ------------------------------------------------------------------------------------------
def test_injected_errors_raise_keep_sources_and_engine_usable(cpu_engine):
    engine, nodes = cpu_engine
    rng = np.random.default_rng(7)
    engine.inject_errors(2)
    # Empty submissions do not consume an injected error.
    engine.copy([], []).wait()
    for _ in range(2):
        src, dst = random_submission(rng, 152, 50)
        sources = snapshot(nodes)[src].copy()
        fence = engine.copy(src, dst)
        with pytest.raises(DmaError, match="injected"):
            fence.wait(timeout=30)
        with pytest.raises(DmaError):
            fence.wait()
        assert fence.done
        np.testing.assert_array_equal(snapshot(nodes)[src], sources)
    assert engine.stats.errors == 2
    src, dst = random_submission(rng, 152, 50)
    before = snapshot(nodes)
    assert engine.copy(src, dst).wait(timeout=30)
    np.testing.assert_array_equal(snapshot(nodes)[dst], before[src])
    assert engine.stats.errors == 2


def test_inject_errors_argument(cpu_engine):
    engine, _ = cpu_engine
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(InvalidArgument):
            engine.inject_errors(bad)


# -- validation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src, dst, match", [
    ([1, 2], [3], "same length"),
    ([1.0], [3.0], "integer dtype"),
    ([[1]], [[2]], "1-D"),
    ([-1], [3], "outside the machine's pfns"),
    ([1], [152], "outside the machine's pfns"),
    ([1, 2], [5, 5], "more than once"),
    ([4], [4], "copied onto itself"),
    ([1, 2], [2, 7], "both a source and a destination"),
])
def test_bad_arguments(cpu_engine, src, dst, match):
    engine, _ = cpu_engine
    with pytest.raises(InvalidArgument, match=match):
        engine.copy(np.array(src), np.array(dst))


def test_constructor_arguments():
    backend = CpuBackend()
    nodes = make_nodes(backend, sizes=(8,))
    for bad in (0, -2, 1.0, True):
        with pytest.raises(InvalidArgument, match="channels"):
            DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE, channels=bad)


def test_unsigned_and_narrow_pfn_dtypes(cpu_engine):
    engine, nodes = cpu_engine
    expect = nodes[0].frames[[1, 2]].copy()
    engine.copy(np.array([1, 2], dtype=np.uint16), np.array([70, 71], dtype=np.int32)).wait()
    np.testing.assert_array_equal(nodes[1].frames[[70 - 64, 71 - 64]], expect)


# -- checksums --------------------------------------------------------------------------------------------------
MASK = (1 << 64) - 1


def python_checksum(page: bytes) -> int:
    """The checksum definition with Python integers, word by word."""
    total = 0
    for j in range(len(page) // 4):
        w = int.from_bytes(page[4 * j:4 * j + 4], "little")
        m = ((w | (j << 32)) * 0x9E3779B97F4A7C15) & MASK
        m ^= m >> 31
        m = (m * 0xBF58476D1CE4E5B9) & MASK
        total = (total + m) & MASK
    return total


def test_checksum_matches_the_definition():
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (5, 64), dtype=np.uint8)
    frames[0] = 0
    frames[1] = 255
    got = page_checksums(frames)
    assert got.dtype == np.uint64
    assert got.tolist() == [python_checksum(bytes(row)) for row in frames]


def test_checksum_detects_flips_swaps_and_shifts():
    rng = np.random.default_rng(9)
    page = rng.integers(0, 256, (1, 4096), dtype=np.uint8)
    ref = int(page_checksums(page)[0])
    for byte in (0, 1, 2047, 4095):
        for bit in range(8):
            flipped = page.copy()
            flipped[0, byte] ^= 1 << bit
            assert int(page_checksums(flipped)[0]) != ref
    swapped = page.copy().view(np.uint32)
    swapped[0, [3, 9]] = swapped[0, [9, 3]]
    if swapped[0, 3] != swapped[0, 9]:
        assert int(page_checksums(swapped.view(np.uint8))[0]) != ref
    assert int(page_checksums(np.roll(page, 4, axis=1))[0]) != ref
    # Content only: the same bytes anywhere give the same checksum; chunking does not matter.
    many = np.repeat(page, 3000, axis=0)
    assert (page_checksums(many) == ref).all()


def test_checksum_arguments():
    with pytest.raises(InvalidArgument, match="multiple of 4"):
        page_checksums(np.zeros((2, 6), dtype=np.uint8))
    with pytest.raises(InvalidArgument, match="2-D uint8"):
        page_checksums(np.zeros((2, 8), dtype=np.int16))
    assert page_checksums(np.zeros((0, 8), dtype=np.uint8)).shape == (0,)


def test_engine_checksum_follows_copies(cpu_engine):
    engine, nodes = cpu_engine
    pfns = np.array([0, 70, 140, 5, 151])
    np.testing.assert_array_equal(engine.checksum(pfns), page_checksums(snapshot(nodes)[pfns]))
    src, dst = np.array([3, 4, 5]), np.array([100, 120, 60])
    engine.copy(src, dst).wait()
    np.testing.assert_array_equal(engine.checksum(src), engine.checksum(dst))
    assert engine.checksum([]).shape == (0,)
    with pytest.raises(InvalidArgument):
        engine.checksum([152])


# -- stats and life cycle -------------------------------------------------------------------------------------------
def test_stats_count_submissions(cpu_engine):
    engine, _ = cpu_engine
    engine.reset_stats()
    engine.copy(np.arange(20), 64 + np.arange(20)).wait()      # one long run
    engine.copy(np.array([0, 2, 4]), np.array([70, 80, 90])).wait()  # three scattered pages
    s = engine.stats
    assert isinstance(s, DmaStats)
    assert (s.submissions, s.pages, s.bytes) == (2, 23, 23 * PAGE)
    assert s.runs == 4 and s.memcpy_calls == 1 and s.kernel_launches >= 1 and s.errors == 0
    assert len(s.busy_seconds) == 3 and sum(s.busy_seconds) > 0
    engine.reset_stats()
    s = engine.stats
    assert (s.submissions, s.pages, s.bytes, s.runs, s.memcpy_calls, s.kernel_launches) == (0, 0, 0, 0, 0, 0)
    assert s.busy_seconds == [0.0, 0.0, 0.0]


def test_close_is_idempotent_and_final():
    backend = CpuBackend()
    nodes = make_nodes(backend, sizes=(16, 16))
    engine = DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE, channels=2)
    fence = engine.copy(np.arange(16), 16 + np.arange(16))
    engine.synchronize()
    assert fence.done
    engine.close()
    engine.close()
    assert engine.closed
    with pytest.raises(DmaError, match="closed"):
        engine.copy([0], [16])
    assert engine.channels == 2


def test_close_waits_for_pending_work():
    engine, nodes, gate = gated_engine()
    expect = nodes[0].frames[:10].copy()
    fence = engine.copy(np.arange(10), 32 + np.arange(10))
    threading.Timer(0.05, gate.set).start()
    engine.close()
    assert fence.done
    np.testing.assert_array_equal(nodes[1].frames[:10], expect)


# -- the migrating thread's folio copy ------------------------------------------------------------------------------
@pytest.mark.parametrize("numba_on", [True, False])
def test_copy_folios(monkeypatch, numba_on):
    monkeypatch.setattr(cpu_kernels, "HAVE_NUMBA", numba_on and cpu_kernels.HAVE_NUMBA)
    backend = CpuBackend()
    rng = np.random.default_rng(11)
    src = backend.alloc_frames("host", -1, 64, PAGE)
    src[:] = rng.integers(0, 256, src.shape, dtype=np.uint8)
    dst = backend.alloc_frames("device", 0, 64, PAGE)
    s_idx, d_idx, nr = np.array([0, 8, 40]), np.array([32, 0, 60]), np.array([8, 1, 4])
    backend.copy_folios(src, s_idx, dst, d_idx, nr)
    for s, d, n in zip(s_idx, d_idx, nr):
        np.testing.assert_array_equal(dst[d:d + n], src[s:s + n])
    with pytest.raises(InvalidArgument, match="outside"):
        backend.copy_folios(src, np.array([62]), dst, np.array([0]), np.array([4]))
    with pytest.raises(InvalidArgument, match="one length"):
        backend.copy_folios(src, np.array([1, 2]), dst, np.array([0]), np.array([1]))


def test_frames_are_page_aligned():
    frames = CpuBackend().alloc_frames("host", -1, 3, 4096)
    assert frames.ctypes.data % 4096 == 0 and frames.shape == (3, 4096) and not frames.any()


def test_a_failed_share_names_its_pages_and_the_rest_were_copied():
    """Fence.failed_pages: the destination pfns of the refused channel share; every other page is copied."""
    from dmamig import Machine

    m = Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu", channels=2)
    try:
        rng = np.random.default_rng(4)
        src = np.arange(1024, dtype=np.int64)
        m.frames.write_pfns(src, rng.integers(0, 256, (1024, m.page_size), dtype=np.uint8))
        dst = m.alloc_pages(1, 1024)
        m.dma.inject_errors(1)
        fence = m.dma.copy(src, dst)
        with pytest.raises(DmaError):
            fence.wait()
        hit = fence.failed_pages()
        assert hit is not None and hit.size == 512 and np.isin(hit, dst).all()
        ok = ~np.isin(dst, hit)
        assert np.array_equal(m.frames.read_pfns(dst[ok]), m.frames.read_pfns(src[ok]))
        again = m.dma.copy(src, dst)
        assert again.wait() and again.failed_pages().size == 0
        m.put_pages(dst)
    finally:
        m.close()


def test_the_compiled_bounds_check_agrees_with_the_numpy_one():
    """int64 pfn arrays take one compiled pass; other dtypes the numpy passes: same answers, same errors."""
    from dmamig.dma.validate import validate_bounds

    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        src = rng.integers(-2, 40, n)
        dst = rng.integers(-2, 40, n) if rng.random() < 0.5 else np.sort(rng.choice(np.arange(20, 42), n))

        def outcome(dtype, src=src, dst=dst):
            try:
                s, d, bounds = validate_bounds(src.astype(dtype), dst.astype(dtype), 40)
                return s.tolist(), d.tolist(), bounds
            except InvalidArgument as exc:
                return str(exc)

        assert outcome(np.int64) == outcome(np.int32)


def test_copies_both_ways_keep_the_one_call_route(monkeypatch):
    # Each submission after the first per node pair goes straight to its ring route (one compiled call checks
    # it); the full validation is only for a pair's first submission, whatever pair came last.
    import dmamig.dma.engine as engine_module

    m = Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu", channels=2)
    try:
        host, dev = m.nodes[0], m.nodes[1]
        data = np.random.default_rng(3).integers(0, 256, host.frames[:512].shape, dtype=np.uint8)
        host.frames[:512] = data
        pfns = [np.arange(512, dtype=np.int64) + host.base_pfn, np.arange(512, dtype=np.int64) + dev.base_pfn]
        m.dma.copy(pfns[0], pfns[1]).wait()  # (the lane opens on its first, general-path, copy)
        full = []
        real = engine_module.validate_bounds
        monkeypatch.setattr(engine_module, "validate_bounds", lambda *a, **k: full.append(1) or real(*a, **k))
        for i in range(6):
            m.dma.copy(pfns[(i + 1) % 2], pfns[i % 2]).wait()
        assert len(full) == 1  # the way back's first submission; the way there had its own before
        np.testing.assert_array_equal(host.frames[:512], data)
        np.testing.assert_array_equal(dev.frames[:512], data)
    finally:
        m.close()


def test_batches_alternating_between_node_pairs_each_reach_their_own_pages():
    # The engine offers a batch to the route of its last compiled submission first: a batch of another node pair
    # is sent back by the compiled call's check and goes to its own route. Bytes, write stamps and counters exact.
    from dmamig import Machine

    m = Machine(host_pages=1024, device_pages=1024, devices=2, backend="cpu", channels=2)
    try:
        rng = np.random.default_rng(6)
        pages = 0
        for a, b in [(0, 1), (1, 0), (0, 2), (2, 0), (0, 1), (0, 2)] * 2:
            src = m.alloc_pages(a, 64)[rng.permutation(64)]
            m.frames.write_pfns(src, rng.integers(0, 256, (64, m.page_size), dtype=np.uint8))
            dst = m.alloc_pages(b, 64)
            before = int(m.pages.write_seq[dst].min())
            assert m.dma.copy(src, dst).wait()
            pages += 64
            assert np.array_equal(m.frames.read_pfns(dst), m.frames.read_pfns(src))
            assert (m.pages.write_seq[dst] > before).all() and np.unique(m.pages.write_seq[dst]).size == 1
            m.put_pages(src)
            m.put_pages(dst)
        stats = m.dma.stats
        assert stats.pages == pages and stats.bytes == pages * m.page_size and stats.submissions == 12
    finally:
        m.close()
