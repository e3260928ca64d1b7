"""The CUDA backend and its kernels against numpy references (run only where a CUDA GPU is usable; where a GPU
is present but CUDA cannot use it, these fail with the reason instead of skipping)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from support import contents, engine_for, make_nodes

from dmamig import Machine, MigrateMode
from dmamig.dma import PlanOptions, page_checksums
from dmamig.dma.channel import ChannelWork
from dmamig.dma.copy_plan import METHOD_GATHER, METHOD_MEMCPY
from dmamig.errors import DmaError

pytestmark = pytest.mark.gpu

PAGE = 4096


@pytest.fixture(scope="module")
def cp(gpu_required):
    import cupy

    return cupy


@pytest.fixture(scope="module")
def cuda(gpu_required):
    from dmamig.backends.cuda import CudaBackend

    backend = CudaBackend()
    yield backend
    backend.close()


def two_gpus(cp) -> None:
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA devices; 1 is visible")


def host(backend):
    return backend.alloc_frames("host", -1, 1, PAGE)



# -- build and memory --------------------------------------------------------------------------------------------
def test_kernels_compile(cuda):
    from dmamig.backends.cuda import KERNEL_FILES, kernel_build_status, nvrtc_status

    assert nvrtc_status()["found"], nvrtc_status()["detail"]
    assert kernel_build_status() == dict.fromkeys(KERNEL_FILES, "compiled OK")
    assert cuda.kernel(0, "page_copy.cu", "page_gather_copy") is not None and cuda.kernels_available


def test_pinned_host_frames(cuda, cp):
    frames = cuda.alloc_frames("host", -1, 8, PAGE)
    assert isinstance(frames, np.ndarray) and frames.shape == (8, PAGE) and not frames.any()
    attrs = cp.cuda.runtime.pointerGetAttributes(frames.ctypes.data)
    assert attrs.type == 1  # cudaMemoryTypeHost: page-locked, device-addressable
    assert attrs.devicePointer == frames.ctypes.data  # UVA: the host pointer is the device pointer


def test_device_frames_read_write_zero(cuda, cp):
    from dmamig.backends.cuda import DeviceFrames

    frames = cuda.alloc_frames("device", 0, 32, PAGE)
    assert isinstance(frames, DeviceFrames) and frames.device == 0 and int(cp.asarray(frames).sum()) == 0
    rng = np.random.default_rng(1)
    idx = rng.permutation(32)[:10]
    data = rng.integers(0, 256, (10, PAGE), dtype=np.uint8)
    cuda.write_frames(frames, idx, data)
    np.testing.assert_array_equal(cuda.read_frames(frames, idx), data)
    np.testing.assert_array_equal(cuda.read_frames(frames, np.arange(3, 7)), cp.asnumpy(cp.asarray(frames)[3:7]))
    cuda.zero_frames(frames, idx[:4])
    assert not cuda.read_frames(frames, idx[:4]).any()
    np.testing.assert_array_equal(cuda.read_frames(frames, idx[4:]), data[4:])


@pytest.mark.parametrize("pair", [("host", "device"), ("device", "host"), ("device", "device")])
def test_copy_folios(cuda, pair):
    rng = np.random.default_rng(2)
    src = cuda.alloc_frames(pair[0], 0, 64, PAGE)
    dst = cuda.alloc_frames(pair[1], 0, 64, PAGE)
    data = rng.integers(0, 256, (64, PAGE), dtype=np.uint8)
    cuda.write_frames(src, np.arange(64), data)
    s, d, n = np.array([0, 16, 40]), np.array([32, 0, 60]), np.array([16, 1, 4])
    calls = cuda.copy_stats["calls"]
    cuda.copy_folios(src, s, dst, d, n)
    out = cuda.read_frames(dst, np.arange(64))
    for a, b, k in zip(s, d, n):
        np.testing.assert_array_equal(out[b:b + k], data[a:a + k])
    assert cuda.copy_stats["calls"] == calls + 3 and cuda.copy_stats["us_per_call"] > 0


def test_devices_info(cuda, cp):
    infos = cuda.devices()
    assert len(infos) == cp.cuda.runtime.getDeviceCount()
    for info in infos:
        assert info["name"] and info["memory_bytes"] > 0
        assert len(info["compute_capability"]) == 2 and info["compute_capability"][0] >= 3
        assert isinstance(info["peers"], list)


@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d"])
def test_copy_ceiling_is_a_positive_event_timing(cuda, direction):
    seconds = cuda.copy_ceiling(direction, 8 << 20, repeat=2)
    # A copy takes some time, and 8 MiB cannot move faster than 100 TB/s on any current link.
    assert 8e-8 < seconds < 10.0


def test_copy_ceiling_rejects_unknown_direction(cuda):
    from dmamig.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="direction"):
        cuda.copy_ceiling("h2h", 1 << 20)


# -- channels, streams, events ------------------------------------------------------------------------------------
def test_channels_have_their_own_non_blocking_streams(cuda, cp):
    channels = cuda.open_channels(3)
    streams = [ch.stream(0) for ch in channels]
    assert len({s.ptr for s in streams}) == 3 and all(s.ptr != 0 for s in streams)
    for s in streams:
        # cudaStreamNonBlocking == 1
        assert cp.cuda.runtime.streamGetFlags(s.ptr) & 1
    for ch in channels:
        ch.close()


@pytest.mark.parametrize("method", [METHOD_GATHER, METHOD_MEMCPY])
def test_engine_random_pages_match_numpy(cuda, method):
    # A host node and two device nodes; the second shares device 0 when only one GPU is present.
    nodes = make_nodes(cuda, sizes=(256, 256, 128), devices=(-1, 0, 0), seed=3)
    # Force one method: the gather kernel for everything, or one cudaMemcpyAsync per run.
    opts = PlanOptions(memcpy_min_pages=10**9) if method == METHOD_GATHER else PlanOptions(memcpy_min_pages=1)
    rng = np.random.default_rng(4)
    total = sum(n.total_pages for n in nodes)
    with engine_for(cuda, nodes, channels=3, options=opts) as engine:
        for _ in range(5):
            perm = rng.permutation(total)
            n = int(rng.integers(1, total // 2))
            dst, src = perm[:n], rng.choice(perm[n:], size=n)
            before = contents(cuda, nodes)
            expect = before.copy()
            expect[dst] = before[src]
            fence = engine.copy(src, dst)
            assert fence.wait(timeout=60)
            assert fence.done
            np.testing.assert_array_equal(contents(cuda, nodes), expect)
        stats = engine.stats
        if method == METHOD_GATHER:
            assert stats.kernel_launches > 0 and stats.memcpy_calls == 0
        else:
            assert stats.memcpy_calls > 0 and stats.kernel_launches == 0
        assert sum(stats.busy_seconds) > 0


def test_engine_contiguous_runs_and_wait_without_timeout(cuda):
    nodes = make_nodes(cuda, sizes=(1024, 1024), devices=(-1, 0), seed=5)
    with engine_for(cuda, nodes, channels=4) as engine:
        before = contents(cuda, nodes)
        fence = engine.copy(np.arange(1024), 1024 + np.arange(1024))
        assert fence.wait() is True
        np.testing.assert_array_equal(contents(cuda, nodes)[1024:], before[:1024])
        fence = engine.copy(1024 + np.arange(512), np.arange(512))
        engine.synchronize()
        assert fence.done
        np.testing.assert_array_equal(contents(cuda, nodes)[:512], before[:512])


def test_injected_error_on_cuda(cuda):
    nodes = make_nodes(cuda, sizes=(64, 64), devices=(-1, 0), seed=6)
    with engine_for(cuda, nodes) as engine:
        before = contents(cuda, nodes)
        engine.inject_errors(1)
        fence = engine.copy(np.arange(0, 64, 2), 64 + np.arange(32))
        with pytest.raises(DmaError):
            fence.wait(timeout=60)
        np.testing.assert_array_equal(contents(cuda, nodes)[:64], before[:64])
        assert engine.copy(np.arange(10), 64 + np.arange(10)).wait(timeout=60)


# -- checksum kernel -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [PAGE, 256])
def test_checksum_kernel_matches_numpy(cuda, page):
    nodes = make_nodes(cuda, sizes=(100, 100), devices=(-1, 0), seed=7, page=page)
    host_frames = nodes[0].frames
    host_frames[3] = 0
    host_frames[4] = 255
    for node in nodes:
        idx = np.random.default_rng(8).permutation(node.total_pages)[:60]
        ref = page_checksums(cuda.read_frames(node.frames, idx))
        np.testing.assert_array_equal(cuda.checksum_frames(node.frames, idx), ref)
    with engine_for(cuda, nodes) as engine:
        np.testing.assert_array_equal(engine.checksum(np.arange(200)), page_checksums(contents(cuda, nodes)))


# -- peers -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peer_access", [True, False], ids=["peer", "staged"])
def test_peer_copies_runs_and_scattered_pages(cuda, cp, peer_access):
    two_gpus(cp)
    if peer_access and (1, 0) not in cuda.peers:
        pytest.skip("devices 0 and 1 have no peer access")
    saved = set(cuda.peers)
    if not peer_access:
        cuda.peers = set()  # as on a machine without peer access: kernels stay on their device, copies stage
    try:
        nodes = make_nodes(cuda, sizes=(64, 256, 256), devices=(-1, 0, 1), seed=9)
        with engine_for(cuda, nodes, channels=2, options=PlanOptions(memcpy_min_pages=4)) as engine:
            before = contents(cuda, nodes)
            # contiguous multi-page runs device 0 -> device 1, and scattered pages device 1 -> device 0
            src = np.concatenate([64 + np.arange(100), 320 + np.random.default_rng(10).permutation(128)[:50]])
            dst = np.concatenate([320 + 130 + np.arange(100), 64 + 150 + np.arange(50)])
            engine.copy(src, dst).wait()
            np.testing.assert_array_equal(contents(cuda, nodes)[dst], before[src])
            assert engine.stats.memcpy_calls > 0
        # folio copies between the two devices, and frames on device 1 read, written and checksummed
        cuda.copy_folios(nodes[2].frames, np.array([0, 40]), nodes[1].frames, np.array([200, 10]), np.array([8, 2]))
        np.testing.assert_array_equal(cuda.read_frames(nodes[1].frames, np.arange(200, 208)),
                                      cuda.read_frames(nodes[2].frames, np.arange(8)))
        idx = np.arange(256)
        np.testing.assert_array_equal(cuda.checksum_frames(nodes[2].frames, idx),
                                      page_checksums(cuda.read_frames(nodes[2].frames, idx)))
    finally:
        cuda.peers = saved


def test_batch_copy_reports_availability(cuda):
    assert isinstance(cuda.batch_copy_available, bool)
    assert cuda.batch_copy_available or cuda.batch_copy_reason


def test_batched_memcpy_path():
    from dmamig.backends.cuda import CudaBackend

    backend = CudaBackend(batch_copy=True)
    try:
        if not backend.batch_copy_available:
            pytest.skip(f"cuMemcpyBatchAsync is not available: {backend.batch_copy_reason}")
        nodes = make_nodes(backend, sizes=(512, 512), devices=(-1, 0), seed=13)
        opts = PlanOptions(memcpy_min_pages=2, use_batch=True, batch_max_pages=64)
        with engine_for(backend, nodes, options=opts) as engine:
            before = contents(backend, nodes)
            src = np.concatenate([np.arange(0, 100), np.arange(200, 204), np.arange(300, 340)])
            dst = 512 + np.concatenate([np.arange(400, 500), np.arange(10, 14), np.arange(100, 140)])
            engine.copy(src, dst).wait(timeout=60)
            np.testing.assert_array_equal(contents(backend, nodes)[dst], before[src])
            assert engine.stats.batch_calls > 0, backend.batch_copy_reason
    finally:
        backend.close()


# -- grid-stride loops, odd page sizes ----------------------------------------------------------------------------
def test_kernels_with_more_pages_than_the_grid(cuda, monkeypatch):
    from dmamig.backends.cuda import kernels as cuda_kernels

    # Real grid size: 70,000 pages of 64 bytes is more than MAX_GRID blocks.
    page = 64
    n = cuda_kernels.MAX_GRID + 4464
    nodes = make_nodes(cuda, sizes=(n, n), devices=(-1, 0), seed=14, page=page)
    with engine_for(cuda, nodes, channels=1, options=PlanOptions(memcpy_min_pages=10**9)) as engine:
        before = contents(cuda, nodes)
        perm = np.random.default_rng(15).permutation(n)
        engine.copy(perm, n + np.arange(n)).wait(timeout=120)
        after = contents(cuda, nodes)
        np.testing.assert_array_equal(after[n:], before[perm])
        np.testing.assert_array_equal(engine.checksum(np.arange(2 * n)), page_checksums(after))
        # A tiny grid: every block strides over many pages.
        monkeypatch.setattr(cuda_kernels, "MAX_GRID", 3)
        engine.copy(n + np.arange(1000), np.arange(1000)).wait(timeout=120)
        np.testing.assert_array_equal(contents(cuda, nodes)[:1000], before[perm[:1000]])
        np.testing.assert_array_equal(engine.checksum(np.arange(1000)), page_checksums(before[perm[:1000]]))


@pytest.mark.parametrize("page", [24, 100])
def test_checksum_of_pages_not_a_multiple_of_16(cuda, page):
    for kind, dev in (("host", -1), ("device", 0)):
        frames = cuda.alloc_frames(kind, dev, 50, page)
        data = np.random.default_rng(page).integers(0, 256, (50, page), dtype=np.uint8)
        cuda.write_frames(frames, np.arange(50), data)
        idx = np.random.default_rng(1).permutation(50)[:30]
        np.testing.assert_array_equal(cuda.checksum_frames(frames, idx), page_checksums(data[idx]))


# -- asynchrony, timeouts, memory release ----------------------------------------------------------------------------
def _big_work(nodes, a, b, pages):
    s, d = nodes[a], nodes[b]
    return ChannelWork(s.frames, d.frames, s.kind, d.kind, s.device, d.device, METHOD_MEMCPY,
                       np.array([0]), np.array([0]), np.array([pages]))


def test_copies_are_asynchronous_and_channels_overlap(cuda, cp):
    rt = cp.cuda.runtime
    pages = 32768  # 128 MiB each way
    nodes = make_nodes(cuda, sizes=(pages, pages, pages, pages), devices=(-1, 0, -1, 0), seed=16)
    h2d, d2h = _big_work(nodes, 0, 1, pages), _big_work(nodes, 3, 2, pages)
    ch_in, ch_out = cuda.open_channels(2)
    try:
        # One channel: the two copies run one after the other on its stream. Timed by the GPU's events.
        serial = ch_in.submit([h2d, d2h])
        # copy() returned before the data moved: its end event has not completed yet.
        assert rt.eventQuery(serial._ends[0]) == 600
        rt.eventSynchronize(serial._ends[0])
        t_serial = rt.eventElapsedTime(serial._starts[0], serial._ends[0])
        assert serial.wait() and serial.error is None
        # Two channels: host -> device and device -> host use different copy engines and overlap.
        c_in = ch_in.submit([h2d])
        c_out = ch_out.submit([d2h])
        for ev in c_in._ends + c_out._ends:
            rt.eventSynchronize(ev)
        s_in, e_in, e_out = c_in._starts[0], c_in._ends[0], c_out._ends[0]
        t_both = max(rt.eventElapsedTime(s_in, e_in), rt.eventElapsedTime(s_in, e_out))
        assert t_both < 0.8 * t_serial, f"two channels took {t_both:.2f} ms, one channel {t_serial:.2f} ms"
        assert c_in.wait() and c_out.wait() and c_in.error is None and c_out.error is None
    finally:
        ch_in.close()
        ch_out.close()


def test_fence_wait_times_out_then_completes(cuda):
    pages = 65536  # 256 MiB
    nodes = make_nodes(cuda, sizes=(pages, pages), devices=(-1, 0), seed=17)
    with engine_for(cuda, nodes, channels=1) as engine:
        fence = engine.copy(np.arange(pages), pages + np.arange(pages))
        assert fence.wait(timeout=0) is False
        assert fence.wait(timeout=120) is True and fence.done


def test_machine_close_gives_device_memory_back(cp):
    rt = cp.cuda.runtime
    pool = cp.get_default_memory_pool()
    gc.collect()
    free0 = rt.memGetInfo()[0]
    pool0 = pool.total_bytes()
    for _ in range(3):
        with Machine(host_pages=4096, device_pages=131072, devices=1, backend="cuda", channels=2) as m:
            mm = m.address_space()
            addr = mm.mmap(4096 * m.page_size)
            mm.write(addr, np.random.default_rng(18).integers(0, 256, 4096 * m.page_size, dtype=np.uint8))
            assert mm.migrate(addr, 4096 * m.page_size, 1, engine=m.dma).nr_failed == 0
            assert mm.migrate(addr, 4096 * m.page_size, 0, mode=MigrateMode.SYNC).nr_failed == 0
            m.dma.checksum(np.arange(64))
            m.backend.copy_ceiling("h2d", 64 << 20, repeat=1)
        del m, mm
        gc.collect()
    # 512 MiB of device frames per machine: after three machines, no more than a little is still held.
    assert rt.memGetInfo()[0] >= free0 - (64 << 20)
    assert pool.total_bytes() <= pool0 + (16 << 20)


# -- the persistent consumer (dma_engine="persistent") ------------------------------------------------------------
@pytest.fixture
def persistent(gpu_required):
    """A backend whose lanes run the persistent consumer (skipped, with the reason, where it is refused here)."""
    from dmamig.backends.cuda import CudaBackend
    from dmamig.errors import BackendUnavailable

    try:
        backend = CudaBackend(dma_engine="persistent")
    except BackendUnavailable as exc:
        pytest.skip(f"the persistent consumer is refused on this host: {exc}")
    yield backend
    backend.close()


def test_the_persistent_consumer_copies_scattered_pages_and_runs_from_one_launch(persistent):
    persistent.poll_us = 1e6  # a 1 s idle window: the consumer stays resident between the submissions
    nodes = make_nodes(persistent, sizes=(2048, 2048), devices=(-1, 0), seed=40)
    rng = np.random.default_rng(41)
    with engine_for(persistent, nodes, channels=4) as engine:
        expect = contents(persistent, nodes)
        for _ in range(4):
            src = rng.permutation(2048)[:512]
            dst = 2048 + np.sort(rng.permutation(2048)[:512])
            expect[dst] = expect[src]
            assert engine.copy(src, dst).wait(timeout=60)
            run = int(rng.integers(0, 3)) * 512
            expect[2048 + run:2560 + run] = expect[run:run + 512]
            assert engine.copy(run + np.arange(512), 2048 + run + np.arange(512)).wait(timeout=60)
        lane = engine.ring_route(np.arange(1), 2048 + np.arange(1))[1][0].ring_lane
        assert type(lane).__name__ == "PersistentRingLane" and lane.launches == 1 and lane.failure is None
        np.testing.assert_array_equal(contents(persistent, nodes), expect)
    assert lane.running == 0  # close stopped it


def test_a_bad_row_on_the_persistent_consumer_is_a_status(persistent):
    nodes = make_nodes(persistent, sizes=(64, 64), devices=(-1, 0), seed=42)
    with engine_for(persistent, nodes, channels=1) as engine:
        before = contents(persistent, nodes)
        assert engine.copy(np.arange(4), 64 + np.arange(4)).wait(timeout=60)
        before[64:68] = before[:4]
        route, chans = engine.ring_route(np.arange(1), 64 + np.arange(1))
        # A route whose destination is no registered memory: its rows point at a wild address.
        wild = route.ring_set.route(0, 0, int(nodes[0].frames.ctypes.data), 0x10000, PAGE, PlanOptions())
        got = wild.submit(np.arange(2, dtype=np.int64), np.arange(2, dtype=np.int64))
        job = chans[0].completion(got.jobs[0][0])
        assert job.wait(60) and isinstance(job.error, DmaError) and "outside registered memory" in str(job.error)
        assert engine.copy(np.arange(4, 8), 68 + np.arange(4)).wait(timeout=60)  # the context is healthy
        before[68:72] = before[4:8]
        np.testing.assert_array_equal(contents(persistent, nodes), before)


def test_the_persistent_consumer_exits_when_idle_and_is_relaunched(persistent):
    import time

    persistent.poll_us = 100  # a 100 us idle window for the lanes opened from now on
    nodes = make_nodes(persistent, sizes=(256, 256), devices=(-1, 0), seed=43)
    with engine_for(persistent, nodes, channels=2) as engine:
        expect = contents(persistent, nodes)
        rng = np.random.default_rng(44)
        lane = None
        for i in range(50):
            time.sleep(float(rng.uniform(0, 300e-6)))
            src = rng.choice(256, 16, replace=False)
            dst = 256 + np.sort(rng.choice(256, 16, replace=False))
            expect[dst] = expect[src]
            assert engine.copy(src, dst).wait(timeout=60), f"submission {i} was not served"
            lane = lane or engine.ring_route(src, dst)[1][0].ring_lane
        deadline = time.monotonic() + 10
        while lane.running and time.monotonic() < deadline:
            time.sleep(1e-3)
        assert lane.running == 0 and lane.launches >= 2 and lane.failure is None
        assert engine.copy(np.arange(8), 256 + np.arange(8)).wait(timeout=60)
        expect[256:264] = expect[:8]
        np.testing.assert_array_equal(contents(persistent, nodes), expect)
