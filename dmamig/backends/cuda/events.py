"""Completions of channel work: ``cudaEventQuery`` results, the bounded ring of timing events each channel
keeps, and the completion that the engine polls or waits on.

An event's state is read with ``cudaEventQuery`` directly: ``cudaSuccess`` is done, ``cudaErrorNotReady``
pending, and any other code is a CUDA error, turned into a :class:`~dmamig.errors.DmaError` that names it
(CuPy's ``Event.done`` would report such an event as forever pending).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import DmaError, InvalidArgument
from .codes import CUDA_ERROR_NOT_READY, CUDA_SUCCESS, collect_first_error, cuda_error_text, map_cuda_error

if TYPE_CHECKING:
    from .channels import CudaChannel

__all__ = ["CudaCompletion", "PendingRing", "TIMING_RING", "event_finished"]

#: Completions per channel whose timing events may wait to be read; the oldest is folded in beyond that.
TIMING_RING = 64


def event_finished(code: int, runtime: Any = None, what: str = "a DMA completion event") -> bool:
    """Interpret one ``cudaEventQuery`` result.

    Parameters
    ----------
    code : int
        What ``cudaEventQuery`` returned.
    runtime : module, optional
        ``cupy.cuda.runtime``, used to name an error.
    what : str
        What the event marks, for the error message.

    Returns
    -------
    bool
        ``True`` for ``cudaSuccess`` (the work before the event finished), ``False`` for ``cudaErrorNotReady``.

    Raises
    ------
    DmaError
        Any other code: the work failed (e.g. an illegal address); the message names the CUDA error.
    """
    code = int(code)
    if code == CUDA_SUCCESS:
        return True
    if code == CUDA_ERROR_NOT_READY:
        return False
    err = DmaError(f"{what} reported {cuda_error_text(code, runtime)}; the copies before it did not complete")
    err.cuda_status = code
    raise err


class PendingRing:
    """A bounded first-in first-out list of items still to be settled (the channels' timing events).

    Parameters
    ----------
    capacity : int
        Most items held; :meth:`push` hands back the oldest ones beyond it for the caller to settle now.
    """

    def __init__(self, capacity: int):
        if int(capacity) < 1:
            raise InvalidArgument(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self._items: deque[Any] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Any) -> list[Any]:
        """Add ``item``; return the oldest items that no longer fit (settle them before going on)."""
        self._items.append(item)
        over = []
        while len(self._items) > self.capacity:
            over.append(self._items.popleft())
        return over

    def pop_ready(self, ready: Callable[[Any], bool]) -> list[Any]:
        """Remove and return every item for which ``ready(item)`` is true, keeping the others in order."""
        done, keep = [], deque()
        for item in self._items:
            (done if ready(item) else keep).append(item)
        self._items = keep
        return done

    def drain(self) -> list[Any]:
        """Remove and return every item."""
        items = list(self._items)
        self._items.clear()
        return items


class CudaCompletion:
    """Completion of one channel job: an end event per device it used, plus that device's timing start event.

    The events are queried with ``cudaEventQuery`` (0 done, ``cudaErrorNotReady`` pending, anything else an
    error). Once every event has finished, the job's GPU time is folded into the channel's busy time (not for a
    failed job) and the events are destroyed, so finished jobs hold no CUDA resources.
    """

    def __init__(self, channel: CudaChannel, ends: list[Any], starts: list[Any], error: BaseException | None):
        self._channel = channel
        self._rt = channel.runtime
        self._pending = list(ends)  # end events not yet seen finished
        self._ends = list(ends)
        self._starts = list(starts)
        self._lock = threading.Lock()
        self._waiters = 0  # threads inside eventSynchronize: events are destroyed only after they return
        self._settled = False
        self.error = error

    def _note(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc if isinstance(exc, DmaError) else map_cuda_error(exc, "waiting for a DMA channel")

    def _poll(self) -> bool:
        """Query every pending event (never blocks); ``True`` once none is pending."""
        with self._lock:
            still = []
            for ev in self._pending:
                try:
                    if not event_finished(self._rt.eventQuery(ev), self._rt):
                        still.append(ev)
                except Exception as exc:  # this event's work failed: it has stopped, keep the first error
                    self._note(exc)
            self._pending = still
            return not still

    def done(self) -> bool:
        """Whether every stream of the job has finished (successfully or not). Never blocks."""
        if self._settled:
            return True
        finished = self._poll()
        if finished:
            self._settle()
        return finished

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every stream of the job has stopped; ``True`` when they have, ``False`` on timeout.

        Errors never stop the wait early: each device's event is waited for, the first error is kept in
        ``error``, so a caller may free the destination frames once this returns ``True``.
        """
        if self._settled:
            return True
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        # First poll the events for the channel's poll window, as dma_sync_wait() polls a copy engine: a
        # blocking-sync event costs an OS wake-up on completion, several times a short copy on some hosts.
        poll_s = self._channel.poll_us / 1e6
        if timeout is not None:
            poll_s = min(poll_s, max(0.0, float(timeout)))
        if poll_s > 0:
            end = time.perf_counter() + poll_s
            while not self._poll():
                if time.perf_counter() >= end:
                    break
            else:
                self._settle()
                return True
        if timeout is None:
            err: BaseException | None = None
            with self._lock:
                pending = list(self._pending)
                self._waiters += 1
            try:
                # Every event, even after one failed: other devices may still be writing destination frames.
                err = collect_first_error([lambda ev=ev: self._rt.eventSynchronize(ev) for ev in pending])
            finally:
                with self._lock:
                    self._waiters -= 1
                    if err is not None:
                        self._note(err)
                    self._pending = []
            self._settle()
            return True
        delay = 50e-6
        while not self._poll():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))  # sleeping back-off, never a busy spin
            delay = min(delay * 2, 2e-3)
        self._settle()
        return True

    def _settle(self) -> None:
        """Fold the job's GPU time into the channel (successful jobs only) and destroy its events, once."""
        with self._lock:
            if self._settled or self._pending or self._waiters:
                return
            self._settled = True
            ends, starts = self._ends, self._starts
            self._ends, self._starts = [], []
        seconds = 0.0
        if self.error is None:
            try:
                seconds = sum(self._rt.eventElapsedTime(s, e) for s, e in zip(starts, ends)) / 1e3
            except Exception:  # timing is best effort; the copy itself succeeded
                seconds = 0.0
        for ev in starts + ends:
            try:
                self._rt.eventDestroy(ev)
            except Exception:  # a sticky context error: the driver reclaims it with the context
                pass
        self._channel.add_busy(seconds)
