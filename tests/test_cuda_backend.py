"""The CUDA backend and its kernels against numpy references (run only where a CUDA GPU is usable)."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig.dma import DmaEngine, PlanOptions, page_checksums
from dmamig.dma.plan import METHOD_GATHER, METHOD_MEMCPY
from dmamig.errors import DmaError
from dmamig.nodes import Node, NodeMap

pytestmark = pytest.mark.gpu

PAGE = 4096


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def cuda():
    from dmamig.backends.cuda import CudaBackend

    backend = CudaBackend()
    yield backend
    backend.close()


def host(backend):
    return backend.alloc_frames("host", -1, 1, PAGE)


def make_nodes(backend, sizes=(256, 256, 128), devices=(-1, 0, 0), seed=0, page=PAGE):
    """Host node plus device nodes; a second device node shares device 0 when only one GPU is present."""
    rng = np.random.default_rng(seed)
    nodes, base = [], 0
    for i, (n, dev) in enumerate(zip(sizes, devices)):
        kind = "host" if dev < 0 else "device"
        frames = backend.alloc_frames(kind, dev, n, page)
        backend.write_frames(frames, np.arange(n), rng.integers(0, 256, (n, page), dtype=np.uint8))
        nodes.append(Node(i, kind, dev, base, n, frames))
        base += n
    return tuple(nodes)


def contents(backend, nodes):
    return np.concatenate([backend.read_frames(n.frames, np.arange(n.total_pages)) for n in nodes])


def engine_for(backend, nodes, channels=2, options=None):
    return DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=nodes[0].frames.shape[1],
                     channels=channels, options=options)


# -- build and memory --------------------------------------------------------------------------------------------
def test_kernels_compile():
    from dmamig.backends.cuda import kernel_build_status

    assert kernel_build_status() == {"page_copy.cu": "compiled OK", "page_checksum.cu": "compiled OK"}


def test_pinned_host_frames(cuda, cp):
    frames = cuda.alloc_frames("host", -1, 8, PAGE)
    assert isinstance(frames, np.ndarray) and frames.shape == (8, PAGE) and not frames.any()
    attrs = cp.cuda.runtime.pointerGetAttributes(frames.ctypes.data)
    assert attrs.type == 1  # cudaMemoryTypeHost: page-locked, device-addressable
    assert attrs.devicePointer == frames.ctypes.data  # UVA: the host pointer is the device pointer


def test_device_frames_read_write_zero(cuda, cp):
    frames = cuda.alloc_frames("device", 0, 32, PAGE)
    assert isinstance(frames, cp.ndarray) and frames.device.id == 0 and int(frames.sum()) == 0
    rng = np.random.default_rng(1)
    idx = rng.permutation(32)[:10]
    data = rng.integers(0, 256, (10, PAGE), dtype=np.uint8)
    cuda.write_frames(frames, idx, data)
    np.testing.assert_array_equal(cuda.read_frames(frames, idx), data)
    np.testing.assert_array_equal(cuda.read_frames(frames, np.arange(3, 7)), cp.asnumpy(frames[3:7]))
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
    cuda.copy_folios(src, s, dst, d, n)
    out = cuda.read_frames(dst, np.arange(64))
    for a, b, k in zip(s, d, n):
        np.testing.assert_array_equal(out[b:b + k], data[a:a + k])


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
    nodes = make_nodes(cuda, seed=3)
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
def test_peer_copies(cuda, cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("peer copies need 2 CUDA devices; 1 is visible")
    nodes = make_nodes(cuda, sizes=(64, 256, 256), devices=(-1, 0, 1), seed=9)
    if (1, 0) not in cuda.peers:
        pytest.skip("devices 0 and 1 have no peer access (copies are staged by the driver instead)")
    with engine_for(cuda, nodes, channels=2) as engine:
        before = contents(cuda, nodes)
        src = 64 + np.random.default_rng(10).permutation(256)[:200]
        dst = 320 + np.arange(200)
        engine.copy(src, dst).wait()
        np.testing.assert_array_equal(contents(cuda, nodes)[dst], before[src])


def test_batch_copy_reports_availability(cuda):
    assert isinstance(cuda.batch_copy_available, bool)
    assert cuda.batch_copy_available or cuda.batch_copy_reason
