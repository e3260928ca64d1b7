"""The CUDA backend between GPUs, through the CuPy stand-in of ``test_cuda_fake.py``: the topology read from the
runtime, staged copies through pinned host memory where two GPUs lack peer access (channels and the migrating
thread's copy), per-device channels, pair ceilings, and what a machine does with a given topology."""

from __future__ import annotations

import numpy as np
import pytest
from support import contents, make_nodes
from test_cuda_fake import (
    GATHER,
    MEMCPY,
    PAGE,
    FakeCudaError,
    FakeGpu,
    FakeRuntime,
    backend_on,
    use_fake_cupy,
)

from dmamig import DmaError, InvalidArgument, Machine, Topology
from dmamig.backends import cuda as cuda_mod
from dmamig.backends.cuda import topology as cuda_topology
from dmamig.dma import DmaEngine, staging
from dmamig.nodes import NodeMap

# Devices 0 and 1 have peer access to each other; device 2 to nobody.
PEERS = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def three_gpus(nvlink: bool = True, auto: bool = True) -> FakeGpu:
    gpu = FakeGpu(ndev=3, auto=auto)
    gpu.peer_matrix = PEERS
    gpu.nvlink = nvlink
    return gpu


def engine_with(b, nodes, topology, channels=2, options=None) -> DmaEngine:
    return DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=b, page_size=PAGE, channels=channels,
                     options=options, topology=topology)


def bounce_allocs(gpu: FakeGpu, nbytes: int) -> int:
    return sum(1 for _b, d, n in gpu.allocs.values() if d < 0 and n == nbytes)


# -- topology -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nvlink, near", [(True, "nvlink"), (False, "pcie-switch")])
def test_topology_is_read_from_the_runtime(nvlink, near):
    gpu = three_gpus(nvlink)
    gpu.perf_rank = 3
    b = backend_on(gpu)
    t = b.runtime_topology()
    assert t.source == "runtime" and t.name == "cuda-runtime" and t.devices == 3
    assert t.peer_matrix.tolist() == [[bool(v) for v in row] for row in PEERS]
    assert (t.link(0, 1), t.link(1, 0), t.link(0, 2), t.link(2, 1)) == (near, near, "pcie-host", "pcie-host")
    assert t.native_atomics(0, 1) == nvlink and t.rank(0, 1) == 3
    asked = {(e[2], e[3]) for e in gpu.log if e[0] == "deviceGetP2PAttribute"}
    assert asked == {(a, c) for a in range(3) for c in range(3) if a != c}
    assert b.runtime_topology() is t  # read once
    assert b.devices()[2]["peers"] == []


def test_without_an_attribute_query_links_follow_peer_access(monkeypatch):
    monkeypatch.delattr(FakeRuntime, "deviceGetP2PAttribute")
    monkeypatch.setattr(cuda_topology, "_libcuda", lambda: None)
    t = backend_on(three_gpus()).runtime_topology()
    assert "links from peer access only" in t.name and "libcuda" in t.name
    assert (t.link(0, 1), t.link(0, 2)) == ("pcie-switch", "pcie-host") and not t.native_atomics(0, 1)


def test_a_refused_attribute_query_falls_back_with_its_reason(monkeypatch):
    def refuse(self, attr, a, b):
        raise RuntimeError("cudaErrorNotSupported")

    monkeypatch.setattr(FakeRuntime, "deviceGetP2PAttribute", refuse)
    t = backend_on(three_gpus()).runtime_topology()
    assert "cudaErrorNotSupported" in t.name and t.peer(0, 1) and t.link(0, 1) == "pcie-switch"


# -- staged channel copies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("auto", [True, False], ids=["eager", "lazy-streams"])
@pytest.mark.parametrize("opts", [GATHER, MEMCPY], ids=["gather", "memcpy"])
def test_staged_and_peer_copies_between_gpus(opts, auto, monkeypatch):
    monkeypatch.setattr(staging, "STAGE_BYTES", 3 * PAGE)  # 13 pages: five chunks through the two slots
    gpu = three_gpus(auto=True)
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(16, 32, 32, 32), devices=(-1, 0, 1, 2), seed=4)
    t = b.runtime_topology()
    with engine_with(b, nodes, t, options=opts) as engine:
        expect = contents(b, nodes)
        gpu.auto = auto
        gpu.log.clear()
        src2 = 16 + np.array([3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 20, 25, 30])  # device 0 -> device 2: staged
        dst2 = 80 + np.array([1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 17, 31])
        src1 = 16 + np.arange(16, 26)  # device 0 -> device 1: peer
        dst1 = 48 + np.arange(5, 15)
        expect[dst2] = expect[src2]
        expect[dst1] = expect[src1]
        f2 = engine.copy(src2, dst2)
        f1 = engine.copy(src1, dst1)
        assert f2.wait() and f1.wait()  # lazy streams: eventSynchronize runs them, each hop after its wait
        gpu.auto = True
        np.testing.assert_array_equal(contents(b, nodes), expect)
        s = engine.stats
        assert (s.staged_bytes, s.peer_bytes) == (13 * PAGE, 10 * PAGE) and s.peer_runs >= 1
        assert set(engine.devices_used) == {0, 1, 2}
        dev2_ptr = nodes[3].frames.ptr
        into_dev2 = [e for e in gpu.log if e[0] == "memcpyAsync" and dev2_ptr <= e[1] < dev2_ptr + 32 * PAGE]
        # Only the second hop writes device 2, from the channel's pinned bounce buffer (not from device 0).
        assert all(gpu.check(e[2], e[3]) == -1 for e in into_dev2)
        if opts is MEMCPY:
            assert into_dev2
    names = [e[0] for e in gpu.log]
    assert "streamWaitEvent" in names
    # The staged pair never goes device to device; the peer pair does where it uses memcpy.
    peer_calls = [e for e in gpu.log if e[0] == "memcpyPeerAsync"]
    assert all((e[2], e[4]) == (1, 0) for e in peer_calls)
    if opts is MEMCPY:
        assert peer_calls
    assert gpu.live("events") == 0 and bounce_allocs(gpu, 2 * 3 * PAGE) == 0  # freed at close
    b.close()


def test_slot_reuse_waits_for_the_previous_chunk_to_leave(monkeypatch):
    monkeypatch.setattr(staging, "STAGE_BYTES", 2 * PAGE)
    gpu = three_gpus()
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(8, 32, 32, 32), devices=(-1, 0, 1, 2), seed=6)
    with engine_with(b, nodes, b.runtime_topology(), channels=1, options=MEMCPY) as engine:
        expect = contents(b, nodes)
        gpu.log.clear()
        src, dst = 8 + np.arange(10), 72 + np.arange(10)  # device 0 -> 2: ten pages, five chunks of two
        expect[dst] = expect[src]
        engine.copy(src, dst).wait()
        np.testing.assert_array_equal(contents(b, nodes), expect)
        ch = engine._lanes[2][0]
        src_stream, dst_stream = ch.stream(0).ptr, ch.stream(2).ptr
    waits = [e[1] for e in gpu.log if e[0] == "streamWaitEvent"]
    # Each chunk's hop 2 waits for its hop 1; chunks 3..5 also wait for their slot's previous hop 2.
    assert waits.count(dst_stream) == 5 and waits.count(src_stream) == 3
    b.close()


def test_a_staged_copy_between_gpus_on_the_migrating_thread(monkeypatch):
    monkeypatch.setattr(staging, "STAGE_BYTES", 4 * PAGE)
    gpu = three_gpus()
    b = backend_on(gpu)
    src = b.alloc_frames("device", 0, 32, PAGE)
    dst = b.alloc_frames("device", 2, 32, PAGE)
    data = np.random.default_rng(7).integers(0, 256, (32, PAGE), dtype=np.uint8)
    b.write_frames(src, np.arange(32), data)
    gpu.log.clear()
    s, d, n = np.array([0, 10, 20]), np.array([16, 0, 28]), np.array([9, 1, 4])  # 9 pages span three chunks
    b.copy_folios(src, s, dst, d, n, staged=True)
    out = b.read_frames(dst, np.arange(32))
    for a, c, k in zip(s, d, n):
        np.testing.assert_array_equal(out[c:c + k], data[a:a + k])
    assert not [e for e in gpu.log if e[0] == "memcpyPeerAsync"]
    assert b.copy_stats["calls"] == 3
    assert bounce_allocs(gpu, 4 * PAGE) == 1  # one pooled buffer, reused
    b.copy_folios(src, s, dst, d, n, staged=True)
    assert bounce_allocs(gpu, 4 * PAGE) == 1
    b.close()
    assert bounce_allocs(gpu, 4 * PAGE) == 0


def test_a_failed_staged_folio_copy_does_not_hand_its_bounce_buffer_on(monkeypatch):
    """A hop that fails after queueing part of its copies leaves them in flight into the bounce buffer: the next
    staged copy must not get that buffer, or the late writes land in the middle of its own data."""
    monkeypatch.setattr(staging, "STAGE_BYTES", 4 * PAGE)
    gpu = three_gpus()
    b = backend_on(gpu)
    dev0 = b.alloc_frames("device", 0, 16, PAGE)
    dev1 = b.alloc_frames("device", 1, 16, PAGE)
    dev2 = b.alloc_frames("device", 2, 16, PAGE)
    rng = np.random.default_rng(8)
    d0, d1 = (rng.integers(0, 256, (16, PAGE), dtype=np.uint8) for _ in range(2))
    b.write_frames(dev0, np.arange(16), d0)
    b.write_frames(dev1, np.arange(16), d1)
    real = FakeRuntime.memcpyAsync
    calls = []

    def second_fails(self, *args):
        calls.append(args)
        if len(calls) == 2:
            raise FakeCudaError(1)  # cudaErrorInvalidValue, after the first copy was queued
        return real(self, *args)

    gpu.auto = False  # queued copies run when their stream is synchronized
    monkeypatch.setattr(FakeRuntime, "memcpyAsync", second_fails)
    with pytest.raises(DmaError):
        b.copy_folios(dev0, np.array([0, 8]), dev2, np.array([0, 8]), np.array([1, 1]), staged=True)
    monkeypatch.setattr(FakeRuntime, "memcpyAsync", real)
    # Device 1 to device 0: its hop 2 runs on device 0's stream, behind the failed hop 1's queued copy.
    b.copy_folios(dev1, np.array([3]), dev0, np.array([12]), np.array([1]), staged=True)
    gpu.auto = True
    np.testing.assert_array_equal(b.read_frames(dev0, np.array([12]))[0], d1[3])
    b.close()
    assert bounce_allocs(gpu, 4 * PAGE) == 0  # the retired buffer is freed with the backend


# -- machines on the stand-in ---------------------------------------------------------------------------------------
@pytest.fixture
def three_gpu_machines(monkeypatch):
    from dmamig.backends.cuda import status as cuda_probe

    gpu = three_gpus()
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    use_fake_cupy(monkeypatch, gpu)
    return gpu


def test_machine_topology_on_cuda_comes_from_the_runtime(three_gpu_machines):
    gpu = three_gpu_machines
    with Machine(host_pages=256, device_pages=128, devices=3, backend="cuda", channels=2) as m:
        assert m.topology.source == "runtime" and m.topology.pairs(peer=False) == [(0, 2), (1, 2), (2, 0), (2, 1)]
        mm = m.address_space()
        data = np.random.default_rng(3).integers(0, 256, 40 * PAGE, dtype=np.uint8)
        addr = mm.mmap(40 * PAGE)
        mm.write(addr, data)
        for node in (1, 3, 2, 3):  # device 0, 2 (staged), 1 (staged), 2 (staged)
            assert mm.migrate(addr, 40 * PAGE, node, engine=m.dma).nr_failed == 0
        assert mm.migrate(addr, 40 * PAGE, 2).nr_failed == 0  # copy mode, staged: device 2 -> 1
        assert mm.migrate(addr, 40 * PAGE, 1).nr_failed == 0  # copy mode, peer: device 1 -> 0
        np.testing.assert_array_equal(mm.read(addr, 40 * PAGE), data)
        s = m.dma.stats
        assert s.staged_bytes == 3 * 40 * PAGE and s.peer_bytes == 0
        mm.close()
    with Machine(host_pages=64, device_pages=64, devices=2, backend="cuda") as m:
        assert m.topology.devices == 2 and m.topology.pairs(peer=False) == []
    assert gpu.live("device") == 0 and gpu.live("events") == 0


def test_a_topology_on_cuda_can_only_take_peer_access_away(three_gpu_machines):
    restrict = Topology.pcie(3, per_switch=1)  # no peer access anywhere
    with Machine(host_pages=64, device_pages=64, devices=3, backend="cuda", topology=restrict) as m:
        t = m.topology
        assert t.pairs(peer=True) == [] and t.link(0, 1) == "nvlink" and "peers restricted" in t.name
        mm = m.address_space()
        addr = mm.mmap(8 * PAGE)
        mm.write(addr, np.arange(8 * PAGE, dtype=np.uint8))
        mm.migrate(addr, 8 * PAGE, 1, engine=m.dma)
        m.dma.reset_stats()
        assert mm.migrate(addr, 8 * PAGE, 2, engine=m.dma).nr_failed == 0  # device 0 -> 1, now staged
        assert m.dma.stats.staged_bytes == 8 * PAGE and m.dma.stats.peer_bytes == 0
        assert m.backend.topology is t
        mm.close()
    with pytest.raises(InvalidArgument, match="no peer access for device pairs \\[\\(0, 2\\)"):
        Machine(host_pages=64, device_pages=64, devices=3, backend="cuda", topology=Topology.nvswitch(3))
    with pytest.raises(InvalidArgument, match="only 3 CUDA device"):
        Machine(host_pages=64, device_pages=64, devices=4, backend="cuda")
    with pytest.raises(InvalidArgument, match="describes 2 devices but the machine has 3"):
        Machine(host_pages=64, device_pages=64, devices=3, backend="cuda", topology=Topology.nvswitch(2))


def test_pair_ceilings_on_the_stand_in(three_gpu_machines):
    gpu = three_gpu_machines
    with Machine(host_pages=64, device_pages=64, devices=3, backend="cuda") as m:
        be = m.backend
        gpu.log.clear()
        assert be.pair_ceiling(0, 1, 8 * PAGE, repeat=2) > 0  # peer: one memcpyPeerAsync each
        assert [e[0] for e in gpu.log].count("memcpyPeerAsync") == 3
        gpu.log.clear()
        assert be.pair_ceiling(0, 2, 8 * PAGE, repeat=1) > 0  # no peer access: staged, two hops
        assert "streamWaitEvent" in [e[0] for e in gpu.log] and "memcpyPeerAsync" not in [e[0] for e in gpu.log]
        assert be.pair_ceiling(-1, 2, PAGE) > 0 and be.pair_ceiling(1, 1, PAGE) > 0
        assert be.pair_ceiling(0, 1, 8 * PAGE, staged=True) > 0
        with pytest.raises(InvalidArgument, match="device 3 does not exist"):
            be.pair_ceiling(0, 3, PAGE)
        with pytest.raises(InvalidArgument, match="only a copy between two different devices"):
            be.pair_ceiling(1, 1, PAGE, staged=True)
    assert gpu.live("device") == 0 and gpu.live("events") == 0


def test_info_shows_the_runtime_topology(three_gpu_machines, monkeypatch, capsys):
    from dmamig.backends.cuda import status as cuda_probe
    from dmamig.cli import info_dict, main

    monkeypatch.setattr(cuda_probe, "cuda_status", lambda: cuda_probe.CudaStatus("usable"))
    monkeypatch.setattr(cuda_mod, "kernel_build_status", lambda: {"page_copy.cu": "compiled OK"})
    info = info_dict("cuda")
    assert info["topology"]["source"] == "runtime" and info["topology"]["peer"][0][2] is False
    assert main(["info", "--backend", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "topology: cuda-runtime" in out and "PH*" in out and "NV" in out


def test_one_gpu_has_no_pairs_to_describe(monkeypatch):
    monkeypatch.setattr(cuda_topology, "_libcuda", lambda: None)
    monkeypatch.delattr(FakeRuntime, "deviceGetP2PAttribute")
    t = backend_on(FakeGpu()).runtime_topology()
    assert t.devices == 1 and t.name == "cuda-runtime" and t.pairs() == []


def test_a_channel_retires_its_bounce_buffer_after_a_failed_staged_hop(monkeypatch):
    """A staged submission that fails part way leaves copies queued into the channel's bounce buffer, and its
    slot events no longer say when the buffer is free: the next staged submission must get a new buffer."""
    monkeypatch.setattr(staging, "STAGE_BYTES", 2 * PAGE)
    gpu = three_gpus()
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(8, 32, 32, 32), devices=(-1, 0, 1, 2), seed=9)
    with engine_with(b, nodes, b.runtime_topology(), channels=1, options=MEMCPY) as engine:
        expect = contents(b, nodes)
        real = FakeRuntime.memcpyAsync
        calls = []

        def third_fails(self, *args):
            calls.append(args)
            if len(calls) == 3:
                raise FakeCudaError(1)  # chunk 2's hop 1, after chunk 1 went out through the buffer
            return real(self, *args)

        monkeypatch.setattr(FakeRuntime, "memcpyAsync", third_fails)
        with pytest.raises(DmaError):
            engine.copy(8 + np.arange(6), 72 + np.arange(6)).wait()  # device 0 -> 2: staged, three chunks
        monkeypatch.setattr(FakeRuntime, "memcpyAsync", real)
        ch = engine._lanes[2][0]
        failed = ch._retired_staging[-1] if ch._retired_staging else None
        assert failed is not None and ch._staging is None, "the buffer of the failed hop is still in use"
        src, dst = 8 + np.arange(10, 16), 72 + np.arange(10, 16)
        expect[dst] = expect[src]
        engine.copy(src, dst).wait()
        assert ch._staging is not None and ch._staging is not failed
        got = contents(b, nodes)
        np.testing.assert_array_equal(got[dst], expect[dst])
    b.close()
    assert bounce_allocs(gpu, 2 * 2 * PAGE) == 0  # both buffers freed at close
