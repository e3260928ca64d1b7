"""Fences of DMA submissions, and the completions the engine makes itself (refused or faulted shares).

A :class:`Fence` gathers the completions of one submission's channel shares. Waiting is bounded wherever it
could otherwise hang: the CPU backend's completions wake periodically to check that their worker thread is
still alive, so a dead channel turns into a :class:`~dmamig.errors.DmaError` instead of a hang.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import DmaError, InvalidArgument
from .channel import Completion

__all__ = ["FailedCompletion", "Fence", "FaultedCompletion", "check_timeout"]


def check_timeout(timeout: Any) -> float | None:
    """``timeout`` as seconds (``None`` = no limit); InvalidArgument unless a number >= 0 or None."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)) \
            or math.isnan(timeout) or timeout < 0:
        raise InvalidArgument(f"timeout must be a number of seconds >= 0, or None to wait until done; "
                              f"got {timeout!r}")
    return float(timeout)


class FailedCompletion:
    """A share that never ran (its submission was refused): done at once, with ``error`` set."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error: BaseException | None = error

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True


class FaultedCompletion:
    """A share that runs (possibly cut short) but whose completion reports ``error`` once it has stopped.

    Used where a backend's channel cannot inject a fault in its own worker (CUDA streams).
    """

    __slots__ = ("_error", "_inner")

    def __init__(self, inner: Completion, error: BaseException):
        self._inner = inner
        self._error = error

    @property
    def error(self) -> BaseException | None:
        return self._inner.error or self._error if self._inner.done() else self._inner.error

    def done(self) -> bool:
        return self._inner.done()

    def wait(self, timeout: float | None = None) -> bool:
        return self._inner.wait(timeout)


class Fence:
    """Completion of one :meth:`~dmamig.dma.engine.DmaEngine.copy` submission.

    ``done`` polls; ``wait`` blocks (sleeping, never spinning) until every channel finished its share. A failed
    submission raises :class:`~dmamig.errors.DmaError` from every ``wait`` once all of its work has stopped, so
    a caller that catches the error may free the destination frames at once.
    """

    __slots__ = ("_completions", "_error", "_failed", "_jobs", "_on_failure", "_share_runs", "submission")

    def __init__(self, completions: list[Any] | None, error: DmaError | None = None,
                 on_failure: Callable[[], None] | None = None, submission: int = 0,
                 share_runs: list[list[tuple[int, Any, Any]]] | None = None,
                 jobs: tuple[list[Any], list[list[int]]] | None = None):
        # ``None`` with ``jobs``: made from them when first needed (a submission's host time stays short; a
        # waiter makes them while the copy runs).
        self._completions = completions
        # (channels, per channel [seq, _]): the ring jobs of a compiled submission, seq -1 where a channel has none.
        self._jobs = jobs
        # Per completion, the destination runs (node base pfn, dst_start, npages) of that channel's share.
        self._share_runs = share_runs
        self._error = error
        # Told once when a channel's failure is first seen (the engine counts it; failures known at submission
        # were counted there).
        self._on_failure = on_failure
        self._failed: DmaError | None = None
        #: Sequence number of the submission (1-based; 0 for an empty one).
        self.submission = submission

    def _shares(self) -> list[Any]:
        """The completions, made from the ring jobs on first use."""
        got = self._completions
        if got is None:
            channels, jobs = self._jobs
            got = self._completions = [ch.completion(seq) for ch, (seq, _) in zip(channels, jobs) if seq >= 0]
        return got

    @property
    def completions(self) -> tuple[Any, ...]:
        """One completion per channel share (each with ``done()``, ``wait(timeout)`` and ``error``)."""
        return tuple(self._shares())

    @property
    def done(self) -> bool:
        """Whether the submission has finished, successfully or not. Never blocks."""
        return all(c.done() for c in self._shares())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the submission to finish.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most; ``None`` waits until the work has stopped. Even then the wait cannot
            hang on a dead channel: the channel's death fails the share.

        Returns
        -------
        bool
            ``True`` when the submission completed, ``False`` when ``timeout`` expired first.

        Raises
        ------
        DmaError
            The submission failed (an injected fault, a channel error or a dead channel). Raised by every
            ``wait`` call on this fence, after all of its channels have stopped.
        InvalidArgument
            ``timeout`` is not a number >= 0 or None.
        """
        shares = self._shares()
        if timeout is None:  # the usual wait, without a deadline to keep
            for c in shares:
                if not c.wait(None):
                    return False
        else:
            deadline = time.monotonic() + check_timeout(timeout)
            for c in shares:
                if not c.wait(max(0.0, deadline - time.monotonic())):
                    return False
        failure = self._failure()
        if failure is not None:
            raise failure
        return True

    def failed_pages(self) -> np.ndarray | None:
        """Destination pfns of the channel shares that failed, once the fence is done.

        Every other destination page was copied. ``None`` when the engine did not record its shares (then
        any destination may be affected). Partial copies count whole: a share that failed half way lists all
        of its pages.
        """
        if self._share_runs is None or len(self._share_runs) != len(self._shares()):
            return None
        out = []
        for c, runs in zip(self._shares(), self._share_runs):
            if c.done() and c.error is not None:
                for base, start, npages in runs:
                    total = int(np.sum(npages))
                    offset = np.arange(total) - np.repeat(np.cumsum(npages) - npages, npages)
                    out.append(base + np.repeat(start, npages) + offset)
        return np.concatenate(out).astype(np.int64) if out else np.empty(0, dtype=np.int64)

    def _failure(self) -> DmaError | None:
        if self._failed is None:
            if self._error is not None:
                self._failed = self._error  # known at submission, and counted there
            else:
                for i, c in enumerate(self._shares()):
                    if c.error is not None:
                        self._failed = DmaError(f"DMA submission #{self.submission} failed on a channel "
                                                f"(share {i}): {type(c.error).__name__}: {c.error}")
                        self._failed.__cause__ = c.error
                        if self._on_failure is not None:  # told once: the failure is kept from now on
                            self._on_failure()
                        break
        return self._failed

    def __repr__(self) -> str:
        return f"Fence(submission={self.submission}, done={self.done})"


#: The fence of an empty submission: already done.
DONE = Fence([])
