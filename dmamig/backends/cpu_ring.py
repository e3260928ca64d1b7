"""The doorbell ring of a polling CPU DMA channel: shared words, and the compiled loops that read them.

A hardware DMA engine watches its doorbell and writes a completion word: nobody wakes it, it wakes nobody, and
the kernel's ``dma_sync_wait()`` polls that word with ``cpu_relax()``. A channel thread that sleeps between jobs
cannot be that engine on a VM, where every wake-up costs tens of microseconds (about 25 us a hop on the 2-vCPU
reference machine), twice per submission: together most of a 4K batch's state work. So a polling channel's worker
stays in the compiled loop :func:`serve` between jobs, watching the ring, and a waiter polls the completion word
with :func:`poll_done`; both sleep in the kernel only after a bounded poll window, so an idle engine costs
nothing. Spinning yields the CPU (``sched_yield``) every few spins, but a scheduler still shares a CPU fairly
between a poller and a busy thread (EEVDF does not hand a yielded CPU to a thread that has had more than its
share): where pollers outnumber the spare CPUs, as two channels beside the migrating thread on two vCPUs, they
take some of its time while a migration runs.

The shared state is one int64 array ``ctl`` (each word on its own cache line) and a job ring ``jobs`` of
``(kind, descriptor address, descriptor count, 0)`` rows. Job ``s`` sits in slot ``s % capacity``:

* ``TAIL``: jobs published. Written by the submitter (under the channel's lock) with a release store after the
  slot is filled.
* ``HEAD``: jobs finished. Written by the worker with a release store after a job's copies are globally visible
  (streaming stores are fenced first); job ``s`` is complete once ``HEAD > s``.
* ``SLEEPERS``: waiters asleep on a lock. After finishing a job the worker reads it (after a full fence, as the
  waiter fences between announcing itself and re-reading ``HEAD``), and returns to Python to wake them.
* ``BUSY_NS``: nanoseconds the worker has spent copying.

Descriptors are the rows of :mod:`dmamig.backends.cpu_descriptors`; the arrays their addresses point into are
kept alive by the channel until the job is complete. The loops are built on :mod:`dmamig.backends.cpu_spin`:
Linux and macOS with numba; elsewhere :data:`RING_AVAILABLE` is False and channels sleep between jobs.
"""

from __future__ import annotations

import numpy as np

from .cpu_descriptors import DESC_STREAM, PlannedCopy, descriptors, plan_descriptors
from .cpu_spin import SPIN_AVAILABLE, SPIN_ERROR

__all__ = ["CAPACITY", "DESC_STREAM", "JOB_COPY", "JOB_PYTHON", "RING_AVAILABLE", "RING_ERROR", "SERVE_IDLE",
           "SERVE_PYTHON", "SERVE_WAKE", "PlannedCopy", "Ring", "descriptors", "plan_descriptors", "warm_up"]

#: Job ring slots: a submitter finding the ring full waits for the oldest job.
CAPACITY = 1024
#: Job kinds: copies the compiled loop runs itself, and jobs it hands back to Python (faults, staged copies,
#: the stop request, channels whose jobs are customised).
JOB_COPY, JOB_PYTHON = 1, 2
#: Why :func:`serve` returned: the idle window passed, a Python job is at the head, a sleeping waiter needs waking.
SERVE_IDLE, SERVE_PYTHON, SERVE_WAKE = 0, 1, 2
# Word indexes in ctl: 8 words (64 bytes) apart, so that the submitter's and the worker's words never share a
# cache line.
TAIL, HEAD, SLEEPERS, BUSY_NS = 0, 8, 16, 24
_CTL_WORDS = 32
#: Spins between two ``sched_yield`` calls: a poller that shares a CPU with a thread that has work (the
#: migrating thread, another channel) offers it back within about a microsecond.
_SPINS_PER_YIELD = 4
#: Spins between two looks at the clock (the end of the poll window): a few microseconds.
_SPINS_PER_CLOCK = 64

#: Why polling channels cannot run here (``None`` where they can).
RING_ERROR: str | None = SPIN_ERROR
#: Whether polling channels can run here.
RING_AVAILABLE = SPIN_AVAILABLE


if RING_AVAILABLE:
    from numba import njit

    from .cpu_descriptors import run_descriptors
    from .cpu_kernels import _store_fence
    from .cpu_spin import _cpu_relax, _load_acquire, _now_ns, _sched_yield, _store_release

    @njit(nogil=True, cache=True)
    def _serve(ctl, jobs, idle_ns, ts):  # pragma: no cover - compiled
        base = ctl.ctypes.data
        capacity = jobs.shape[0]
        head = _load_acquire(base + HEAD * 8)
        idle_since = _now_ns(ts)
        spins = 0
        while True:
            if _load_acquire(base + TAIL * 8) == head:
                _cpu_relax()
                spins += 1
                if spins % _SPINS_PER_YIELD == 0:
                    _sched_yield()
                if spins % _SPINS_PER_CLOCK == 0 and _now_ns(ts) - idle_since >= idle_ns:
                    return SERVE_IDLE
                continue
            slot = head % capacity
            if jobs[slot, 0] != JOB_COPY:
                return SERVE_PYTHON
            start = _now_ns(ts)
            run_descriptors(jobs[slot, 1], jobs[slot, 2])
            idle_since = _now_ns(ts)
            ctl[BUSY_NS] += idle_since - start
            head += 1
            _store_release(base + HEAD * 8, head)
            _store_fence()  # HEAD before SLEEPERS: the waiter fences between its SLEEPERS store and HEAD load
            if _load_acquire(base + SLEEPERS * 8) > 0:
                return SERVE_WAKE
            spins = 0

    @njit(nogil=True, cache=True)
    def _poll_done(ctl, seq, budget_ns, ts):  # pragma: no cover - compiled
        head_addr = ctl.ctypes.data + HEAD * 8
        start = _now_ns(ts)
        spins = 0
        while _load_acquire(head_addr) <= seq:
            _cpu_relax()
            spins += 1
            if spins % _SPINS_PER_YIELD == 0:
                _sched_yield()
            if spins % _SPINS_PER_CLOCK == 0 and _now_ns(ts) - start >= budget_ns:
                return False
        return True

    @njit(nogil=True, cache=True)
    def _publish(ctl, jobs, kind, addr, count):  # pragma: no cover - compiled
        base = ctl.ctypes.data
        tail = ctl[TAIL]  # only the submitter writes TAIL, and it holds the channel's lock
        slot = tail % jobs.shape[0]
        jobs[slot, 0] = kind
        jobs[slot, 1] = addr
        jobs[slot, 2] = count
        _store_release(base + TAIL * 8, tail + 1)
        return tail

    @njit(nogil=True, cache=True)
    def _store_and_fence(ctl, index, value):  # pragma: no cover - compiled
        _store_release(ctl.ctypes.data + index * 8, value)
        _store_fence()

    @njit(nogil=True, cache=True)
    def _publish_desc(ctl, jobs, kind, desc):  # pragma: no cover - compiled
        return _publish(ctl, jobs, kind, desc.ctypes.data, desc.shape[0])



class Ring:
    """One channel's ring: the shared words, the job slots, and typed calls into the compiled loops.

    The submitter calls :meth:`publish` (under the channel's lock), the worker :meth:`serve` and
    :meth:`advance`, waiters :meth:`poll` and :meth:`announce_sleepers`. Every call but :meth:`serve` and
    :meth:`poll` returns at once.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if not RING_AVAILABLE:
            raise RuntimeError(f"polling DMA channels are not available: {RING_ERROR}")
        self.ctl = np.zeros(_CTL_WORDS, dtype=np.int64)
        self.jobs = np.zeros((int(CAPACITY if capacity is None else capacity), 4), dtype=np.int64)
        self._worker_clock = np.zeros(2, dtype=np.int64)  # timespec scratch of the worker's loop

    @property
    def capacity(self) -> int:
        """Job slots."""
        return int(self.jobs.shape[0])

    @property
    def tail(self) -> int:
        """Jobs published so far."""
        return int(self.ctl[TAIL])

    @property
    def head(self) -> int:
        """Jobs finished so far (job ``s`` is done once ``head > s``)."""
        return int(self.ctl[HEAD])

    @property
    def busy_ns(self) -> int:
        """Nanoseconds the compiled loop has spent copying."""
        return int(self.ctl[BUSY_NS])

    def kind(self, seq: int) -> int:
        """The kind of job ``seq`` (still in its slot)."""
        return int(self.jobs[seq % self.capacity, 0])

    def publish(self, kind: int, desc: np.ndarray | None = None) -> int:
        """Put a job in the next slot and ring the doorbell; returns its sequence number.

        ``desc``: the ``(n, 4)`` int64 descriptor rows of a :data:`JOB_COPY` job (the caller keeps the array
        alive until the job is done). The caller holds the channel's lock and has checked there is room.
        """
        if desc is None:
            return int(_publish(self.ctl, self.jobs, kind, 0, 0))
        return int(_publish_desc(self.ctl, self.jobs, kind, desc))

    def serve(self, idle_ns: int) -> int:
        """Run copy jobs until the idle window passes, a Python job is at the head, or a waiter sleeps.

        Returns one of :data:`SERVE_IDLE`, :data:`SERVE_PYTHON`, :data:`SERVE_WAKE`. Releases the GIL.
        """
        return int(_serve(self.ctl, self.jobs, int(idle_ns), self._worker_clock))

    def advance(self, to: int) -> None:
        """Mark jobs below ``to`` finished (the worker, after a Python job; or a failed or drained channel)."""
        _store_and_fence(self.ctl, HEAD, int(to))

    def announce_sleepers(self, count: int) -> int:
        """Publish how many waiters sleep, then (after a full fence) return :attr:`head`."""
        _store_and_fence(self.ctl, SLEEPERS, int(count))
        return self.head

    def poll(self, seq: int, budget_ns: int) -> bool:
        """Poll until job ``seq`` is done or ``budget_ns`` passed; ``True`` when done. Releases the GIL."""
        return bool(_poll_done(self.ctl, int(seq), int(budget_ns), np.zeros(2, dtype=np.int64)))


def warm_up() -> None:
    """Compile (or load from the cache) the ring's loops now rather than inside a first copy."""
    if not RING_AVAILABLE:
        return
    ring = Ring(capacity=2)
    a = np.zeros((1, 64), dtype=np.uint8)
    b = np.zeros((1, 64), dtype=np.uint8)
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    desc = descriptors([(a, b, zero, zero, one)])
    ring.publish(JOB_COPY, desc)
    ring.publish(JOB_PYTHON)
    assert ring.serve(0) == SERVE_PYTHON and ring.head == 1
    assert ring.poll(0, 0)
    ring.advance(2)
    ring.announce_sleepers(0)
