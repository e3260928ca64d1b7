"""The fault matrix: injected DMA, allocation and worker faults, one test per cell.

Every cell ends the same way: the data reads back intact, every frame is free again once the address spaces
are closed, and no thread is left blocked (teardowns run under ``finish_within``). Status codes are checked
only against the public contract: a page with status 0 sits on the target node, any other stays where it was.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from support import WAIT, finish_within, hook_copy_kernels, rand, stop_worker

from dmamig import DmaError, DmamigError, FaultAttr, FaultPoints, InvalidArgument, Machine, MigrateMode
from dmamig.backends.cpu import backend as cpu_backend
from dmamig.backends.cpu import channel as cpu_channel
from dmamig.backends.cpu import copy_loops as cpu_kernels
from dmamig.check import check_machine
from dmamig.fault_injection import FAULT_POINTS

DMA_POINTS = ("dma_submit", "dma_copy", "dma_complete", "channel_crash")
MESSAGES = {"dma_submit": "refused its share", "dma_copy": "mid-copy", "dma_complete": "on completion",
            "channel_crash": "died"}


@pytest.fixture(params=[None, 0], ids=["polling", "sleeping"])
def m3(request):
    """A CPU machine with one device node and three DMA channels: polling ones (the default), and channels that
    sleep between jobs; every cell runs on both."""
    mach = Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu", channels=3,
                   dma_poll_us=request.param)
    yield mach
    finish_within(mach.close, "Machine.close")


def scattered(m, mm, n: int, seed: int = 0):
    """Map two regions of ``n`` pages and fault them in alternately, so that neither region's pages are
    contiguous: a migration of one of them is spread over every DMA channel."""
    ps = m.page_size
    a, b = mm.mmap(n * ps), mm.mmap(n * ps)
    da, db = rand(n * ps, seed), rand(n * ps, seed + 1)
    for i in range(n):
        mm.write(a + i * ps, da[i * ps:(i + 1) * ps])
        mm.write(b + i * ps, db[i * ps:(i + 1) * ps])
    return a, da, b, db


def assert_contract(mm, addr: int, npages: int, res, node: int, old_node: int = 0) -> None:
    """Status 0: on the target node; any other status: still where it was."""
    nodes = mm.nodes_of(addr, npages * mm.machine.page_size)
    assert res.status.size == npages
    assert ((res.status == 0) == (nodes == node)).all()
    assert (nodes[res.status != 0] == old_node).all()


def close_and_check_frames(m, *spaces) -> None:
    for mm in spaces:
        finish_within(mm.close, "AddressSpace.close")
    assert [n.free_pages for n in m.nodes] == [n.total_pages for n in m.nodes]
    assert check_machine(m) == []


# -- the FaultAttr rules (lib/fault-inject.c) -----------------------------------------------------------------
def test_probability_zero_never_fails_and_one_always_does():
    never, always = FaultAttr(probability=0.0), FaultAttr(probability=1.0)
    assert not any(never.should_fail() for _ in range(100))
    assert all(always.should_fail() for _ in range(100))
    assert (never.calls, never.failures, always.failures) == (100, 0, 100)


def test_interval_times_and_space():
    attr = FaultAttr(probability=1.0, interval=3, times=2)
    assert [attr.should_fail() for _ in range(9)] == [False, False, True, False, False, True] + [False] * 3
    attr = FaultAttr(probability=1.0, space=10, times=-1)
    assert [attr.should_fail(4) for _ in range(4)] == [False, False, True, True]


def test_seeded_draws_repeat_and_percent_matches_probability():
    a, b = FaultAttr(percent=30, seed=5), FaultAttr(probability=0.3, seed=5)
    assert a.probability == pytest.approx(0.3) and b.percent == pytest.approx(30)
    draws = [a.should_fail() for _ in range(2000)]
    assert draws == [b.should_fail() for _ in range(2000)]
    assert 450 < sum(draws) < 750
    unseeded = FaultAttr(probability=0.5)
    assert isinstance(unseeded.seed, int)  # drawn, and readable to repeat the run


def test_parse_takes_the_kernel_boot_parameter_form():
    attr = FaultAttr.parse("2,50,0,-1", seed=1)
    assert (attr.interval, attr.probability, attr.space, attr.times) == (2, 0.5, 0, -1)
    with pytest.raises(InvalidArgument, match="interval"):
        FaultAttr.parse("1,2")
    with pytest.raises(InvalidArgument, match="numbers"):
        FaultAttr.parse("a,b,c,d")


@pytest.mark.parametrize("kw, match", [
    ({"probability": 1.5}, "probability"), ({"probability": -0.1}, "probability"),
    ({"probability": float("nan")}, "probability"), ({"probability": "x"}, "probability"),
    ({"percent": 101}, "percent"), ({"interval": 0}, "interval"), ({"interval": 1.5}, "interval"),
    ({"times": -2}, "times"), ({"times": True}, "times"), ({"space": -1}, "space"),
    ({"verbose": 3}, "verbose"), ({"seed": -1}, "seed"), ({"seed": "s"}, "seed"),
])
def test_bad_settings_are_rejected_with_the_setting_named(kw, match):
    with pytest.raises(InvalidArgument, match=match):
        FaultAttr(**kw)


def test_fault_points_names_counts_and_scoping():
    points = FaultPoints()
    assert points.points == FAULT_POINTS
    with pytest.raises(InvalidArgument, match="unknown fault point 'nope'"):
        points.set("nope", probability=1.0)
    with pytest.raises(InvalidArgument, match="FaultAttr"):
        points["alloc"] = 3
    assert not points.armed and not points.should_fail("alloc")
    with points.injecting("alloc", probability=1.0, times=2) as attr:
        assert points.armed and attr.times == 2
        assert points.allowed("alloc", 10) == 0 and points.allowed("alloc", 10) == 0
        assert points.allowed("alloc", 10) == 10  # times exhausted
    assert "alloc" not in points and points.injected["alloc"] == 2 and points.total_injected == 2
    points.set("dma_copy", probability=1.0)
    with points.suspended():
        assert not points.should_fail("dma_copy")
    del points["dma_copy"]
    points.reset_counts()
    assert points.total_injected == 0


def test_verbose_logs_each_injected_failure(caplog):
    attr = FaultAttr(probability=1.0, times=1, verbose=2)
    with caplog.at_level(logging.WARNING, logger="dmamig.fault_injection"):
        assert attr.should_fail(where="dma_copy")
    assert "FAULT_INJECTION" in caplog.text and "dma_copy" in caplog.text and "test_faults.py" in caplog.text


# -- DMA faults on the raw engine: one channel of several -----------------------------------------------------
@pytest.mark.parametrize("point", DMA_POINTS)
def test_dma_fault_on_one_channel_of_several(m3, point):
    m = m3
    rng = np.random.default_rng(1)
    src = np.sort(rng.choice(2048, 96, replace=False))
    dst = 2048 + np.sort(rng.choice(2048, 96, replace=False))
    m.frames.write_pfns(src, rand(96 * m.page_size, 2).reshape(96, -1))
    before = m.frames.read_pfns(src)
    plan = m.dma.plan(src, dst)
    assert len(set(plan.channel.tolist())) == 3
    m.faults[point] = FaultAttr(probability=1.0, times=1)
    fence = m.dma.copy(src, dst)
    with pytest.raises(DmaError, match=MESSAGES[point]):
        fence.wait(timeout=WAIT)
    assert fence.done and m.faults.injected[point] == 1 and m.dma.stats.errors == 1
    np.testing.assert_array_equal(m.frames.read_pfns(src), before)  # sources are never written
    # Only the faulted share (channel 0's, the first) is affected: the pages of the two others arrived.
    channel_of = np.empty(2048, dtype=np.int64)
    for s, n, c in zip(plan.src_start.tolist(), plan.npages.tolist(), plan.channel.tolist()):
        channel_of[s:s + n] = c
    other = channel_of[src] != 0
    got = m.frames.read_pfns(dst)
    np.testing.assert_array_equal(got[other], before[other])
    if point == "dma_complete":
        np.testing.assert_array_equal(got, before)
    # The engine (and, after a crash, the restarted channel) keeps working.
    assert m.dma.copy(src, dst).wait(timeout=WAIT)
    np.testing.assert_array_equal(m.frames.read_pfns(dst), before)
    if point == "channel_crash":
        assert m.dma.stats.channel_restarts == 1


# -- DMA faults under a no-copy migration ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", [MigrateMode.ASYNC, MigrateMode.SYNC])
@pytest.mark.parametrize("point", DMA_POINTS)
def test_dma_fault_during_a_no_copy_migration(m3, point, mode):
    m = m3
    mm = m.address_space()
    a, da, b, db = scattered(m, mm, 48)
    ps = m.page_size
    m.faults[point] = FaultAttr(probability=1.0, times=1)
    res = mm.migrate(a, 48 * ps, 1, mode=mode, engine=m.dma)
    assert m.faults.injected[point] == 1
    assert_contract(mm, a, 48, res, node=1)
    np.testing.assert_array_equal(mm.read(a, 48 * ps), da)
    np.testing.assert_array_equal(mm.read(b, 48 * ps), db)
    assert check_machine(m) == []
    res = mm.migrate(a, 48 * ps, 1, mode=mode, engine=m.dma)
    assert res.ok
    np.testing.assert_array_equal(mm.read(a, 48 * ps), da)
    close_and_check_frames(m, mm)


def test_dma_fault_during_migrate_vma(m3):
    from dmamig import MigrateVma

    m = m3
    mm = m.address_space()
    a, da, _b, _db = scattered(m, mm, 32)
    m.faults["dma_copy"] = FaultAttr(probability=1.0, times=1)
    mv = MigrateVma(mm, a, a + 32 * m.page_size, 1)
    mv.setup()
    mv.alloc_and_copy(engine=m.dma)
    mv.pages()
    mv.finalize()
    nodes = mm.nodes_of(a, 32 * m.page_size)
    assert ((mv.status == 0) == (nodes == 1)).all()
    np.testing.assert_array_equal(mm.read(a, 32 * m.page_size), da)
    close_and_check_frames(m, mm)


# -- allocation failing in the middle of a batch --------------------------------------------------------------
@pytest.mark.parametrize("engine", [False, True])
def test_allocation_fails_in_the_middle_of_a_batch_of_base_pages(m3, engine):
    m = m3
    mm = m.address_space()
    ps = m.page_size
    addr = mm.mmap(64 * ps)
    data = rand(64 * ps, 3)
    mm.write(addr, data)
    # Destination folio 20 of the batch fails; the 19 before it are allocated.
    m.faults["alloc"] = FaultAttr(probability=1.0, interval=20, times=1)
    res = mm.migrate(addr, 64 * ps, 1, engine=m.dma if engine else None)
    assert m.faults.injected["alloc"] == 1
    assert_contract(mm, addr, 64, res, node=1)
    assert res.nr_succeeded >= 19
    np.testing.assert_array_equal(mm.read(addr, 64 * ps), data)
    close_and_check_frames(m, mm)


def test_allocation_fails_for_the_second_large_folio_of_a_batch(m3):
    m = m3
    mm = m.address_space()
    ps = m.page_size
    addr = mm.mmap(1024 * ps, order=9)
    data = rand(1024 * ps, 4)
    mm.write(addr, data)
    assert m.page_controls.page_state(mm.pfn_of(addr))["order"] == 9
    m.faults["alloc"] = FaultAttr(probability=1.0, interval=2, times=1)
    res = mm.migrate(addr, 1024 * ps, 1)
    assert m.faults.injected["alloc"] == 1
    assert_contract(mm, addr, 1024, res, node=1)
    np.testing.assert_array_equal(mm.read(addr, 1024 * ps), data)
    assert check_machine(m) == []
    close_and_check_frames(m, mm)


def test_allocation_fault_in_alloc_pages_and_page_faults(m3):
    m = m3
    start = m.nodes[1].free_pages
    with m.faults.injecting("alloc", probability=1.0, interval=3, times=1):
        with pytest.raises(DmamigError, match="free"):
            m.alloc_pages(1, 8)
    assert m.nodes[1].free_pages == start  # nothing half-allocated
    mm = m.address_space()
    addr = mm.mmap(8 * m.page_size)
    with m.faults.injecting("alloc", probability=1.0, times=1):
        with pytest.raises(DmamigError):
            mm.write(addr, rand(8 * m.page_size))
    mm.write(addr, rand(8 * m.page_size, 9))
    np.testing.assert_array_equal(mm.read(addr, 8 * m.page_size), rand(8 * m.page_size, 9))
    close_and_check_frames(m, mm)


# -- worker failures ------------------------------------------------------------------------------------------
def test_an_exception_inside_a_channel_worker_fails_the_fence(m3, monkeypatch):
    m = m3
    real = cpu_kernels.copy_runs_stream
    calls = []

    def flaky(*args):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("copy engine fault inside the worker")
        return real(*args)

    hook_copy_kernels(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "copy_runs_stream", flaky)
    mm = m.address_space()
    a, da, _b, _db = scattered(m, mm, 48)
    res = mm.migrate(a, 48 * m.page_size, 1, engine=m.dma)
    assert calls[0].startswith("dmamig-dma")
    assert_contract(mm, a, 48, res, node=1)
    np.testing.assert_array_equal(mm.read(a, 48 * m.page_size), da)
    dst = m.alloc_pages(1, 10)
    assert m.dma.copy(np.arange(10), dst).wait(timeout=WAIT)
    m.put_pages(dst)
    close_and_check_frames(m, mm)


def test_a_worker_that_exits_is_restarted_by_the_next_wait(m3):
    m = m3
    ch = m.dma._channels[0]
    stop_worker(ch)  # the worker leaves its loop as if stopped, but nobody closed the channel
    src = np.arange(32)
    m.frames.write_pfns(src, rand(32 * m.page_size, 5).reshape(32, -1))
    fence = m.dma.copy(src, 2048 + src)
    finish_within(lambda: fence.wait(), "a wait on a restarted channel")
    np.testing.assert_array_equal(m.frames.read_pfns(2048 + src), m.frames.read_pfns(src))
    assert ch.alive and m.dma.stats.channel_restarts == 1


def test_a_worker_that_keeps_dying_breaks_its_channel_with_a_clear_error(m3, monkeypatch):
    m = m3
    ch = m.dma._channels[0]

    def die() -> None:
        raise RuntimeError("worker cannot start")

    monkeypatch.setattr(ch, "_loop", die)
    stop_worker(ch)
    src = np.arange(8)
    fence = m.dma.copy(src, 2048 + src)  # contiguous: one run, on channel 0

    def wait_for_error() -> None:
        with pytest.raises(DmaError, match="broken: its worker thread died 3 times in a row"):
            fence.wait()

    finish_within(wait_for_error, "a wait on a broken channel")
    with pytest.raises(DmaError, match="broken"):
        m.dma.copy(src, 2048 + src).wait(timeout=WAIT)


def test_a_crash_with_queued_work_behind_it(m3):
    m = m3
    src = np.arange(16)
    m.frames.write_pfns(src, rand(16 * m.page_size, 6).reshape(16, -1))
    m.faults["channel_crash"] = FaultAttr(probability=1.0, times=1)
    fences = [m.dma.copy(src, 2048 + 16 * i + src) for i in range(4)]  # one channel, queued in order
    with pytest.raises(DmaError, match="died"):
        fences[0].wait(timeout=WAIT)
    for i, f in enumerate(fences[1:], 1):
        assert f.wait(timeout=WAIT)
        np.testing.assert_array_equal(m.frames.read_pfns(2048 + 16 * i + src), m.frames.read_pfns(src))


# -- closing while work is in flight --------------------------------------------------------------------------
def test_machine_close_while_migrations_and_copies_are_in_flight():
    m = Machine(host_pages=4096, device_pages=4096, devices=1, backend="cpu", channels=2)
    ps = m.page_size
    spaces = []
    for i in range(3):
        mm = m.address_space()
        addr = mm.mmap(512 * ps)
        mm.write(addr, rand(512 * ps, 10 + i))
        spaces.append((mm, addr))
    started = threading.Barrier(5)
    unexpected: list[BaseException] = []

    def migrator(mm, addr, k: int) -> None:
        started.wait(WAIT)
        for i in range(200):
            try:
                mm.migrate(addr, 512 * ps, (i + k) % 2, mode=MigrateMode.SYNC,
                           engine=m.dma if (i + k) % 3 else None)
            except DmamigError:
                return  # closed under our feet: refused with the project's error, nothing hangs
            except BaseException as exc:
                unexpected.append(exc)
                return

    def copier() -> None:
        started.wait(WAIT)
        for _ in range(200):
            try:
                dst = m.alloc_pages(1, 1024)
                try:
                    m.dma.copy(np.arange(1024), dst).wait()
                finally:
                    m.put_pages(dst)
            except DmamigError:
                return
            except BaseException as exc:
                unexpected.append(exc)
                return

    crew = [threading.Thread(target=migrator, args=(mm, addr, k), daemon=True)
            for k, (mm, addr) in enumerate(spaces)]
    crew.append(threading.Thread(target=copier, daemon=True))
    for t in crew:
        t.start()
    started.wait(WAIT)
    finish_within(m.close, "Machine.close with work in flight")
    for t in crew:
        t.join(WAIT)
    assert not any(t.is_alive() for t in crew), "a thread is still blocked after Machine.close"
    assert unexpected == []
    assert [n.free_pages for n in m.nodes] == [n.total_pages for n in m.nodes]


def test_engine_close_fails_work_queued_on_a_dead_channel(m3, monkeypatch):
    m = m3
    monkeypatch.setattr(cpu_channel, "CLOSE_TIMEOUT", 5.0)
    src = np.arange(16)
    m.faults["channel_crash"] = FaultAttr(probability=1.0, times=1)
    fences = [m.dma.copy(src, 2048 + 16 * i + src) for i in range(3)]
    finish_within(m.dma.close, "DmaEngine.close after a crash")
    with pytest.raises(DmaError):
        fences[0].wait(timeout=0)
    assert all(f.done for f in fences)


# -- misuse of the fault API and the engine -------------------------------------------------------------------
def test_inject_errors_is_a_shortcut_that_adds_up_and_zero_cancels(m3):
    m = m3
    m.dma.inject_errors(2)
    m.dma.inject_errors(1)
    assert m.faults["dma_submit"].times == 3
    m.dma.inject_errors(0)
    assert "dma_submit" not in m.faults
    src = np.arange(4)
    assert m.dma.copy(src, 2048 + src).wait(timeout=WAIT)


@pytest.mark.parametrize("timeout", ["x", -1, float("nan"), True, [1]])
def test_fence_wait_rejects_a_bad_timeout(m3, timeout):
    fence = m3.dma.copy(np.arange(4), 2048 + np.arange(4))
    with pytest.raises(InvalidArgument, match="timeout"):
        fence.wait(timeout=timeout)
    assert fence.wait(timeout=WAIT)


# -- channels that cannot fail inside their worker (as CUDA streams): the engine emulates the fault -----------
class PlainChannel(cpu_channel.CpuChannel):
    injects_faults = False

    def submit(self, work, fault=None):
        assert fault is None, "the engine must not ask this channel to inject a fault"
        return super().submit(work)


class PlainBackend(cpu_backend.CpuBackend):
    def open_channels(self, count):
        cpu_kernels.warm_up()
        return [PlainChannel(i) for i in range(count)]


@pytest.mark.parametrize("point", ["dma_copy", "dma_complete", "channel_crash"])
def test_the_engine_emulates_faults_for_channels_without_fault_support(point):
    from dmamig.dma import DmaEngine
    from dmamig.nodes import Node, NodeMap

    backend = PlainBackend()
    nodes, base = [], 0
    for i, n in enumerate((64, 64)):
        frames = backend.alloc_frames("host", -1, n, 256)
        frames[:] = np.random.default_rng(i).integers(0, 256, frames.shape, dtype=np.uint8)
        nodes.append(Node(i, "host" if i == 0 else "device", i - 1, base, n, frames))
        base += n
    with DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=256, channels=1) as engine:
        engine.faults[point] = FaultAttr(probability=1.0, times=1)
        src = np.arange(0, 64, 2)  # scattered: one run per page
        fence = engine.copy(src, 64 + src)
        with pytest.raises(DmaError, match=f"injected {point.split('_')[-1]} fault"):
            fence.wait(timeout=WAIT)
        copied = (nodes[1].frames[src] == nodes[0].frames[src]).all(axis=1)
        assert copied.all() if point == "dma_complete" else 0 < copied.sum() < src.size
        assert engine.copy(src, 64 + src).wait(timeout=WAIT)
