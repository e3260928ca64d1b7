"""The DMA channel protocol (dmamig.dma.ring) under a thread consumer: submissions published whole, in order,
around the end of the ring, refused when full or too big, a bad row as a status, a stalled consumer and a
bounded close. Every case checks the bytes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support import WAIT, finish_within

from dmamig import DmaError, Machine
from dmamig.backends.cpu import channel as cpu_channel
from dmamig.backends.cpu import ring_consumer as cpu_ring
from dmamig.backends.cpu.copy_loops import aligned_zeros
from dmamig.backends.cpu.polling_channel import PollingCpuChannel
from dmamig.dma import PlanOptions
from dmamig.dma import ring as dma_ring
from dmamig.dma.channel import ChannelWork
from dmamig.dma.copy_plan import METHOD_MEMCPY

pytestmark = pytest.mark.skipif(not cpu_ring.RING_AVAILABLE, reason=f"no rings here: {cpu_ring.RING_ERROR}")

PAGE = 4096
OPTS = PlanOptions()


def frames(n: int, seed: int) -> np.ndarray:
    f = aligned_zeros(n, PAGE)
    f[:] = np.random.default_rng(seed).integers(0, 256, f.shape, dtype=np.uint8)
    return f


class Consumer:
    """The CPU consumer's compiled loop serving one ring on a thread, until stopped (a Python job)."""

    def __init__(self, ring: dma_ring.Ring) -> None:
        self.ring = ring
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        clock = np.zeros(2, dtype=np.int64)
        while cpu_ring.serve(self.ring, 1_000_000, clock) != cpu_ring.SERVE_PYTHON:
            pass
        self.ring.finish(self.ring.head + 1)

    def stop(self) -> None:
        with self.ring.ring_set.lock:
            assert self.ring.has_room()
            self.ring.publish(dma_ring.JOB_PYTHON)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def submit(rings: dma_ring.RingSet, src_f: np.ndarray, dst_f: np.ndarray, src: np.ndarray,
           dst: np.ndarray) -> dma_ring.Submitted | int:
    return rings.route(0, 0, src_f.ctypes.data, dst_f.ctypes.data, PAGE, OPTS).submit(
        np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))


def wait_done(ring: dma_ring.Ring, seq: int) -> None:
    assert cpu_ring.poll_status(ring, seq, 5 * 10**9) is not None


def registered(channels: int, *bufs: np.ndarray, **kw) -> dma_ring.RingSet:
    rings = dma_ring.RingSet(channels, **kw)
    for b in bufs:
        rings.register_frames(b)
    return rings


def test_jobs_run_in_submission_order_on_each_channel():
    src, dst = frames(64, 1), frames(8, 2)
    rings = registered(1, src, dst)
    consumer = Consumer(rings.rings[0])
    seqs = [submit(rings, src, dst, np.arange(i * 8, i * 8 + 8), np.arange(8)).seqs[0] for i in range(8)]
    assert seqs == list(range(8))
    wait_done(rings.rings[0], 7)
    np.testing.assert_array_equal(dst, src[56:64])  # eight copies onto the same frames: the last one wins
    assert all(rings.rings[0].status(s) == dma_ring.STATUS_OK for s in seqs)
    consumer.stop()


def test_submissions_of_every_size_reuse_one_workspace_and_copy_exactly():
    src, dst = frames(1024, 16), frames(1024, 17)
    rings = registered(3, src, dst)
    consumers = [Consumer(r) for r in rings.rings]
    rng = np.random.default_rng(18)
    for n in (3, 5, 100, 7, 700, 1, 1000, 64):  # the workspace grows, then serves smaller ones
        pages = np.sort(rng.choice(1024, n, replace=False))
        perm = rng.permutation(pages)
        got = submit(rings, src, dst, perm, pages)
        for ring, (seq, _) in zip(rings.rings, got.jobs):
            if seq >= 0:
                wait_done(ring, seq)
        np.testing.assert_array_equal(dst[pages], src[perm])
    for c in consumers:
        c.stop()


def test_rows_wrap_around_the_end_of_the_ring():
    src, dst = frames(256, 3), frames(256, 4)
    rings = registered(1, src, dst, row_capacity=48, job_capacity=4)
    ring = rings.rings[0]
    consumer = Consumer(ring)
    rng = np.random.default_rng(5)
    for _ in range(12):  # 30 scattered rows a job through 48 slots: most jobs wrap
        pages = np.sort(rng.choice(128, 30, replace=False)) * 2  # never contiguous: one row a page
        got = submit(rings, src, dst, pages, pages + 1)
        while got == dma_ring.SUBMIT_NO_ROOM:
            rings.make_room()
            got = submit(rings, src, dst, pages, pages + 1)
        wait_done(ring, got.seqs[0])
        np.testing.assert_array_equal(dst[pages + 1], src[pages])
    assert int(ring.ctl[dma_ring.ROW_TAIL]) == 12 * 30 > ring.row_capacity
    consumer.stop()


def test_a_full_ring_publishes_nothing_until_its_consumer_frees_room():
    src, dst = frames(64, 5), frames(64, 6)
    rings = registered(2, src, dst, row_capacity=16, job_capacity=2)
    pages = np.arange(0, 40, 2)  # 20 single-page rows: 10 a channel
    assert isinstance(submit(rings, src, dst, pages, pages), dma_ring.Submitted)
    before = [(r.tail, int(r.ctl[dma_ring.ROW_TAIL])) for r in rings.rings]
    assert submit(rings, src, dst, pages + 1, pages + 1) == dma_ring.SUBMIT_NO_ROOM  # 10 more rows do not fit
    assert [(r.tail, int(r.ctl[dma_ring.ROW_TAIL])) for r in rings.rings] == before  # nothing written
    consumers = [Consumer(r) for r in rings.rings]
    for r in rings.rings:
        wait_done(r, 0)
    got = submit(rings, src, dst, pages + 1, pages + 1)
    assert isinstance(got, dma_ring.Submitted) and got.seqs == [1, 1]
    for r in rings.rings:
        wait_done(r, 1)
    np.testing.assert_array_equal(dst[:40], src[:40])
    for c in consumers:
        c.stop()


def test_a_share_larger_than_its_ring_is_refused_whole_and_the_engine_takes_the_general_path(monkeypatch):
    src, dst = frames(64, 7), frames(64, 8)
    rings = registered(1, src, dst, row_capacity=8)
    assert submit(rings, src, dst, np.arange(0, 40, 2), np.arange(0, 40, 2)) == dma_ring.SUBMIT_TOO_BIG
    assert rings.rings[0].tail == 0
    monkeypatch.setattr(dma_ring, "ROW_CAPACITY", 8)
    m = Machine(host_pages=256, device_pages=256, backend="cpu", channels=2)
    try:
        src_p = np.arange(0, 200, 2)
        data = np.random.default_rng(9).integers(0, 256, (src_p.size, m.page_size), dtype=np.uint8)
        m.frames.write_pfns(src_p, data)
        m.dma.copy(src_p, 256 + src_p).wait(WAIT)  # 50 rows a channel, 8 slots: whole, on the general path
        np.testing.assert_array_equal(m.frames.read_pfns(256 + src_p), data)
    finally:
        finish_within(m.close, "close")


def test_a_row_outside_registered_memory_is_a_status_and_nothing_of_its_job_is_copied():
    src, dst = frames(8, 9), frames(8, 10)
    before = dst.copy()
    rings = registered(1, src, dst)
    ring = rings.rings[0]
    rows = dma_ring.external_rows([(src, dst, np.array([0, 2, 4], dtype=np.int64),
                                    np.array([0, 2, 4], dtype=np.int64), np.ones(3, dtype=np.int64))])
    rows[1, 1] = 64  # a destination far outside every registered range (never written: it is checked first)
    consumer = Consumer(ring)
    with rings.lock:
        seq, _ = ring.publish(dma_ring.JOB_EXTERNAL, rows)
    wait_done(ring, seq)
    assert ring.status(seq) == dma_ring.STATUS_BAD_ROW
    np.testing.assert_array_equal(dst, before)  # not even the row before it: every row is checked first
    good = submit(rings, src, dst, [5], [5]).seqs[0]  # the channel goes on
    wait_done(ring, good)
    assert ring.status(good) == dma_ring.STATUS_OK
    np.testing.assert_array_equal(dst[5], src[5])
    consumer.stop()


def test_a_bad_row_fails_its_fence_with_the_reason(monkeypatch):
    ch = PollingCpuChannel(0, poll_us=100)
    try:
        src, dst = frames(4, 11), frames(4, 12)
        ch.ring_set.register_frames(src)
        ch.ring_set.register_frames(dst)
        rows = dma_ring.external_rows([(src, dst, np.zeros(1, np.int64), np.zeros(1, np.int64),
                                        np.ones(1, np.int64))])
        rows[0, 0] = 4096  # a source nobody registered
        completion = ch._enqueue(rows, [], None, [])
        assert completion.wait(WAIT)
        assert isinstance(completion.error, DmaError) and "outside registered memory" in str(completion.error)
    finally:
        finish_within(ch.close, "close")


class StalledChannel(PollingCpuChannel):
    """A channel whose consumer stalls on its first Python job until released."""

    compiled_copies = False
    release: threading.Event

    def _execute(self, work, fault=None):
        self.release.wait(WAIT)
        super()._execute(work, fault)


def test_a_stalled_consumer_bounds_every_wait_and_a_close(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(StalledChannel, "release", release, raising=False)
    monkeypatch.setattr(cpu_channel, "CLOSE_TIMEOUT", 0.3)
    ch = StalledChannel(0, poll_us=50)
    src, dst = frames(4, 13), frames(4, 14)
    one = np.ones(1, dtype=np.int64)
    job = ch.submit([ChannelWork(src, dst, "host", "device", -1, 0, METHOD_MEMCPY, 0 * one, one, one)])
    assert job.wait(0.05) is False and not job.done()
    with pytest.raises(DmaError, match="did not stop within"):
        ch.close()  # bounded: the consumer is stalled
    release.set()
    assert job.wait(WAIT) and job.error is None
    np.testing.assert_array_equal(dst[1], src[0])


def test_a_sleeping_consumer_is_woken_by_a_compiled_submission():
    m = Machine(host_pages=256, device_pages=256, backend="cpu", channels=2, dma_poll_us=1)
    try:
        src = np.arange(0, 64)
        data = np.random.default_rng(15).integers(0, 256, (src.size, m.page_size), dtype=np.uint8)
        m.frames.write_pfns(src, data)
        for _ in range(20):  # each round waits long past the poll window: the workers are asleep
            threading.Event().wait(0.005)
            m.dma.copy(src, 256 + src).wait(WAIT)
            np.testing.assert_array_equal(m.frames.read_pfns(256 + src), data)
    finally:
        finish_within(m.close, "close")


def test_registered_memory_stays_alive_until_the_rings_detach():
    # Pinned host frames are freed when their last reference goes: a lane must not let that happen while a
    # job may still point into them, only once its consumer has finished (detach).
    import gc
    import weakref

    rings = dma_ring.RingSet(1)
    frames = np.zeros((4, PAGE), dtype=np.uint8)
    ref = weakref.ref(frames)
    rings.register_frames(frames)
    del frames
    gc.collect()
    assert ref() is not None
    rings.detach()
    gc.collect()
    assert ref() is None


def test_a_consumer_that_cannot_start_fails_only_the_unfinished_jobs_it_was_given():
    rings = dma_ring.RingSet(3)
    r0, r1, r2 = rings.rings
    with rings.lock:
        done, _ = r0.publish(dma_ring.JOB_PYTHON)
        r0.finish(done + 1)  # already copied: keeps its status
        left, _ = r0.publish(dma_ring.JOB_PYTHON)
        other, _ = r1.publish(dma_ring.JOB_PYTHON)
    rings.fail_unfinished([[done, 0], [other, 0], [-1, 0]])  # channel 0's finished job, channel 1's, none on 2
    assert r0.status(done) == dma_ring.STATUS_OK
    assert r1.status(other) == dma_ring.STATUS_FAILED and r1.head == other + 1
    assert r0.head == done + 1 and r0.status(left) == dma_ring.STATUS_PENDING  # not given: left alone
    assert r2.tail == 0 and r2.head == 0


def test_a_route_covers_the_pages_between_its_two_memories_only():
    rings = dma_ring.RingSet(1)
    route = rings.route(100, 500, 0, 0, PAGE, OPTS, src_pages=50, dst_pages=10)
    assert route.covers(100, 500) and route.covers(149, 509)
    assert not route.covers(99, 500) and not route.covers(150, 500)
    assert not route.covers(100, 499) and not route.covers(100, 510)
    unbounded = rings.route(0, 8, 0, 0, PAGE, OPTS)  # no sizes given: from each base up
    assert unbounded.covers(1 << 40, 8) and not unbounded.covers(0, 7)
