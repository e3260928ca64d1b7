"""Polling DMA channels of the CPU backend: the doorbell ring, its compiled loops, and the channel around them.

The ring is checked on its own (a worker thread serving it, waiters polling it), then the channel: order
across compiled and Python jobs, the full ring, sleeping workers and waiters, close and the machine setting.
Reliability under faults runs on polling and sleeping channels alike in test_faults.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from support import WAIT, finish_within, rand

from dmamig import DmaError, FaultAttr, InvalidArgument, Machine
from dmamig.backends.cpu import ring_consumer as cpu_ring
from dmamig.backends.cpu.channel import CpuChannel
from dmamig.backends.cpu.copy_loops import aligned_zeros
from dmamig.backends.cpu.polling_channel import PollingCpuChannel
from dmamig.dma import ring as dma_ring
from dmamig.dma.channel import DEFAULT_POLL_US, ChannelWork
from dmamig.dma.copy_plan import METHOD_GATHER, METHOD_MEMCPY

pytestmark = pytest.mark.skipif(not cpu_ring.RING_AVAILABLE, reason=f"no polling channels here: {cpu_ring.RING_ERROR}")

PAGE = 4096


def frames(n: int, seed: int) -> np.ndarray:
    f = aligned_zeros(n, PAGE)
    f[:] = np.random.default_rng(seed).integers(0, 256, f.shape, dtype=np.uint8)
    return f


def work(src, dst, s, d, n, method=METHOD_MEMCPY) -> ChannelWork:
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return ChannelWork(src, dst, "host", "device", -1, 0, method, a(s), a(d), a(n))


# -- the CPU consumer of the ring -------------------------------------------------------------------------------
def serve_until_python(ring: dma_ring.Ring, seen: list[int]) -> None:
    clock = np.zeros(2, dtype=np.int64)
    while True:
        why = cpu_ring.serve(ring, 10_000_000, clock)
        seen.append(why)
        if why == cpu_ring.SERVE_PYTHON:
            ring.finish(ring.head + 1)
            return


def test_the_consumer_runs_copy_jobs_in_order_and_hands_python_jobs_back():
    src, dst = frames(64, 1), frames(64, 2)
    ring = dma_ring.RingSet(1, job_capacity=8).rings[0]
    descs = [dma_ring.external_rows([(src, dst, np.array([i * 8], dtype=np.int64), np.array([0], dtype=np.int64),
                                      np.array([8], dtype=np.int64))]) for i in range(4)]
    seen: list[int] = []
    t = threading.Thread(target=serve_until_python, args=(ring, seen))
    t.start()
    seqs = [ring.publish(dma_ring.JOB_EXTERNAL, d)[0] for d in descs]  # four copies onto the same 8 frames
    assert seqs == [0, 1, 2, 3]
    assert cpu_ring.poll_status(ring, 3, 10**9) == dma_ring.STATUS_OK
    np.testing.assert_array_equal(dst[:8], src[24:32])  # the last one wins: jobs ran in order
    assert [ring.status(s) for s in seqs] == [dma_ring.STATUS_OK] * 4
    ring.publish(dma_ring.JOB_PYTHON)
    t.join(WAIT)
    assert not t.is_alive() and seen[-1] == cpu_ring.SERVE_PYTHON and ring.head == ring.tail == 5
    assert ring.busy_ns > 0


def test_rows_stream_only_to_aligned_destinations():
    src, dst = frames(4, 1), frames(4, 2)
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    aligned = dma_ring.external_rows([(src, dst, zero, one, one)])
    assert aligned[0].tolist() == [src.ctypes.data, dst.ctypes.data + PAGE, PAGE, dma_ring.ROW_STREAM]
    odd = np.zeros(4 * 72 + 8, dtype=np.uint8)[8:].reshape(4, 72)  # rows of 72 bytes: no whole 64-byte steps
    plain = dma_ring.external_rows([(odd, odd, zero, one, one)])
    assert plain[0, 3] == 0
    ring = dma_ring.RingSet(1, job_capacity=2).rings[0]
    odd[0] = np.arange(72, dtype=np.uint8)
    ring.publish(dma_ring.JOB_EXTERNAL, plain)
    ring.publish(dma_ring.JOB_PYTHON)
    assert cpu_ring.serve(ring, 0, np.zeros(2, dtype=np.int64)) == cpu_ring.SERVE_PYTHON
    np.testing.assert_array_equal(odd[1], np.arange(72, dtype=np.uint8))


def test_a_poll_gives_up_after_its_budget():
    ring = dma_ring.RingSet(1, job_capacity=2).rings[0]
    ring.publish(dma_ring.JOB_PYTHON)  # nobody serves it
    t0 = time.perf_counter()
    assert cpu_ring.poll_status(ring, 0, 2_000_000) is None
    assert 0.001 < time.perf_counter() - t0 < 1.0
    ring.finish(1)
    assert cpu_ring.poll_status(ring, 0, 0) == dma_ring.STATUS_OK


def test_a_poll_reads_the_job_status_and_one_a_reap_kept():
    ring = dma_ring.RingSet(1, job_capacity=2).rings[0]
    for _ in range(2):
        ring.publish(dma_ring.JOB_PYTHON)
    ring.finish(1, dma_ring.STATUS_FAILED)
    ring.finish(2)
    assert cpu_ring.poll_status(ring, 0, 0) == dma_ring.STATUS_FAILED
    assert cpu_ring.poll_status(ring, 1, 0) == dma_ring.STATUS_OK
    ring.reap()  # both slots free for reuse: the failed job's status is kept by the ring, the OK one is not needed
    ring.publish(dma_ring.JOB_PYTHON)  # reuses job 0's slot
    assert cpu_ring.poll_status(ring, 0, 0) == dma_ring.STATUS_FAILED
    assert cpu_ring.poll_status(ring, 1, 0) == dma_ring.STATUS_OK
    assert cpu_ring.poll_status(ring, 2, 0) is None


def test_a_reap_across_the_ring_end_keeps_every_failed_status():
    ring = dma_ring.RingSet(1, job_capacity=4).rings[0]
    for _ in range(3):
        ring.publish(dma_ring.JOB_PYTHON)
    ring.finish(3)
    ring.reap()
    for seq in range(3, 7):  # slots 3, 0, 1, 2: the jobs wrap around the end
        ring.publish(dma_ring.JOB_PYTHON)
        ring.finish(seq + 1, dma_ring.STATUS_BAD_ROW if seq in (3, 5) else dma_ring.STATUS_OK)
    ring.reap()
    for _ in range(3):  # every slot free again: the reaped statuses are the ring's
        ring.publish(dma_ring.JOB_PYTHON)
    assert [ring.status(seq) for seq in range(7)] == [dma_ring.STATUS_OK] * 3 + [
        dma_ring.STATUS_BAD_ROW, dma_ring.STATUS_OK, dma_ring.STATUS_BAD_ROW, dma_ring.STATUS_OK]


def test_an_idle_serve_returns_after_its_window():
    ring = dma_ring.RingSet(1, job_capacity=2).rings[0]
    t0 = time.perf_counter()
    assert cpu_ring.serve(ring, 2_000_000, np.zeros(2, dtype=np.int64)) == cpu_ring.SERVE_IDLE
    assert 0.001 < time.perf_counter() - t0 < 1.0


# -- the channel ------------------------------------------------------------------------------------------------
@pytest.fixture
def channel():
    ch = PollingCpuChannel(0, poll_us=200)
    yield ch
    finish_within(ch.close, "PollingCpuChannel.close")


def test_compiled_and_python_jobs_keep_submission_order(channel):
    src, dst = frames(32, 1), frames(32, 2)
    first = channel.submit([work(src, dst, [0], [0], [8])], fault="complete")  # a Python job: copies, then fails
    second = channel.submit([work(src, dst, [8], [0], [8])])  # compiled, onto the same frames
    assert second.wait(WAIT) and first.done()
    assert isinstance(first.error, DmaError) and second.error is None
    np.testing.assert_array_equal(dst[:8], src[8:16])
    counters = channel.counters
    assert counters["memcpy_calls"] == 2 and counters["kernel_launches"] == 0


def test_many_jobs_in_flight_past_a_full_ring(channel, monkeypatch):
    monkeypatch.setattr(dma_ring, "JOB_CAPACITY", 4)
    ch = PollingCpuChannel(1, poll_us=50)
    try:
        src, dst = frames(64, 3), frames(64, 4)
        done = [ch.submit([work(src, dst, [i % 64], [i % 64], [1], METHOD_GATHER)]) for i in range(200)]
        finish_within(lambda: [c.wait() for c in done], "200 jobs through a 4-slot ring")
        assert all(c.done() and c.error is None for c in done)
        np.testing.assert_array_equal(dst, src)
        assert ch.counters["kernel_launches"] == 200 and ch.busy_seconds > 0
    finally:
        finish_within(ch.close, "close")


def test_sleeping_workers_and_waiters_wake(monkeypatch):
    """With a 1 us window both sides sleep almost at once: every wake-up path must still deliver."""
    ch = PollingCpuChannel(0, poll_us=1)
    try:
        src, dst = frames(64, 5), frames(64, 6)
        for round_ in range(3):
            time.sleep(0.01)  # the worker is asleep on its doorbell by now
            assert ch._idle
            jobs = [ch.submit([work(src, dst, [i], [(i + round_) % 64], [1])]) for i in range(64)]
            waiters = [threading.Thread(target=c.wait) for c in jobs[::8]]
            for t in waiters:
                t.start()
            finish_within(lambda jobs=jobs: [c.wait() for c in jobs], "waiters of a sleeping channel")
            for t in waiters:
                t.join(WAIT)
                assert not t.is_alive()
            assert not ch._gates
            np.testing.assert_array_equal(dst[(np.arange(64) + round_) % 64], src)
    finally:
        finish_within(ch.close, "close")


class HeldChannel(PollingCpuChannel):
    """A polling channel whose jobs wait for ``release`` before they copy (they run in Python)."""

    release: threading.Event

    def _execute(self, w, fault=None):
        assert self.release.wait(WAIT)
        super()._execute(w, fault)


def held_channel(monkeypatch) -> tuple[HeldChannel, threading.Event]:
    release = threading.Event()
    monkeypatch.setattr(HeldChannel, "release", release, raising=False)
    return HeldChannel(0, poll_us=100), release


def test_a_wait_with_a_timeout_returns_false_while_the_job_is_held(monkeypatch):
    ch, release = held_channel(monkeypatch)
    try:
        assert ch._compiled is False  # a customised _execute runs every job in Python
        src, dst = frames(8, 7), frames(8, 8)
        c = ch.submit([work(src, dst, [0], [0], [8])])
        assert c.wait(0) is False and c.wait(0.02) is False and not c.done()
        release.set()
        assert c.wait(WAIT) and c.error is None
        np.testing.assert_array_equal(dst, src)
    finally:
        release.set()
        finish_within(ch.close, "close")


def test_a_timed_wait_counts_its_poll_window_against_the_timeout(monkeypatch):
    """A waiter polls, then sleeps until the deadline: the poll is part of the wait, not added to it."""
    release = threading.Event()
    monkeypatch.setattr(HeldChannel, "release", release, raising=False)
    ch = HeldChannel(0, poll_us=2_000_000)  # a poll window longer than the wait
    try:
        src, dst = frames(8, 7), frames(8, 8)
        c = ch.submit([work(src, dst, [0], [0], [8])])
        t0 = time.monotonic()
        assert c.wait(0.3) is False
        assert time.monotonic() - t0 < 0.55  # polling 0.3 s then sleeping 0.3 s more would take 0.6
        release.set()
        assert c.wait(WAIT) and c.error is None
    finally:
        release.set()
        finish_within(ch.close, "close")


def test_close_runs_what_is_queued_then_refuses_work(channel):
    src, dst = frames(16, 9), frames(16, 10)
    jobs = [channel.submit([work(src, dst, [i], [i], [1])]) for i in range(16)]
    finish_within(channel.close, "close")
    assert all(c.done() and c.error is None for c in jobs)
    np.testing.assert_array_equal(dst, src)
    assert not channel.alive
    with pytest.raises(DmaError, match="closed"):
        channel.submit([work(src, dst, [0], [0], [1])])
    channel.close()  # idempotent


def test_staged_work_goes_through_the_python_worker(channel):
    src, dst = frames(16, 11), frames(16, 12)
    w = ChannelWork(src, dst, "device", "device", 0, 1, METHOD_MEMCPY, np.array([0]), np.array([4]), np.array([8]),
                    staged=True)
    assert channel._rows([w]) is None
    assert channel.submit([w]).wait(WAIT)
    np.testing.assert_array_equal(dst[4:12], src[:8])
    assert channel.counters["staged_runs"] == 1


# -- the machine setting ----------------------------------------------------------------------------------------
def test_the_machine_polls_by_default_and_can_sleep_instead():
    for poll, kind in ((None, PollingCpuChannel), (250, PollingCpuChannel), (0, CpuChannel)):
        m = Machine(host_pages=256, device_pages=256, backend="cpu", channels=2, dma_poll_us=poll)
        try:
            assert m.dma_poll_us == (DEFAULT_POLL_US if poll is None else poll)
            mm = m.address_space()
            addr = mm.mmap(64 * m.page_size)
            data = rand(64 * m.page_size, 3)
            mm.write(addr, data)
            assert mm.migrate(addr, 64 * m.page_size, 1, engine=m.dma).ok
            assert type(m.dma._channels[0]) is kind
            np.testing.assert_array_equal(mm.read(addr, 64 * m.page_size), data)
            if kind is PollingCpuChannel:
                assert m.dma._channels[0].poll_ns == int((poll or DEFAULT_POLL_US) * 1000)
        finally:
            finish_within(m.close, "close")


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "1", 2e6])
def test_a_bad_poll_window_is_refused(bad):
    with pytest.raises(InvalidArgument, match="dma_poll_us"):
        Machine(host_pages=64, device_pages=64, backend="cpu", dma_poll_us=bad)


def test_close_with_a_full_ring_still_stops_the_worker(monkeypatch):
    monkeypatch.setattr(dma_ring, "JOB_CAPACITY", 4)
    ch, release = held_channel(monkeypatch)
    src, dst = frames(8, 13), frames(8, 14)
    jobs = [ch.submit([work(src, dst, [i], [i], [1])]) for i in range(4)]  # the ring is full: no slot to stop
    closer = threading.Thread(target=ch.close)
    closer.start()
    time.sleep(0.02)
    assert closer.is_alive()  # close waits for the queued jobs
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive() and not ch.alive
    assert all(c.done() and c.error is None for c in jobs)
    np.testing.assert_array_equal(dst[:4], src[:4])


def test_the_engine_submits_to_every_ring_in_one_call_with_the_general_path_s_counts(monkeypatch):
    m = Machine(host_pages=512, device_pages=512, backend="cpu", channels=2)
    try:
        assert m.dma.channels == 2  # the engine (and its rings' warm-up) exists before the spy
        calls = []
        real = dma_ring.RingRoute.submit

        def spy(self, *args, **kw):
            got = real(self, *args, **kw)
            calls.append(got.seqs)
            return got

        monkeypatch.setattr(dma_ring.RingRoute, "submit", spy)
        src = np.concatenate([np.arange(0, 200), np.arange(300, 400, 2)])  # long runs and single pages
        data = rand(src.size * m.page_size, 4).reshape(src.size, -1)
        m.frames.write_pfns(src, data)

        def copied() -> list[dict[str, int]]:
            before = [dict(ch.counters) for ch in m.dma._channels]
            m.dma.copy(src, 512 + src).wait(WAIT)
            np.testing.assert_array_equal(m.frames.read_pfns(512 + src), data)
            return [{k: ch.counters[k] - b[k] for k in b} for ch, b in zip(m.dma._channels, before)]

        m.dma.faults["dma_copy"] = FaultAttr(probability=0.0)  # a fault point armed: the general path
        general = copied()
        assert calls == []
        del m.dma.faults["dma_copy"]
        planned = copied()
        assert len(calls) == 1 and all(seq >= 0 for seq in calls[0])  # one call, a job on each channel
        assert planned == general and sum(d["kernel_launches"] + d["memcpy_calls"] for d in planned) > 0
    finally:
        finish_within(m.close, "close")
