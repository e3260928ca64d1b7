"""Fault injection in the style of the kernel's ``lib/fault-inject.c``.

A :class:`FaultAttr` decides, call by call, whether an operation fails: ``probability`` (a fraction, or
``percent`` as the kernel's debugfs file), ``interval`` (only every ``interval``-th call may fail), ``times``
(how many failures are left; ``-1`` is unlimited), ``space`` (bytes to let pass before any failure) and
``verbose`` (log each injected failure, with its stack at 2). Its random draws come from its own seeded
generator, so a run is reproducible from ``seed``.

A :class:`FaultPoints` holds one optional attribute per named point of the machine (``m.faults``):

``dma_submit``
    A DMA submission fails: one channel's share is refused (never queued) and the fence raises
    :class:`~dmamig.errors.DmaError`; the other channels' shares still run.
``dma_copy``
    A channel fails part way through its share, inside its worker (about half the pages copied).
``dma_complete``
    A channel copies its whole share but its completion reports an error.
``channel_crash``
    A channel's worker thread dies while holding its share; the fence raises and the channel is restarted on
    its next use.
``alloc``
    ``Machine.alloc_folios`` stops at the failing folio and returns fewer folios, as a failed page
    allocation: callers see ``-ENOMEM`` entries or :class:`~dmamig.errors.OutOfMemory`.
``writeback``
    A writeback's disk write fails with ``EIO`` (the backing file's I/O error): its folios stay dirty and the
    file's next ``fsync`` returns ``-EIO``.
``disk_full``
    A writeback's disk write fails with ``ENOSPC`` (a full disk): the same, reported as ``-ENOSPC``.

Examples
--------
>>> from dmamig import FaultAttr, Machine
>>> m = Machine(host_pages=64, device_pages=64, backend="cpu")   # doctest: +SKIP
>>> m.faults["dma_copy"] = FaultAttr(probability=0.01, seed=7)   # doctest: +SKIP
>>> with m.faults.injecting("alloc", probability=1.0, times=1):  # doctest: +SKIP
...     pass
"""

from __future__ import annotations

import logging
import math
import random
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidArgument

__all__ = ["FAULT_POINTS", "FaultAttr", "FaultPoints"]

#: The named fault points of a machine.
FAULT_POINTS = ("alloc", "channel_crash", "dma_complete", "dma_copy", "dma_submit", "writeback", "disk_full")

_log = logging.getLogger("dmamig.fault_injection")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class FaultAttr:
    """When an operation fails: the kernel's ``struct fault_attr``.

    Parameters
    ----------
    probability : float
        Chance in ``[0, 1]`` that a call which passes ``interval`` and ``space`` fails. ``0`` never fails.
    interval : int
        Only every ``interval``-th call may fail (``1``: every call may).
    times : int
        Failures left to inject; ``-1`` is unlimited, ``0`` injects nothing more.
    space : int
        Bytes (the ``size`` of each call) to let pass before the first failure can happen.
    verbose : int
        ``0`` silent, ``1`` log each injected failure on the ``dmamig.fault_injection`` logger, ``2`` with its stack.
    seed : int, optional
        Seed of the attribute's random generator; ``None`` draws one, readable afterwards from ``seed`` so
        that the run can be repeated.
    percent : float, optional
        The probability in percent (``0..100``), as the kernel's ``probability`` file; overrides
        ``probability`` when given.

    Attributes
    ----------
    calls : int
        Calls that consulted this attribute.
    failures : int
        Failures injected so far.

    Raises
    ------
    InvalidArgument
        A setting outside its range or of the wrong type.
    """

    probability: float = 0.0
    interval: int = 1
    times: int = -1
    space: int = 0
    verbose: int = 0
    seed: int | None = None
    percent: float | None = None
    calls: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _rng: random.Random = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.percent is not None:
            p = self.percent
            if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(p) or not 0 <= p <= 100:
                raise InvalidArgument(f"percent must be a number in 0..100, got {p!r}")
            self.probability = float(p) / 100.0
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) \
                or not math.isfinite(p) or not 0 <= p <= 1:
            raise InvalidArgument(f"probability must be a number in [0, 1] (use percent= for 0..100), got {p!r}")
        self.probability = float(p)
        self.percent = self.probability * 100.0
        if not _is_int(self.interval) or self.interval < 1:
            raise InvalidArgument(f"interval must be an integer >= 1, got {self.interval!r}")
        if not _is_int(self.times) or self.times < -1:
            raise InvalidArgument(f"times must be an integer >= 0, or -1 for unlimited, got {self.times!r}")
        if not _is_int(self.space) or self.space < 0:
            raise InvalidArgument(f"space must be an integer >= 0 (bytes), got {self.space!r}")
        if not _is_int(self.verbose) or not 0 <= self.verbose <= 2:
            raise InvalidArgument(f"verbose must be 0, 1 or 2, got {self.verbose!r}")
        if self.seed is None:
            self.seed = random.SystemRandom().randrange(2**63)
        elif not _is_int(self.seed) or self.seed < 0:
            raise InvalidArgument(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        self.interval, self.times, self.space, self.seed = (int(self.interval), int(self.times),
                                                            int(self.space), int(self.seed))
        self._rng = random.Random(self.seed)

    @classmethod
    def parse(cls, text: str, seed: int | None = None) -> FaultAttr:
        """Build from the kernel's boot-parameter form ``"<interval>,<probability>,<space>,<times>"``.

        ``probability`` is in percent there, as in ``fail_page_alloc=1,10,0,-1``.
        """
        parts = str(text).split(",")
        if len(parts) != 4:
            raise InvalidArgument(f"fault setting {text!r} must be <interval>,<percent>,<space>,<times>, "
                                  f"e.g. 1,10,0,-1")
        try:
            interval, space, times = int(parts[0]), int(parts[2]), int(parts[3])
            percent = float(parts[1])
        except ValueError:
            raise InvalidArgument(f"fault setting {text!r} must hold numbers: <interval>,<percent>,<space>,"
                                  f"<times>, e.g. 1,10,0,-1") from None
        return cls(interval=interval, percent=percent, space=space, times=times, seed=seed)

    def should_fail(self, size: int = 1, where: str = "") -> bool:
        """Decide whether this call fails (``should_fail_ex``); counts the call and any failure.

        Parameters
        ----------
        size : int
            Bytes the call covers (consumed from ``space``).
        where : str
            Name of the fault point, for the log message.
        """
        with self._lock:
            self.calls += 1
            if self.times == 0:
                return False
            if self.space > size:
                self.space -= size
                return False
            if self.interval > 1 and self.calls % self.interval:
                return False
            if self.probability <= 0.0 or (self.probability < 1.0 and self._rng.random() >= self.probability):
                return False
            if self.times > 0:
                self.times -= 1
            self.failures += 1
        if self.verbose:
            stack = "\n" + "".join(traceback.format_stack(limit=8)[:-1]) if self.verbose > 1 else ""
            _log.warning("FAULT_INJECTION: forcing a failure at %s (failure %d)%s", where or "?", self.failures,
                         stack)
        return True


class FaultPoints:
    """The fault points of a machine (``m.faults``), each with an optional :class:`FaultAttr`.

    A point with no attribute never fails and costs one dictionary lookup. Points are set with item
    assignment or :meth:`set`, and cleared with :meth:`clear` (or ``del``).

    Parameters
    ----------
    points : tuple of str
        The names this object accepts (default :data:`FAULT_POINTS`).
    """

    def __init__(self, points: tuple[str, ...] = FAULT_POINTS):
        self._names = tuple(points)
        self._attrs: dict[str, FaultAttr] = {}
        self._counts = dict.fromkeys(self._names, 0)
        self._lock = threading.Lock()
        self._suspended = 0

    @property
    def points(self) -> tuple[str, ...]:
        """The names of the fault points."""
        return self._names

    def _check(self, point: Any) -> str:
        if not isinstance(point, str) or point not in self._names:
            raise InvalidArgument(f"unknown fault point {point!r}; the points are {', '.join(self._names)}")
        return point

    def set(self, point: str, attr: FaultAttr | None = None, **settings: Any) -> FaultAttr:
        """Arm ``point`` with ``attr``, or with ``FaultAttr(**settings)``; return the attribute in use."""
        self._check(point)
        if attr is None:
            attr = FaultAttr(**settings)
        elif settings:
            raise InvalidArgument("pass either a FaultAttr or settings, not both")
        elif not isinstance(attr, FaultAttr):
            raise InvalidArgument(f"a fault point takes a FaultAttr, got {type(attr).__name__}")
        with self._lock:
            self._attrs[point] = attr
        return attr

    def get(self, point: str) -> FaultAttr | None:
        """The attribute armed on ``point``, or ``None``."""
        return self._attrs.get(self._check(point))

    def clear(self, point: str | None = None) -> None:
        """Disarm ``point`` (every point when ``None``). Counts of injected faults are kept."""
        with self._lock:
            if point is None:
                self._attrs.clear()
            else:
                self._attrs.pop(self._check(point), None)

    __getitem__ = get
    __setitem__ = set

    def __delitem__(self, point: str) -> None:
        self.clear(point)

    def __contains__(self, point: object) -> bool:
        return isinstance(point, str) and point in self._attrs

    @property
    def armed(self) -> bool:
        """Whether any point has an attribute (and injection is not suspended)."""
        return bool(self._attrs) and not self._suspended

    def should_fail(self, point: str, size: int = 1) -> bool:
        """Whether this call of ``point`` fails now; counted in :attr:`injected` when it does."""
        attr = self._attrs.get(self._check(point))
        if attr is None or self._suspended:
            return False
        if attr.should_fail(size, point):
            with self._lock:
                self._counts[point] += 1
            return True
        return False

    def allowed(self, point: str, n: int, size: int = 1) -> int:
        """How many of ``n`` consecutive calls of ``point`` pass before the first injected failure.

        Used by allocations: folio ``k`` of a request fails, so only the first ``k`` come back.
        """
        if self._attrs.get(self._check(point)) is None or self._suspended:
            return n
        for i in range(n):
            if self.should_fail(point, size):
                return i
        return n

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected so far at each point (since creation or :meth:`reset_counts`)."""
        with self._lock:
            return dict(self._counts)

    @property
    def total_injected(self) -> int:
        """All faults injected so far."""
        with self._lock:
            return sum(self._counts.values())

    def reset_counts(self) -> None:
        """Zero the injected-fault counts."""
        with self._lock:
            self._counts = dict.fromkeys(self._names, 0)

    @contextmanager
    def injecting(self, point: str, attr: FaultAttr | None = None, **settings: Any) -> Iterator[FaultAttr]:
        """Arm ``point`` for the ``with`` block, then put back what was there before."""
        before = self.get(point)
        armed = self.set(point, attr, **settings)
        try:
            yield armed
        finally:
            if before is None:
                self.clear(point)
            else:
                self.set(point, before)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """No point fails inside the ``with`` block (an invariant check must not be disturbed)."""
        with self._lock:
            self._suspended += 1
        try:
            yield
        finally:
            with self._lock:
                self._suspended -= 1

    def __repr__(self) -> str:
        armed = ", ".join(f"{k}: p={a.probability:g}" for k, a in sorted(self._attrs.items()))
        return f"FaultPoints({armed or 'none armed'}; injected={self.total_injected})"
