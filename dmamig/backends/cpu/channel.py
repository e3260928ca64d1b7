"""The CPU backend's DMA channels: each channel is one long-lived worker thread fed by a queue.

The worker runs the compiled GIL-free copy kernels of :mod:`dmamig.backends.cpu.copy_loops`, so a copy truly
overlaps the thread that submitted it. A job's completion is a lock its waiters sleep on, waking now and then to
check that the worker is still alive: a worker that dies (an injected ``channel_crash``, or any error outside a
job) fails the job it held, and the channel starts a new worker or, after repeated deaths, declares itself
broken. :class:`~dmamig.backends.cpu.CpuBackend` opens these channels.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

from ...dma.channel import CHANNEL_COUNTERS, ChannelWork, route_counts
from ...dma.copy_plan import METHOD_GATHER
from ...dma.staging import stage_capacity
from ...errors import DmaError
from . import copy_loops

__all__ = ["ChannelCrash", "CpuChannel"]

#: How often a sleeping waiter wakes to check that the channel's worker is still alive (seconds). A healthy
#: completion wakes its waiters at once; this only bounds how long a dead worker can go unnoticed.
LIVENESS_PERIOD = 0.05
#: A channel whose worker dies this many times in a row without holding a job (so without the queue moving
#: on) is broken: its shares fail at once instead of waiting for a worker that cannot run them.
MAX_CONSECUTIVE_DEATHS = 3
#: Seconds ``close`` waits for a worker to finish its queue and stop.
CLOSE_TIMEOUT = 60.0


class ChannelCrash(BaseException):
    """Raised inside a channel worker by an injected ``channel_crash`` fault: the worker thread dies.

    A BaseException, like the errors that really kill threads (MemoryError aside, SystemExit and friends),
    so that it escapes the per-job error handling.
    """


#: Serialises the finishing of completions: a worker, a revival and a close may each try to finish one.
_FINISH = threading.Lock()


def finish_once(completion: Any, error: BaseException | None) -> bool:
    """Record ``error`` and mark ``completion`` done (its ``finished``) unless it is already; ``True`` for the
    call that did it (a worker, a revival and a close may each try)."""
    with _FINISH:
        if completion.finished:
            return False
        completion.error = error
        completion.finished = True
    return True


def sleep_on_gate(gate: threading.Lock, channel: CpuChannel, deadline: float | None, done: Any) -> bool:
    """Sleep on a job's ``gate`` until it opens (``True``) or ``deadline`` (``time.monotonic``) passes (then
    ``done()``), waking every LIVENESS_PERIOD to look at the worker: a dead worker never opens the gate, and
    its channel's revival fails (or restarts) what it held."""
    while True:
        period = LIVENESS_PERIOD if deadline is None else min(LIVENESS_PERIOD, max(0.0, deadline - time.monotonic()))
        if gate.acquire(timeout=period):
            gate.release()  # open for the next waiter too
            return True
        channel.revive()
        if deadline is not None and time.monotonic() >= deadline:
            return done()


class _ThreadCompletion:
    """Completion of one channel job: a lock held until the job finishes, plus the error it raised, if any.

    A bare lock rather than a :class:`threading.Event`: the job's hand-off to its waiter is on every DMA
    submission's path, and an Event (a condition variable with a waiter list) costs several times as much.
    """

    __slots__ = ("_channel", "_gate", "error", "finished")

    def __init__(self, channel: CpuChannel) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()  # released once, by _finish; waiters pass through it one after the other
        self.finished = False
        self._channel = channel
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.finished

    def wait(self, timeout: float | None = None) -> bool:
        if self.finished:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        return sleep_on_gate(self._gate, self._channel, deadline, self.done)

    def _finish(self, error: BaseException | None) -> None:
        if finish_once(self, error):
            self._gate.release()


class CpuChannel:
    """One DMA channel of the CPU backend: a worker thread executing queued work in order.

    Channels belong to one device (as a GPU's copy engines do): the engine gives each device its own set, so
    copies towards different devices run on different workers, concurrently. A copy between two devices
    without peer access is staged through the channel's own host bounce buffer: copied into it, then out of it.

    A worker that dies (an injected ``channel_crash``, or any error outside a job) fails the job it held with
    a :class:`~dmamig.errors.DmaError`; the next ``submit`` or a waiter notices the dead thread and starts a
    new worker, which runs the jobs still queued. A worker that keeps dying makes the channel *broken*: its
    shares then fail at once with a DmaError that says why.

    Parameters
    ----------
    index : int
        Channel number within its device (names the thread, ``dmamig-dma<index>``, plus ``-dev<device>`` for
        devices other than 0).
    device : int
        The device whose channel this is.
    """

    #: The engine may pass ``fault=`` to :meth:`submit` (faults happen inside the worker).
    injects_faults = True

    def __init__(self, index: int, device: int = 0):
        self.index = int(index)
        self.device = int(device)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0.0
        self._counters = dict.fromkeys(CHANNEL_COUNTERS, 0)
        self._bounce: np.ndarray | None = None  # the staging buffer, made on the first staged copy
        self._closed = False
        self._current: _ThreadCompletion | None = None
        self._death: BaseException | None = None
        self._death_held_job = False
        self._deaths_in_a_row = 0
        self._broken: str | None = None
        #: Workers started again after they died.
        self.restarts = 0
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        name = f"dmamig-dma{self.index}" + (f"-dev{self.device}" if self.device else "")
        t = threading.Thread(target=self._main, name=name, daemon=True)
        t.start()
        return t

    @property
    def busy_seconds(self) -> float:
        """Seconds the worker has spent inside copy kernels."""
        with self._lock:
            return self._busy

    @property
    def counters(self) -> dict[str, int]:
        """Calls issued so far: ``kernel_launches`` (gather segments), ``memcpy_calls`` (long runs), and the
        device-to-device runs and bytes copied directly (``peer_*``) or through host memory (``staged_*``)."""
        with self._lock:
            return dict(self._counters)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread.is_alive()

    def submit(self, work: list[ChannelWork], fault: str | None = None) -> _ThreadCompletion:
        """Queue ``work`` for the worker and return its completion immediately.

        Parameters
        ----------
        work : list of ChannelWork
            Runs to copy, in order.
        fault : {None, "copy", "complete", "crash"}
            An injected fault for this job: fail half way through the copy, report an error after a full
            copy, or kill the worker thread while it holds the job.
        """
        self.revive()
        completion = _ThreadCompletion(self)
        with self._lock:
            if self._closed:
                raise DmaError(f"DMA channel {self.index} is closed; open a new engine to copy")
            if self._broken is not None:
                completion._finish(DmaError(self._broken))
                return completion
            self._queue.put((work, completion, fault))
        return completion

    def revive(self) -> None:
        """If the worker died, fail the job it held and start a new worker for the queued ones.

        Called by ``submit`` and by waiters; cheap when the worker is alive.
        """
        if self._thread.is_alive():
            return
        with self._lock:
            if self._thread.is_alive() or self._closed and self._queue_empty():
                return
            held, self._current = self._current, None
            death, self._death = self._death, None
            cause = f"{type(death).__name__}: {death}" if death is not None else "it exited"
            # A death that held a job moved the queue on (that job failed); one that held none did not.
            moved_on = held is not None or self._death_held_job
            self._death_held_job = False
            self._deaths_in_a_row = 0 if moved_on else self._deaths_in_a_row + 1
            if self._deaths_in_a_row >= MAX_CONSECUTIVE_DEATHS and self._broken is None:
                self._broken = (f"DMA channel {self.index} is broken: its worker thread died "
                                f"{self._deaths_in_a_row} times in a row (last: {cause})")
            if self._broken is None:
                self.restarts += 1
                self._thread = self._start()
            else:
                drained = self._drain()
        if held is not None:
            held._finish(DmaError(f"DMA channel {self.index}'s worker thread died while copying ({cause}); "
                                  f"the channel was restarted"))
        if self._broken is not None:
            for c in drained:
                c._finish(DmaError(self._broken))

    def _drain(self) -> list[_ThreadCompletion]:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is not None:
                out.append(item[1])

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the worker dies: keep the cause and fail the job it held at once
            with self._lock:
                self._death = exc
                held, self._current = self._current, None
                self._death_held_job = held is not None
            if held is not None:
                held._finish(DmaError(f"DMA channel {self.index}'s worker thread died while copying "
                                      f"({type(exc).__name__}: {exc}); the channel restarts on its next use"))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run_job(*item)

    def _run_job(self, work: list[ChannelWork], completion: Any, fault: str | None) -> None:
        """Run one job on the worker thread and finish its completion (a crash fault kills the thread)."""
        with self._lock:
            self._current = completion
        if fault == "crash":
            raise ChannelCrash(f"injected channel_crash fault on DMA channel {self.index}")
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            if fault is None:
                self._execute(work)
            else:
                self._execute(work, fault)
        except Exception as exc:  # reported through the fence, never lost in the worker
            error = exc
        elapsed = time.perf_counter() - start
        with self._lock:
            self._busy += elapsed
            self._current = None
            self._deaths_in_a_row = 0
        completion._finish(error)

    def _execute(self, work: list[ChannelWork], fault: str | None = None) -> None:
        """Run one job on the worker thread (GIL released inside the kernels)."""
        if fault == "copy":
            # A channel that fails mid-copy: about half of the job's runs land, then the error.
            total = sum(int(w.npages.size) for w in work)
            keep = total // 2
            cut = []
            for w in work:
                k = min(keep, int(w.npages.size))
                keep -= k
                if k:
                    cut.append(dataclasses.replace(w, src_start=w.src_start[:k], dst_start=w.dst_start[:k],
                                                   npages=w.npages[:k]))
            self._execute(cut)
            raise DmaError(f"injected dma_copy fault: DMA channel {self.index} failed mid-copy after "
                           f"{sum(int(w.npages.size) for w in cut)} of {total} runs")
        for w in work:
            if w.staged:
                chunks, pieces = copy_loops.copy_runs_staged(w.src_frames, w.dst_frames, self._bounce_for(w),
                                                               w.src_start, w.dst_start, w.npages)
                launches, calls = 2 * chunks, 2 * pieces
            else:
                copy_loops.copy_runs_stream(w.src_frames, w.dst_frames, w.src_start, w.dst_start, w.npages)
                launches, calls = 1, int(w.npages.size)
            with self._lock:
                self._count(w, launches, calls)
        if fault == "complete":
            raise DmaError(f"injected dma_complete fault: DMA channel {self.index} copied its share but "
                           f"reported an error on completion")

    def _count(self, w: ChannelWork, launches: int, calls: int) -> None:
        # Bookkeeping mirrors what a GPU channel issues: one call per long run, one launch per segment of short
        # runs; staged, one of each per bounce-buffer chunk into the buffer and one out of it. The CPU kernel
        # copies both kinds in the same loop. The caller holds self._lock.
        if w.method == METHOD_GATHER:
            self._counters["kernel_launches"] += launches
        else:
            self._counters["memcpy_calls"] += calls
        for key, n in route_counts(w).items():
            self._counters[key] += n

    def _queue_empty(self) -> bool:
        return self._queue.empty()

    def _enqueue_stop(self) -> None:
        self._queue.put(None)  # the caller holds self._lock

    def _bounce_for(self, w: ChannelWork) -> np.ndarray:
        """This channel's bounce buffer for pages of ``w``'s size (only the worker thread uses it)."""
        page = int(w.src_frames.shape[1])
        b = self._bounce
        if b is None or b.shape != (stage_capacity(page), page):
            b = self._bounce = copy_loops.aligned_zeros(stage_capacity(page), page)
        return b

    def close(self) -> None:
        """Let queued work finish, then stop the worker. Idempotent.

        Raises
        ------
        DmaError
            The worker did not stop within ``CLOSE_TIMEOUT`` seconds (its stack is in the message).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._enqueue_stop()
        if threading.current_thread() is self._thread:
            return
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            self.revive()  # a dead worker is replaced so that what is queued still runs (or fails)
            t = self._thread
            t.join(min(LIVENESS_PERIOD * 4, max(0.0, deadline - time.monotonic())))
            if not t.is_alive() and t is self._thread and (self._queue_empty() or self._broken):
                break
            if time.monotonic() >= deadline:
                raise DmaError(f"DMA channel {self.index}'s worker thread did not stop within "
                               f"{CLOSE_TIMEOUT:g} s:\n{_stack_of(t)}")
        for c in self._drain():
            c._finish(DmaError(f"DMA channel {self.index} was closed before this job ran"))


def _stack_of(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(no stack: the thread is gone)"
