"""The CUDA consumer of one device's DMA channel rings (:mod:`dmamig.dma.ring`): one kernel launch per submission.

A :class:`CudaRingLane` holds the lane's :class:`~dmamig.dma.ring.RingSet` in pinned host memory mapped for the
device, one non-blocking stream, a device-memory counter per channel and the ``ring_copy`` kernel
(``kernels/ring_copy.cu``). The engine's compiled submission writes every channel's rows and publishes them;
the ring set then calls :meth:`CudaRingLane.launch`: the current device is set once and one pre-packed launch
of ``ring_copy`` copies that submission's job on every channel, validating each row against the registered
memory first. The kernel publishes each job's status and the ring's ``HEAD`` in the mapped memory, so a
waiter (:class:`RingJob`) polls one word in host memory: no event is created, recorded or destroyed.

Failure: a bad row is the job's status (``STATUS_BAD_ROW``), never an illegal address. A waiter that sees no
progress asks the stream (``cudaStreamQuery``): a CUDA error there fails the lane (every job published and
every later one), and so does a stream that went idle without publishing its job, or one that makes no progress
for :data:`STALL_S`. Pinned rings and counters are freed by :meth:`CudaRingLane.close`, after the stream has
finished: never by a finalizer while the device may still read them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...dma import ring as dma_ring
from ...errors import DmaError
from ..cpu.ring_consumer import RING_AVAILABLE as POLL_AVAILABLE
from ..cpu.ring_consumer import poll_status
from .codes import (
    CUDA_ERROR_NOT_READY,
    CUDA_SUCCESS,
    collect_first_error,
    cuda_error_text,
    is_sticky,
    stream_status,
)
from .memory import pinned_words

__all__ = ["BLOCKS_PER_CHANNEL", "MAX_RING_CHANNELS", "STALL_S", "CudaRingLane", "RingJob"]

#: Channels one launch of ``ring_copy`` serves (its ``seq0..seq7`` arguments); wider lanes take the stream path.
MAX_RING_CHANNELS = 8
#: Blocks per channel in a launch: enough to keep a copy engine's worth of bandwidth, few enough to start fast.
BLOCKS_PER_CHANNEL = 16
#: Threads per block.
RING_THREADS = 256
#: Seconds a waiter sees no progress on a busy stream before it declares the lane stalled.
STALL_S = 60.0


class RingJob:
    """Completion of job ``seq`` on channel ring ``ring`` of a CUDA lane: done once the ring's ``HEAD`` passed it.

    Waits poll the mapped ``HEAD`` word for the lane's poll window, then sleep with a growing back-off, asking
    the stream for errors between naps; every wait is bounded.
    """

    __slots__ = ("_done", "_lane", "_ring", "error", "seq")

    def __init__(self, lane: CudaRingLane, ring: dma_ring.Ring, seq: int) -> None:
        self._lane = lane
        self._ring = ring
        self.seq = seq
        self._done = False
        self.error: BaseException | None = None

    def done(self) -> bool:
        if self._done:
            return True
        if self._ring.head > self.seq:
            self._settle()
            return True
        if self._lane.failure is not None:
            self._fail(self._lane.failure)
            return True
        return False

    def wait(self, timeout: float | None = None) -> bool:
        if self._done:
            return True
        lane = self._lane
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        budget = lane.poll_ns if timeout is None else min(lane.poll_ns, int(max(0.0, timeout) * 1e9))
        if budget > 0 and POLL_AVAILABLE and lane.failure is None:
            status = poll_status(self._ring, self.seq, budget)
            if status is not None:
                self._settle(status)
                return True
        if self.done():
            return True
        delay = 50e-6
        last_progress, last_head = time.monotonic(), self._ring.head
        while not self.done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            head = self._ring.head
            if head != last_head:
                last_progress, last_head = now, head
            elif now - last_progress >= STALL_S:
                lane.fail(DmaError(f"DMA ring of device {lane.device}: no job finished for {STALL_S:g} s; the "
                                   f"consumer is stalled"))
                continue
            lane.check_stream(self._ring, self.seq)
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 2e-3)
        return True

    def _settle(self, status: int | None = None) -> None:
        if status is None:
            status = self._ring.status(self.seq)
        if status not in (dma_ring.STATUS_OK, dma_ring.STATUS_PENDING) and self.error is None:
            self.error = self._lane.failure or DmaError(
                f"DMA channel {self._ring.index} of device {self._lane.device}, job {self.seq}: "
                f"{dma_ring.status_text(status)}")
        self._done = True

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._done = True


class CudaRingLane:
    """One device's rings, stream, counters and ``ring_copy`` launch (see the module docstring).

    Parameters
    ----------
    cp : module
        cupy (or a stand-in offering the same names).
    device : int
        The device whose copy engine this lane models.
    channels : int
        Channels of the lane (1 to :data:`MAX_RING_CHANNELS`).
    kernel : callable
        The compiled ``ring_copy`` kernel of ``device``.
    poll_us : float
        Microseconds a waiter polls ``HEAD`` before it sleeps.
    """

    def __init__(self, cp: Any, device: int, channels: int, kernel: Any, poll_us: float,
                 on_sticky: Callable[[int, BaseException], None] | None = None) -> None:
        if not 1 <= int(channels) <= MAX_RING_CHANNELS:
            raise ValueError(f"a CUDA ring lane serves 1 to {MAX_RING_CHANNELS} channels, got {channels}")
        self._cp, self._rt = cp, cp.cuda.runtime
        self.device = int(device)
        self.poll_ns = max(0, int(float(poll_us) * 1000))
        self._kernel = kernel
        self._pinned: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        #: Why the lane failed (a CUDA error, a stalled or silent consumer); its jobs fail with it.
        self.failure: BaseException | None = None
        #: Kernel launches so far.
        self.launches = 0
        #: Told ``(device, error)`` when the lane meets a sticky CUDA error: the context is unusable from then on.
        self.on_sticky = on_sticky
        self.rings = dma_ring.RingSet(int(channels), alloc=self._alloc)
        with cp.cuda.Device(self.device):
            self.stream = cp.cuda.Stream(non_blocking=True)
            self._done = int(self._rt.malloc(4 * MAX_RING_CHANNELS))
            self._rt.memset(self._done, 0, 4 * MAX_RING_CHANNELS)
        rs = self.rings
        self._args = (np.uint64(rs.ctl.ctypes.data), np.uint64(rs.rows.ctypes.data), np.uint64(rs.jobs.ctypes.data),
                      np.uint64(rs.regions.ctypes.data), np.uint64(self._done))
        self._tail = (np.int32(rs.channels), np.int64(rs.rows.shape[1]), np.int64(rs.jobs.shape[1]),
                      np.int32(rs.ctl.shape[1]), np.int32(BLOCKS_PER_CHANNEL))
        self._grid = (rs.channels * BLOCKS_PER_CHANNEL,)
        self._no_job = (-1,) * (MAX_RING_CHANNELS - rs.channels)
        # Made once: launches run one at a time, under the ring set's lock, so one context object serves them all.
        self._device_scope = cp.cuda.Device(self.device)
        rs.consumer = self.launch

    def _alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        return pinned_words(self._rt, shape, self._pinned)

    def launch(self, jobs: list[list[int]]) -> None:
        """Run one submission's jobs (``[seq, _]`` per channel, ``seq`` -1 for none): one launch on the lane's
        stream, the device set once. Called by the ring set under its lock, right after publishing.

        A launch that fails fails those jobs and the lane (a CUDA error here is sticky).
        """
        if self.failure is not None:
            self.rings.fail_unfinished(jobs)
            return
        # The sequence numbers go as Python ints: a kernel argument that is an int is passed as a 64-bit one
        # (long long seq0..seq7).
        seqs = tuple([j[0] for j in jobs])
        try:
            with self._device_scope, self.stream:
                self._kernel(self._grid, (RING_THREADS,), self._args + seqs + self._no_job + self._tail)
            self.launches += 1
        except Exception as exc:
            err = DmaError(f"DMA ring of device {self.device}: launching the ring_copy kernel failed: "
                           f"{type(exc).__name__}: {exc}")
            err.__cause__ = exc
            self.fail(err)
            self.rings.fail_unfinished(jobs)
            if is_sticky(getattr(exc, "status", None)) and self.on_sticky is not None:
                self.on_sticky(self.device, err)

    def job(self, channel: int, seq: int) -> RingJob:
        """The completion of job ``seq`` on ``channel``'s ring."""
        return RingJob(self, self.rings.rings[channel], seq)

    def fail(self, error: BaseException) -> None:
        """Fail the lane: its unfinished jobs and every later one fail with ``error`` (kept in :attr:`failure`)."""
        with self._lock:
            if self.failure is None:
                self.failure = error

    def check_stream(self, ring: dma_ring.Ring, seq: int) -> None:
        """Ask the stream how it is doing (job ``seq`` of ``ring`` is not done): a CUDA error, or a stream that
        went idle without publishing the job, fails the lane."""
        code = stream_status(self._rt, self.stream)
        if code == CUDA_ERROR_NOT_READY:
            return
        if code == CUDA_SUCCESS:
            if ring.head <= seq:  # idle, and the job's HEAD never came (the stream is done: its writes are visible)
                self.fail(DmaError(f"DMA ring of device {self.device}: the consumer finished without publishing "
                                   f"job {seq} of channel {ring.index}"))
            return
        err = DmaError(f"DMA ring of device {self.device}: the stream reported {cuda_error_text(code, self._rt)}; "
                       f"its jobs did not complete")
        self.fail(err)
        if is_sticky(code) and self.on_sticky is not None:
            self.on_sticky(self.device, err)

    def close(self) -> None:
        """Wait for the stream (bounded by what it has queued), then free the counters and the pinned rings.
        Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._cp.cuda.Device(self.device):
            err = collect_first_error([self.stream.synchronize])
            if err is not None:
                self.fail(err if isinstance(err, DmaError) else DmaError(str(err)))
            collect_first_error([lambda: self._rt.free(self._done)])
        # The stream is done: nothing on the device reads the rings any more. Completions and counters may still
        # read them from the host, so the arrays move to memory of their own before the pinned memory goes.
        self.rings.consumer = None
        self.rings.detach()
        collect_first_error([lambda p=p: self._rt.freeHost(p) for p in self._pinned])
        self._pinned = []
