"""Polling DMA channels of the CPU backend: a worker that watches its doorbell, waiters that poll completion.

A :class:`PollingCpuChannel` is a :class:`~dmamig.backends.cpu.channel.CpuChannel` whose worker stays in a
compiled loop between jobs (:mod:`dmamig.backends.cpu.ring_consumer`), as a copy engine watches its doorbell, and whose
waiters poll the completion word, as the kernel's ``dma_sync_wait()`` does. A submission reaches the worker in
well under a microsecond instead of an OS wake-up (about 25 us a hop on the 2-vCPU reference VM), and the
worker's copies never wait for the GIL.

Both sides poll for at most ``poll_us`` and then sleep on a lock as the sleeping channel does, so an idle
engine costs no CPU. Plain copies run in the compiled loop; jobs that need Python (injected faults, staged
copies through the bounce buffer, a customised ``_execute``) go through the same ring, in order, and the loop
hands them back to the worker's Python side. Reliability is the sleeping channel's: a worker that dies fails
the job it held and is restarted, one that keeps dying breaks the channel, ``close`` drains.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from ...dma import ring as dma_ring
from ...dma.channel import DEFAULT_POLL_US, ChannelWork
from ...errors import DmaError
from . import ring_consumer
from .channel import LIVENESS_PERIOD, CpuChannel, finish_once, sleep_on_gate

__all__ = ["DEFAULT_POLL_US", "PollingCpuChannel"]

#: In-flight job records kept before the finished ones are dropped (with the row arrays they hold).
_REAP_AFTER = 16


def _runs(a: np.ndarray) -> np.ndarray:
    # The compiled fill takes C-contiguous int64 only (the engine's runs already are: no copy then).
    return a if type(a) is np.ndarray and a.dtype == np.int64 and a.flags.c_contiguous else \
        np.ascontiguousarray(a, dtype=np.int64)


class _RingCompletion:
    """Completion of job ``seq`` of a polling channel: done once the ring's ``HEAD`` passed it; its error is the
    job's status (or what the channel's Python side recorded)."""

    __slots__ = ("_channel", "error", "finished", "seq")

    def __init__(self, channel: PollingCpuChannel, seq: int) -> None:
        self._channel = channel
        self.finished = False
        self.seq = seq
        self.error: BaseException | None = None

    def done(self) -> bool:
        if self.finished:
            return True
        if self._channel._ring.head > self.seq:
            self._settle()
            return True
        return False

    def wait(self, timeout: float | None = None) -> bool:
        if self.finished:
            return True
        ch = self._channel
        if timeout is not None and timeout <= 0:
            return self.done()
        deadline = None if timeout is None else time.monotonic() + timeout
        budget = ch.poll_ns if timeout is None else min(ch.poll_ns, int(timeout * 1e9))
        if budget > 0:
            status = ring_consumer.poll_status(ch._ring, self.seq, budget)
            if status is not None:
                self._settle(status)
                return True
        elif self.done():
            return True
        # Past the poll window: sleep on a gate that the worker opens.
        if sleep_on_gate(ch._gate_for(self.seq), ch, deadline, self.done):
            self._settle()
            return True
        return False

    def _settle(self, status: int | None = None) -> None:
        """Take the job's status once ``HEAD`` passed it (the acquire load that saw it orders this read), or
        ``status`` as :func:`~dmamig.backends.cpu.ring_consumer.poll_status` read it."""
        if self.finished:
            return
        ch = self._channel
        if status is None:
            status = ch._ring.status(self.seq)
        if status not in (dma_ring.STATUS_OK, dma_ring.STATUS_PENDING) and self.error is None:
            self.error = ch._failures.get(self.seq) or DmaError(f"DMA channel {ch.index} job {self.seq}: "
                                                               f"{dma_ring.status_text(status)}")
        self.finished = True

    def _finish(self, error: BaseException | None) -> None:
        """Finish this job from Python (a Python job, or one failed by a dead, broken or closed channel)."""
        if finish_once(self, error):
            if error is not None:  # what a compiled submission's own completion reports for this job
                self._channel._failures[self.seq] = error
            self._channel._retire(self.seq, dma_ring.STATUS_OK if error is None else dma_ring.STATUS_FAILED)


class PollingCpuChannel(CpuChannel):
    """A CPU DMA channel whose worker polls a doorbell ring in compiled code (see the module docstring).

    Parameters
    ----------
    index : int
        Channel number within its device.
    device : int
        The device whose channel this is.
    poll_us : float
        Microseconds of polling before the worker or a waiter sleeps (> 0).
    ring : Ring, optional
        This channel's ring in its lane's :class:`~dmamig.dma.ring.RingSet` (the backend opens a lane's channels
        over one set, so that one compiled call submits to all of them); a ring of its own by default.
    """

    #: Whether plain copies run in the compiled loop. ``False`` sends every job through the worker's Python side
    #: (``_execute``, as a subclass that customises it gets): the ring, the doorbell and the polling stay; tests
    #: that hook the copy kernels use it.
    compiled_copies = True

    def __init__(self, index: int, device: int = 0, poll_us: float = DEFAULT_POLL_US,
                 ring: dma_ring.Ring | None = None):
        self._ring = ring if ring is not None else dma_ring.RingSet(1).rings[0]
        #: The lane's rings, shared with the other channels of the lane.
        self.ring_set = self._ring.ring_set
        self._clock = np.zeros(2, dtype=np.int64)  # timespec scratch of the worker's loop
        #: Nanoseconds of polling before sleeping.
        self.poll_ns = max(1, int(float(poll_us) * 1000))
        # In-flight Python-side jobs by sequence number: (work, completion, fault, rows); the rows' array stays
        # alive until the job is done. Reaped in order as HEAD passes them. Jobs published by a compiled
        # submission have no entry: their completion reads the job's status.
        self._jobs: dict[int, tuple[list[ChannelWork], _RingCompletion, str | None, Any] | None] = {}
        self._order: collections.deque[int] = collections.deque()
        self._gates: dict[int, threading.Lock] = {}  # job -> lock its sleeping waiters wait on
        self._failures: dict[int, BaseException] = {}  # job -> why the Python side failed it (rare)
        self._bell = threading.Lock()  # the idle worker sleeps on it; a submission opens it
        self._bell.acquire()
        self._idle = False
        # A subclass that customises _execute (tests gate jobs with it) runs every job through Python.
        self._compiled = self.compiled_copies and type(self)._execute is CpuChannel._execute
        super().__init__(index, device)

    @property
    def busy_seconds(self) -> float:
        """Seconds the worker has spent copying (compiled loop and Python jobs)."""
        with self._lock:
            return self._busy + self._ring.busy_ns / 1e9

    @property
    def counters(self) -> dict[str, int]:
        """As :attr:`CpuChannel.counters`, with what compiled submissions published on this channel's ring."""
        out = super().counters
        launches, calls = self._ring.counters
        out["kernel_launches"] += launches
        out["memcpy_calls"] += calls
        return out

    @property
    def takes_rows(self) -> bool:
        """Whether compiled submissions (:meth:`~dmamig.dma.ring.RingRoute.submit`) may publish on this
        channel's ring (plain copies run in the compiled loop)."""
        return self._compiled

    def completion(self, seq: int) -> _RingCompletion:
        """The completion of job ``seq``, published on this channel's ring by a compiled submission."""
        return _RingCompletion(self, seq)

    def wake(self) -> None:
        """Wake the worker if it sleeps (a compiled submission found the ring's ``IDLE`` word set)."""
        with self._lock:
            self._ring_bell()

    def wait_for_progress(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the oldest unfinished job finishes: room in a full ring."""
        ring = self._ring
        head = ring.head
        if head < ring.tail:
            _RingCompletion(self, head).wait(timeout)

    def submit(self, work: list[ChannelWork], fault: str | None = None) -> _RingCompletion:
        """Publish ``work`` on the ring and return its completion immediately (see :meth:`CpuChannel.submit`)."""
        desc = self._rows(work) if fault is None and self._compiled else None
        counts = [(w, 1, int(w.npages.size)) for w in work] if desc is not None else []
        return self._enqueue(desc, work, fault, counts)

    def _enqueue(self, desc: np.ndarray | None, work: list[ChannelWork], fault: str | None,
                 counts: list[tuple[ChannelWork, int, int]]) -> _RingCompletion:
        if not self._thread.is_alive():
            self.revive()
        ring = self._ring
        while True:
            with self._lock:
                if self._closed:
                    raise DmaError(f"DMA channel {self.index} is closed; open a new engine to copy")
                if self._broken is not None:
                    failed = _RingCompletion(self, -1)
                    failed.error, failed.finished = DmaError(self._broken), True
                    return failed
                if len(self._order) > _REAP_AFTER:
                    self._reap()
                with self.ring_set.lock:
                    room = ring.has_room()
                    if room:
                        seq, _ = ring.publish(dma_ring.JOB_EXTERNAL if desc is not None else dma_ring.JOB_PYTHON,
                                              desc)
                if room:
                    completion = _RingCompletion(self, seq)
                    self._jobs[seq] = (work, completion, fault, desc)
                    self._order.append(seq)
                    for w, launches, calls in counts:
                        self._count(w, launches, calls)
                    self._ring_bell()
                    return completion
                self._reap()
            self.wait_for_progress(LIVENESS_PERIOD)  # the ring is full: wait for its oldest job, outside the lock

    def _rows(self, work: list[ChannelWork]) -> np.ndarray | None:
        """The job's rows, or None when a piece needs Python (staged, or buffers numba cannot take)."""
        pieces = []
        for w in work:
            src, dst = w.src_frames, w.dst_frames
            if w.staged or type(src) is not np.ndarray or type(dst) is not np.ndarray \
                    or not (src.flags.c_contiguous and dst.flags.c_contiguous) or src.dtype != np.uint8 \
                    or dst.dtype != np.uint8 or src.ndim != 2 or dst.ndim != 2:
                return None
            pieces.append((src, dst, _runs(w.src_start), _runs(w.dst_start), _runs(w.npages)))
        for src, dst, *_ in pieces:  # rows may only touch registered memory: these frames are
            self.ring_set.register_frames(src)
            self.ring_set.register_frames(dst)
        return dma_ring.external_rows(pieces)

    def _ring_bell(self) -> None:
        # The caller holds self._lock, under which the worker decides to sleep: no lost wake-up.
        if self._idle:
            self._idle = False
            self._ring.set_idle(False)
            self._bell.release()

    def _reap(self) -> None:
        """Forget Python-side jobs that are done (the caller holds self._lock)."""
        head = self._ring.head
        while self._order and self._order[0] < head:
            del self._jobs[self._order.popleft()]

    def _gate_for(self, seq: int) -> threading.Lock:
        """Register a sleeping waiter of job ``seq``; returns the lock the worker releases when it is done."""
        with self._lock:
            gate = self._gates.get(seq)
            if gate is None:
                gate = self._gates[seq] = threading.Lock()
                gate.acquire()
            head = self._ring.announce_sleepers(len(self._gates))
        if head > seq:  # finished while we registered: the worker may not have seen us
            self._open_gates()
        return gate

    def _open_gates(self) -> None:
        """Wake the sleeping waiters of every finished job."""
        with self._lock:
            head = self._ring.head
            opened = [self._gates.pop(s) for s in [s for s in self._gates if s < head]]
            if opened:
                self._ring.announce_sleepers(len(self._gates))
        for gate in opened:
            gate.release()

    def _retire(self, seq: int, status: int = dma_ring.STATUS_OK) -> None:
        """Finish job ``seq`` (and any unfinished before it) from Python with ``status``, and wake its waiters."""
        with self._lock:
            if self._ring.head <= seq:
                self._ring.finish(seq + 1, status)
        self._open_gates()

    def _loop(self) -> None:
        ring = self._ring
        while True:
            why = ring_consumer.serve(ring, self.poll_ns, self._clock)
            if why == ring_consumer.SERVE_WAKE:
                self._open_gates()
            elif why == ring_consumer.SERVE_IDLE:
                with self._lock:
                    if ring.tail != ring.head:
                        continue
                    if self._closed:  # closed with nothing left (a full ring had no slot for the stop request)
                        return
                    self._idle = True
                    # The consumer's half of the hand-shake: a compiled submission that published meanwhile
                    # either sees IDLE (and wakes us) or is seen here.
                    if ring.set_idle(True) != ring.head:
                        self._idle = False
                        ring.set_idle(False)
                        continue
                self._bell.acquire()
            else:  # a job for Python at the head
                seq = ring.head
                with self._lock:
                    item = self._jobs.get(seq)
                if item is None:  # the stop request
                    self._retire(seq)
                    return
                work, completion, fault, _ = item
                self._run_job(work, completion, fault)

    def _queue_empty(self) -> bool:
        return self._ring.head >= self._ring.tail

    def _enqueue_stop(self) -> None:
        # The caller holds self._lock. A full ring has no slot for the stop request: the worker then stops when it
        # finds the ring empty and the channel closed.
        with self.ring_set.lock:
            if self._ring.has_room():
                seq, _ = self._ring.publish(dma_ring.JOB_PYTHON)
                self._jobs[seq] = None
                self._order.append(seq)
        self._ring_bell()

    def _drain(self) -> list[_RingCompletion]:
        # The caller holds self._lock (revive) or the worker has stopped (close): the jobs not yet run, in order.
        # A compiled submission's job has no entry: a completion of its own carries its failure onto the ring.
        ring = self._ring
        out = []
        for seq in range(ring.head, ring.tail):
            if seq not in self._jobs:
                out.append(_RingCompletion(self, seq))
            elif self._jobs[seq] is not None:
                out.append(self._jobs[seq][1])
        if not out:
            ring.finish(ring.tail, dma_ring.STATUS_FAILED)
        return out
