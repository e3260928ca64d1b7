"""Device topology: validation of Topology, machines of up to eight devices, peer vs staged copies between every
ordered pair of devices (copy and no-copy), per-device DMA channels running concurrently, pair ceilings; GPU
cases read the topology from the runtime."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support import WAIT, filled, finish_within, hook_copy_kernels

from dmamig import InvalidArgument, Machine, MigrateMode
from dmamig.backends.cpu import copy_loops as cpu_kernels
from dmamig.dma import staging
from dmamig.topology import LINK_CLASSES, MAX_DEVICES, PRESETS, Topology, node_routes

NV, PS, PH = LINK_CLASSES


def mixed8() -> Topology:
    """Eight devices with every link class, peer access and staging both present, and one asymmetric pair:
    two NVLink islands (0-3, 4-7) whose halves share PCIe switches; across the islands PCIe through the hosts,
    with peer access only between 0 and 4 (both ways) and from 1 to 5 (not back)."""
    links = [[None] * 8 for _ in range(8)]
    for a in range(8):
        for b in range(8):
            if a != b:
                links[a][b] = NV if a // 4 == b // 4 else (PS if a % 4 == b % 4 else PH)
    peer = [[a // 4 == b // 4 for b in range(8)] for a in range(8)]
    peer[0][4] = peer[4][0] = peer[1][5] = True
    return Topology(links, peer, name="mixed8")


# -- Topology ------------------------------------------------------------------------------------------------------
def test_presets_describe_their_machines():
    t = Topology.nvswitch(4)
    assert t.devices == 4 and all(t.link(a, b) == NV and t.peer(a, b) for a, b in t.pairs())
    assert t.link(2, 2) == "local" and t.peer(2, 2) and t.rank(0, 1) == 0 and t.native_atomics(0, 1)

    p = Topology.pcie(6, per_switch=3)
    assert p.link(0, 2) == PS and p.peer(0, 2) and p.link(2, 3) == PH and not p.peer(2, 3)
    assert Topology.pcie(4, per_switch=1).pairs(peer=True) == []
    assert Topology.pcie(4, per_switch=2, peer_across_switches=True).pairs(peer=False) == []

    s = Topology.two_socket(8)
    assert (s.link(0, 1), s.peer(0, 1)) == (PS, True)  # one switch
    assert (s.link(0, 2), s.peer(0, 2)) == (PH, True)  # one socket, two switches
    assert (s.link(3, 4), s.peer(3, 4)) == (PH, False)  # across the sockets
    assert len(s.pairs(peer=False)) == 2 * 4 * 4

    d = Topology.dgx1()
    assert d.devices == 8 and d.link(0, 3) == NV and d.link(0, 4) == NV and d.link(0, 5) == PH
    assert not d.peer(0, 5) and len(d.pairs(peer=True)) == 8 * 4
    assert Topology.preset("dgx1", 8) == d
    for name in PRESETS:
        assert Topology.preset(name, 8).devices == 8


def test_explicit_matrix_defaults_and_views():
    t = Topology([["-", PS, PH], [PS, "", NV], [PH, NV, None]])
    assert t.peer_matrix.tolist() == [[True, True, False], [True, True, True], [False, True, True]]
    assert not t.peer_matrix.flags.writeable
    assert [t.rank(0, 1), t.rank(0, 2), t.rank(1, 2)] == [1, 2, 0]
    assert t.native_atomics(1, 2) and not t.native_atomics(0, 1)
    assert t.staged(0, 2) and not t.staged(0, 1)
    assert t.pairs(peer=False) == [(0, 2), (2, 0)]
    assert "PH*" in t.format() and "staged" in t.format()
    assert Topology.from_dict(t.as_dict()) == t and hash(Topology.from_dict(t.as_dict())) == hash(t)
    assert t.subset(2).links == ((("", PS)), (PS, "")) and t.subset(3) is t
    restricted = t.with_peers(np.eye(3, dtype=bool))
    assert restricted.pairs(peer=True) == [] and restricted.links == t.links
    assert Topology([]).devices == 0 and "no devices" in Topology([]).format()


@pytest.mark.parametrize("args, kwargs, match", [
    (("nvlink",), {}, "square matrix"),
    (([[None, NV]],), {}, "must have 2 rows|row 0 must have 1"),
    (([[None, NV], [NV]],), {}, "row 1 must have 2 entries"),
    (([[None, "infiniband"], [NV, None]],), {}, "links\\[0\\]\\[1\\] must be one of"),
    (([[NV, NV], [NV, None]],), {}, None),  # a class on the diagonal is tolerated
    (([["x", NV], [NV, None]],), {}, "link to itself"),
    (([[None, NV], [NV, None]], [[1, "yes"], [1, 1]]), {}, "peer\\[0\\]\\[1\\] must be True/False"),
    (([[None, NV], [NV, None]], [[1, 1]]), {}, "peer must have 2 rows"),
    (([[None, NV], [NV, None]],), {"rank": [[0, -1], [0, 0]]}, "rank\\[0\\]\\[1\\] must be an integer >= 0"),
    (([[None, NV], [NV, None]],), {"native_atomics": [[0, 2], [0, 0]]}, "native_atomics\\[0\\]\\[1\\]"),
    (([[None, NV], [NV, None]],), {"name": ""}, "name must be"),
    (([[None, NV], [NV, None]],), {"source": "guess"}, "source must be"),
])
def test_bad_matrices_are_refused_with_the_reason(args, kwargs, match):
    if match is None:
        assert Topology(*args, **kwargs).link(0, 1) == NV
        return
    with pytest.raises(InvalidArgument, match=match):
        Topology(*args, **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: Topology.nvswitch(-1), "n must be an integer in 0..64"),
    (lambda: Topology.nvswitch(MAX_DEVICES + 1), "0..64"),
    (lambda: Topology.nvswitch(True), "n must be"),
    (lambda: Topology.pcie(4, per_switch=0), "per_switch must be"),
    (lambda: Topology.two_socket(4, per_switch=1.5), "per_switch must be"),
    (lambda: Topology.preset("dgx1", 4), "8 devices"),
    (lambda: Topology.preset("torus", 4), "preset must be one of"),
    (lambda: Topology.nvswitch(2).peer(0, 2), "device b must be an integer in 0..1"),
    (lambda: Topology.nvswitch(2).link(-1, 0), "device a"),
    (lambda: Topology.nvswitch(2).subset(3), "describes 2 devices"),
    (lambda: Topology.from_dict({"peer": []}), "needs at least 'links'"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(InvalidArgument, match=match):
        call()


def test_node_routes():
    t = Topology.pcie(3, per_switch=2)
    routes = node_routes([-1, -1, 0, 1, 2], t)  # two host tiers, then devices
    assert routes[0].tolist() == [0] * 5 and routes[:, 0].tolist() == [0] * 5
    assert routes[2, 3] == 1 and routes[2, 4] == 2 and routes[4, 3] == 2 and routes[3, 3] == 0
    assert (node_routes([-1, 0, 1], None)[1:, 1:] == [[0, 1], [1, 0]]).all()
    with pytest.raises(InvalidArgument, match="describes 3 devices"):
        node_routes([-1, 3], t)


# -- machines -------------------------------------------------------------------------------------------------------
def test_machine_topology_default_and_checks():
    with Machine(host_pages=64, device_pages=64, devices=3, backend="cpu") as m:
        assert m.topology == Topology.nvswitch(3) and m.topology.source == "setting"
    with Machine(host_pages=64, devices=0, backend="cpu") as m:
        assert m.topology.devices == 0
    with pytest.raises(InvalidArgument, match="describes 2 devices but the machine has 3"):
        Machine(host_pages=64, device_pages=64, devices=3, backend="cpu", topology=Topology.nvswitch(2))
    with pytest.raises(InvalidArgument, match="topology must be a dmamig.Topology"):
        Machine(host_pages=64, device_pages=64, devices=2, backend="cpu", topology="nvswitch")
    with pytest.raises(InvalidArgument, match="at most 64"):
        Machine(host_pages=64, device_pages=1, devices=MAX_DEVICES + 1, backend="cpu")
    with pytest.raises(InvalidArgument, match="at most 127 nodes"):
        Machine(host_pages=64, device_pages=1, devices=200, backend="cpu")


@pytest.fixture
def m8():
    mach = Machine(host_pages=512, device_pages=256, devices=8, backend="cpu", channels=2, topology=mixed8())
    yield mach
    finish_within(mach.close, "Machine.close")


def _layout(mm, ps: int, seed: int) -> tuple[int, np.ndarray]:
    """24 pages: 12 whose frames follow one another (a long run: one memcpy) and 12 first touched in an
    interleaved order (scattered pages: the gather method)."""
    addr = mm.mmap(24 * ps)
    data = np.random.default_rng(seed).integers(0, 256, 24 * ps, dtype=np.uint8)
    for i in list(range(12)) + list(range(12, 24, 2)) + list(range(13, 24, 2)):
        mm.write(addr + i * ps, data[i * ps:(i + 1) * ps])
    return addr, data


STAGE_PAGES = 5  # a small bounce buffer, so that a pair's copy goes through it in several chunks


@pytest.mark.parametrize("engine", [False, True], ids=["copy", "no-copy"])
def test_every_ordered_pair_of_eight_devices(m8, engine, monkeypatch):
    m = m8
    ps = m.page_size
    monkeypatch.setattr(staging, "STAGE_BYTES", STAGE_PAGES * ps)
    staged_calls = []
    real = m.backend.copy_folios

    def spy(*args, staged=False):
        staged_calls.append(staged)
        return real(*args, staged=staged)

    monkeypatch.setattr(m.backend, "copy_folios", spy)
    mm = m.address_space()
    addr, data = _layout(mm, ps, seed=8)
    # Scatter the source pages on every device: later pages of the range move ahead of earlier ones.
    t = m.topology
    for a, b in t.pairs():
        node_a, node_b = a + 1, b + 1
        if mm.node_of(addr) != node_a:
            assert mm.migrate(addr, 24 * ps, node_a, engine=m.dma if engine else None).nr_failed == 0
        if engine:
            m.dma.reset_stats()
        staged_calls.clear()
        res = mm.migrate(addr, 24 * ps, node_b, mode=MigrateMode.SYNC, engine=m.dma if engine else None)
        assert res.nr_failed == 0 and (mm.nodes_of(addr, 24 * ps) == node_b).all(), (a, b)
        if engine:
            s = m.dma.stats
            moved = 24 * ps
            if t.peer(a, b):
                assert (s.peer_bytes, s.staged_bytes, s.staged_runs) == (moved, 0, 0), (a, b, s)
            else:
                assert (s.staged_bytes, s.peer_bytes, s.peer_runs) == (moved, 0, 0), (a, b, s)
                assert s.staged_runs >= 1
            assert s.busy_by_device[b] > 0  # the destination device's channels copied
        else:
            assert staged_calls and set(staged_calls) == {not t.peer(a, b)}, (a, b, staged_calls)
        assert mm.migrate(addr, 24 * ps, node_b).nr_failed == 0  # already there: nothing moves
        # Reading brings the pages back to host RAM (coherent device memory); the next pair moves them out again.
        np.testing.assert_array_equal(mm.read(addr, 24 * ps), data, err_msg=f"device {a} -> {b}")
    mm.close()
    assert [n.free_pages for n in m.nodes] == [512] + [256] * 8


def test_a_staged_copy_is_two_copies_through_the_channel_bounce_buffer(m8, monkeypatch):
    m = m8
    ps = m.page_size
    monkeypatch.setattr(staging, "STAGE_BYTES", 4 * ps)
    calls = []
    for name in ("copy_runs_cached", "copy_runs_stream"):
        real = getattr(cpu_kernels, name)

        def spy(src, dst, s, d, n, _real=real):
            calls.append((src, dst, int(np.sum(n))))
            return _real(src, dst, s, d, n)

        monkeypatch.setattr(cpu_kernels, name, spy)
    assert m.topology.staged(3, 4)
    src, dst = m.nodes[4], m.nodes[5]  # devices 3 and 4
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, (10, ps), dtype=np.uint8)
    m.frames.write_pfns(src.base_pfn + np.arange(10), pages)
    fence = m.dma.copy(src.base_pfn + np.arange(10), dst.base_pfn + 20 + np.arange(10))
    fence.wait(timeout=WAIT)
    np.testing.assert_array_equal(m.frames.read_pfns(dst.base_pfn + 20 + np.arange(10)), pages)
    dma_calls = [c for c in calls if c[0] is src.frames or c[1] is dst.frames]
    # 10 pages through a 4-page buffer: three chunks, each in (from device 3) and then out (to device 4).
    assert [c[2] for c in dma_calls] == [4, 4, 4, 4, 2, 2]
    for into, out in zip(dma_calls[::2], dma_calls[1::2]):
        assert into[0] is src.frames and out[1] is dst.frames and into[1] is out[0]
        assert into[1] is not src.frames and into[1].shape == (4, ps)  # the bounce buffer
    s = m.dma.stats
    assert (s.staged_runs, s.staged_bytes, s.peer_bytes) == (1, 10 * ps, 0) and s.memcpy_calls == 6


def test_copy_mode_stages_through_the_migrating_threads_buffer(m8, monkeypatch):
    m = m8
    ps = m.page_size
    monkeypatch.setattr(staging, "STAGE_BYTES", 3 * ps)
    mm = m.address_space()
    addr, data = filled(m, mm, 16, seed=3, order=0)
    assert mm.migrate(addr, 16 * ps, 2).nr_failed == 0  # device 1
    calls = []
    real = cpu_kernels.copy_runs_cached

    def spy(src, dst, s, d, n):
        calls.append(int(np.sum(n)))
        return real(src, dst, s, d, n)

    monkeypatch.setattr(cpu_kernels, "copy_runs_cached", spy)
    assert m.topology.staged(1, 6)
    assert mm.migrate(addr, 16 * ps, 7).nr_failed == 0
    assert sum(calls) == 2 * 16 and max(calls) <= 3  # every page twice, at most a buffer at a time
    np.testing.assert_array_equal(mm.read(addr, 16 * ps), data)
    mm.close()


# -- concurrency ----------------------------------------------------------------------------------------------------
def test_copies_to_different_devices_do_not_wait_for_each_other(m8, monkeypatch):
    """A copy to device 0 is held inside its channel; a migration to device 5 still completes meanwhile."""
    m = m8
    ps = m.page_size
    held, release = threading.Event(), threading.Event()
    real = cpu_kernels.copy_runs_stream
    dev0 = m.nodes[1].frames

    def gated(src, dst, s, d, n):
        if dst is dev0:
            held.set()
            assert release.wait(WAIT), "the test never released the held copy"
        return real(src, dst, s, d, n)

    hook_copy_kernels(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "copy_runs_stream", gated)
    mm = m.address_space()
    a, da = filled(m, mm, 32, seed=1)
    b, db = filled(m, mm, 32, seed=2)
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("a", mm.migrate(a, 32 * ps, 1, engine=m.dma)))
    t.start()
    assert held.wait(WAIT)
    # Device 0's channel is busy and the first migration holds its pages unmapped: the machine lock is free
    # and device 5's channels are idle, so this one finishes.
    finish_within(lambda: results.setdefault("b", mm.migrate(b, 32 * ps, 6, engine=m.dma)), "a migration to "
                  "another device while device 0's channel is held")
    assert "a" not in results and results["b"].nr_failed == 0
    release.set()
    t.join(WAIT)
    assert results["a"].nr_failed == 0
    np.testing.assert_array_equal(mm.read(a, 32 * ps), da)
    np.testing.assert_array_equal(mm.read(b, 32 * ps), db)
    assert {0, 5} <= set(m.dma.devices_used)
    finish_within(mm.close, "AddressSpace.close")


def test_migrations_between_several_device_pairs_run_on_several_channels_at_once(m8, monkeypatch):
    """Four threads migrate between four disjoint device pairs; each destination device's channel copies at the
    same time as the others (a barrier inside the copy kernel opens only when all four are copying)."""
    m = m8
    ps = m.page_size
    pairs = [(0, 5), (1, 4), (2, 3), (6, 7)]  # staged, staged, peer, peer
    barrier = threading.Barrier(len(pairs), timeout=WAIT)
    targets = {id(m.nodes[b + 1].frames) for _a, b in pairs}
    met = []
    lock = threading.Lock()
    real_stream, real_cached = cpu_kernels.copy_runs_stream, cpu_kernels.copy_runs_cached

    def meet(dst) -> None:
        with lock:
            first = id(dst) in targets
            targets.discard(id(dst))
        if first:
            met.append(barrier.wait())

    def stream(src, dst, s, d, n):
        meet(dst)
        return real_stream(src, dst, s, d, n)

    def cached(src, dst, s, d, n):
        meet(dst)
        return real_cached(src, dst, s, d, n)

    hook_copy_kernels(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "copy_runs_stream", stream)
    monkeypatch.setattr(cpu_kernels, "copy_runs_cached", cached)
    mm = m.address_space()
    regions = [filled(m, mm, 24, seed=10 + i) for i in range(len(pairs))]
    for (addr, _d), (a, _b) in zip(regions, pairs):
        assert mm.migrate(addr, 24 * ps, a + 1).nr_failed == 0  # copy mode: no DMA channel involved yet
    m.dma.reset_stats()
    errors = []

    def worker(addr, a, b):
        try:
            for i in range(4):
                res = mm.migrate(addr, 24 * ps, (b if i % 2 == 0 else a) + 1, engine=m.dma)
                assert res.nr_failed == 0 and res.stats.nr_dma_fallback == 0
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(addr, a, b)) for (addr, _d), (a, b) in zip(regions, pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(met) == [0, 1, 2, 3]  # all four copies were inside the kernel together
    for (addr, data), (a, _b) in zip(regions, pairs):
        assert mm.node_of(addr) == a + 1
        np.testing.assert_array_equal(mm.read(addr, 24 * ps), data)
    s = m.dma.stats
    assert all(s.busy_by_device.get(d, 0) > 0 for pair in pairs for d in pair)
    finish_within(mm.close, "AddressSpace.close")


# -- ceilings -------------------------------------------------------------------------------------------------------
def test_pair_ceiling_times_direct_and_staged_copies(m8):
    be = m8.backend
    assert be.topology is m8.topology
    direct = be.pair_ceiling(0, 1, 1 << 20, repeat=2)
    staged = be.pair_ceiling(0, 4, 1 << 20, repeat=2)  # no peer access in mixed8: two copies
    forced = be.pair_ceiling(0, 1, 1 << 20, repeat=1, staged=True)
    host = be.pair_ceiling(-1, 3, 4096)
    assert min(direct, staged, forced, host) > 0
    with pytest.raises(InvalidArgument, match="only a copy between two different devices"):
        be.pair_ceiling(-1, 1, 4096, staged=True)
    with pytest.raises(InvalidArgument, match="nbytes must be"):
        be.pair_ceiling(0, 1, 0)
    with pytest.raises(InvalidArgument, match="src_dev must be"):
        be.pair_ceiling(-2, 1, 4096)
    with pytest.raises(InvalidArgument, match="describes devices 0..7"):
        be.pair_ceiling(0, 9, 4096)


# -- GPUs -----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_topology_is_read_from_the_runtime():
    import cupy

    rt = cupy.cuda.runtime
    n = rt.getDeviceCount()
    with Machine(host_pages=256, device_pages=256, devices=n, backend="cuda") as m:
        t = m.topology
        assert t.source == "runtime" and t.devices == n
        for a, b in t.pairs():
            assert t.peer(a, b) == bool(rt.deviceCanAccessPeer(a, b)), (a, b)
            assert t.link(a, b) in LINK_CLASSES
        assert Topology.from_dict(t.as_dict()) == t
    if t.pairs(peer=False):  # asking for peer access these GPUs lack
        with pytest.raises(InvalidArgument, match="can only take peer access away"):
            Machine(host_pages=64, device_pages=64, devices=n, backend="cuda", topology=Topology.nvswitch(n))


@pytest.mark.gpu
@pytest.mark.parametrize("restrict", [False, True], ids=["runtime", "all-staged"])
def test_gpu_copies_between_devices_peer_or_staged(restrict):
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    if n < 2:
        pytest.skip(f"needs two GPUs, this machine has {n}")
    topo = Topology.pcie(2, per_switch=1) if restrict else None
    with Machine(host_pages=1024, device_pages=1024, devices=2, backend="cuda", channels=2, topology=topo) as m:
        ps = m.page_size
        mm = m.address_space()
        addr, data = filled(m, mm, 300, seed=5)
        for engine in (None, m.dma):
            assert mm.migrate(addr, 300 * ps, 1, engine=engine).nr_failed == 0
            m.dma.reset_stats()
            assert mm.migrate(addr, 300 * ps, 2, engine=engine).nr_failed == 0
            np.testing.assert_array_equal(mm.read(addr, 300 * ps), data)
            if engine is not None:
                s = m.dma.stats
                staged = m.topology.staged(0, 1)
                assert (s.staged_bytes if staged else s.peer_bytes) == 300 * ps
                assert (s.peer_bytes if staged else s.staged_bytes) == 0
        assert m.backend.pair_ceiling(0, 1, 16 << 20) > 0
        assert m.backend.pair_ceiling(0, 1, 16 << 20, staged=True) > 0
        mm.close()


@pytest.mark.gpu
def test_gpu_pair_ceilings_on_one_device():
    with Machine(host_pages=64, device_pages=64, devices=1, backend="cuda") as m:
        for src, dst in ((-1, 0), (0, -1), (0, 0)):
            assert m.backend.pair_ceiling(src, dst, 8 << 20) > 0


def test_info_says_where_the_topology_comes_from(capsys):
    from dmamig.cli import info_dict, main

    assert "Topology.nvswitch(devices)" in info_dict("cpu")["topology"]
    main(["info", "--backend", "cpu"])
    assert "topology: a Machine setting on the cpu backend" in capsys.readouterr().out
