"""The CPU consumer of the DMA channel ring (:mod:`dmamig.dma.ring`): the compiled loops a polling channel's worker
and its waiters run.

A hardware DMA engine watches its doorbell and writes a completion word: nobody wakes it, it wakes nobody, and
the kernel's ``dma_sync_wait()`` polls that word with ``cpu_relax()``. A channel thread that sleeps between jobs
cannot be that engine on a VM, where every wake-up costs tens of microseconds (about 25 us a hop on the 2-vCPU
reference machine), twice per submission: together most of a 4K batch's state work. So a polling channel's worker
stays in the compiled loop :func:`serve` between jobs, watching the ring's tail, and a waiter polls the ring's
head with :func:`poll_status`; both sleep in the kernel only after a bounded poll window, so an idle engine costs
nothing. Spinning yields the CPU (``sched_yield``) every few spins, but a scheduler still shares a CPU fairly
between a poller and a busy thread (EEVDF does not hand a yielded CPU to a thread that has had more than its
share): where pollers outnumber the spare CPUs, as two channels beside the migrating thread on two vCPUs, they
take some of its time while a migration runs.

The loop runs :data:`~dmamig.dma.ring.JOB_ROWS` and :data:`~dmamig.dma.ring.JOB_EXTERNAL` jobs itself: every row
is checked against the lane's registered memory, then the rows are copied (streaming stores where the row allows
them, a ``memcpy`` otherwise); a row outside registered memory ends its job with ``STATUS_BAD_ROW`` before
anything is copied, as the GPU consumer does. Streaming stores are
fenced before the status and the release of ``HEAD``, so a waiter's acquire load of ``HEAD`` makes the
destination bytes visible (on Arm as on x86). A :data:`~dmamig.dma.ring.JOB_PYTHON` job at the head returns to
the worker's Python side. Built on :mod:`dmamig.backends.cpu.spin`: Linux and macOS with numba; elsewhere
:data:`RING_AVAILABLE` is False and channels sleep between jobs.
"""

from __future__ import annotations

import numpy as np

from ...dma import ring as dma_ring
from .spin import SPIN_ERROR

__all__ = ["RING_AVAILABLE", "RING_ERROR", "SERVE_IDLE", "SERVE_PYTHON", "SERVE_WAKE", "poll_status", "serve",
           "warm_up"]

#: Why :func:`serve` returned: the idle window passed, a Python job is at the head, a sleeping waiter needs waking.
SERVE_IDLE, SERVE_PYTHON, SERVE_WAKE = 0, 1, 2
#: Spins between two ``sched_yield`` calls: a poller that shares a CPU with a thread that has work (the
#: migrating thread, another channel) offers it back within about a microsecond.
_SPINS_PER_YIELD = 4
#: Spins between two looks at the clock (the end of the poll window): a few microseconds.
_SPINS_PER_CLOCK = 64

#: Why polling channels cannot run here (``None`` where they can).
RING_ERROR: str | None = SPIN_ERROR or dma_ring.RING_ERROR
#: Whether polling channels can run here.
RING_AVAILABLE = RING_ERROR is None

# The ring's layout, written out here: numba's on-disk cache freezes the globals a compiled function reads and is
# refreshed only when this file changes, so a layout change in dma/ring.py must change this file too (checked).
_TAIL, _REAPED, _HEAD, _ROW_HEAD, _BUSY_NS, _HEARTBEAT, _SLEEPERS = 0, 9, 16, 17, 18, 19, 24
_JOB_ROWS, _JOB_PYTHON, _ROW_STREAM, _J_STATUS = 1, 3, 1, 3
_STATUS_OK, _STATUS_BAD_ROW = 1, 2
# _poll_status's answers that are not a job status.
_NOT_DONE, _SLOT_REAPED = -1, -2
if (_TAIL, _REAPED, _HEAD, _ROW_HEAD, _BUSY_NS, _HEARTBEAT, _SLEEPERS, _JOB_ROWS, _JOB_PYTHON, _ROW_STREAM, _J_STATUS,
        _STATUS_OK, _STATUS_BAD_ROW) != (dma_ring.TAIL, dma_ring.REAPED, dma_ring.HEAD, dma_ring.ROW_HEAD,
                                         dma_ring.BUSY_NS, dma_ring.HEARTBEAT, dma_ring.SLEEPERS, dma_ring.JOB_ROWS,
                                         dma_ring.JOB_PYTHON, dma_ring.ROW_STREAM, dma_ring.J_STATUS,
                                         dma_ring.STATUS_OK, dma_ring.STATUS_BAD_ROW):  # pragma: no cover
    raise ImportError("dmamig.backends.cpu.ring_consumer: its copy of the ring layout differs from dmamig.dma.ring's")

if RING_AVAILABLE:
    from numba import njit

    from ...atomics import full_fence, load_acquire, load_plain, store_release
    from .copy_loops import STREAM_STEP, raw_memcpy, stream64
    from .spin import cpu_relax, now_ns, sched_yield

    @njit(nogil=True, cache=True, inline="always")
    def _registered(regions, nreg, addr, nbytes):  # pragma: no cover - compiled
        for k in range(1, nreg + 1):
            if regions[k, 0] <= addr and addr + nbytes <= regions[k, 1]:
                return True
        return False

    @njit(nogil=True, cache=True)
    def _run_job(rows, regions, kind, first, count):  # pragma: no cover - compiled
        """Check every row of one job against the registered memory, then copy them; the job's status."""
        capacity = rows.shape[0]
        base = rows.ctypes.data
        nreg = load_acquire(regions.ctypes.data)
        if nreg:
            for i in range(count):
                row = base + ((first + i) % capacity) * 32 if kind == _JOB_ROWS else first + i * 32
                nbytes = load_plain(row + 16)
                if not (_registered(regions, nreg, load_plain(row), nbytes)
                        and _registered(regions, nreg, load_plain(row + 8), nbytes)):
                    return _STATUS_BAD_ROW
        for i in range(count):
            row = base + ((first + i) % capacity) * 32 if kind == _JOB_ROWS else first + i * 32
            src = load_plain(row)
            dst = load_plain(row + 8)
            nbytes = load_plain(row + 16)
            if load_plain(row + 24) & _ROW_STREAM:
                for off in range(0, nbytes, STREAM_STEP):
                    stream64(dst + off, src + off)
            else:
                raw_memcpy(dst, src, nbytes)
        full_fence()  # streaming stores are weakly ordered: make them visible before HEAD moves
        return _STATUS_OK

    @njit(nogil=True, cache=True, inline="always")
    def _spin(spins, ts, since, window_ns):  # pragma: no cover - compiled
        """One turn of a poll: relax, yield the CPU every few turns, and every so many read the clock: whether
        ``window_ns`` has passed since ``since``."""
        cpu_relax()
        if spins % _SPINS_PER_YIELD == 0:
            sched_yield()
        return spins % _SPINS_PER_CLOCK == 0 and now_ns(ts) - since >= window_ns

    @njit(nogil=True, cache=True)
    def _serve(ctl, rows, jobs, regions, idle_ns, ts):  # pragma: no cover - compiled
        base = ctl.ctypes.data
        capacity = jobs.shape[0]
        head = load_acquire(base + _HEAD * 8)
        idle_since = now_ns(ts)
        spins = 0
        while True:
            if load_acquire(base + _TAIL * 8) == head:
                spins += 1
                if _spin(spins, ts, idle_since, idle_ns):
                    return SERVE_IDLE
                continue
            slot = head % capacity
            kind = jobs[slot, 0]
            if kind == _JOB_PYTHON:
                return SERVE_PYTHON
            start = now_ns(ts)
            jobs[slot, 3] = _run_job(rows, regions, kind, jobs[slot, 1], jobs[slot, 2])
            idle_since = now_ns(ts)
            ctl[_BUSY_NS] += idle_since - start
            ctl[_HEARTBEAT] += 1
            if kind == _JOB_ROWS:
                store_release(base + _ROW_HEAD * 8, jobs[slot, 1] + jobs[slot, 2])
            head += 1
            store_release(base + _HEAD * 8, head)
            full_fence()  # HEAD before SLEEPERS: the waiter fences between its SLEEPERS store and HEAD load
            if load_acquire(base + _SLEEPERS * 8) > 0:
                return SERVE_WAKE
            spins = 0

    @njit(nogil=True, cache=True)
    def _poll_status(ctl, jobs, seq, budget_ns, ts):  # pragma: no cover - compiled
        head_addr = ctl.ctypes.data + _HEAD * 8
        if load_acquire(head_addr) <= seq:
            start = now_ns(ts)
            spins = 0
            while load_acquire(head_addr) <= seq:
                spins += 1
                if _spin(spins, ts, start, budget_ns):
                    return _NOT_DONE
        # The slot's status with an acquire load, so the REAPED read after it cannot pass it: a slot reaped (and
        # maybe reused) in between is seen as such.
        status = load_acquire(jobs.ctypes.data + ((seq % jobs.shape[0]) * jobs.shape[1] + _J_STATUS) * 8)
        if ctl[_REAPED] > seq:
            return _SLOT_REAPED
        return status


def serve(ring: dma_ring.Ring, idle_ns: int, clock: np.ndarray) -> int:
    """Run copy jobs of ``ring`` until the idle window passes, a Python job is at the head, or a waiter sleeps.

    Returns one of :data:`SERVE_IDLE`, :data:`SERVE_PYTHON`, :data:`SERVE_WAKE`. ``clock`` is the caller's
    two-word timespec scratch. Releases the GIL.
    """
    return int(_serve(ring.ctl, ring.rows, ring.jobs, ring.regions, int(idle_ns), clock))


def poll_status(ring: dma_ring.Ring, seq: int, budget_ns: int) -> int | None:
    """Poll until job ``seq`` of ``ring`` is done or ``budget_ns`` passed; the job's status once done (as
    :meth:`~dmamig.dma.ring.Ring.status` gives it), ``None`` when the budget ran out first. Releases the GIL.

    One compiled call where a waiter would otherwise read ``HEAD``, poll it, then read ``HEAD`` and the slot again.
    """
    status = int(_poll_status(ring.ctl, ring.jobs, int(seq), int(budget_ns), np.empty(2, dtype=np.int64)))
    if status == _NOT_DONE:
        return None
    if status == _SLOT_REAPED:  # the slot was reaped: the ring kept the job's status if it was not OK
        return ring.status(seq)
    return status


def warm_up() -> None:
    """Compile (or load from the cache) the ring's loops now rather than inside a first copy."""
    if not RING_AVAILABLE:
        return
    dma_ring.warm_up()
    rs = dma_ring.RingSet(1, row_capacity=4, job_capacity=4)
    ring = rs.rings[0]
    a = np.zeros((1, 64), dtype=np.uint8)
    b = np.zeros((1, 64), dtype=np.uint8)
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    desc = dma_ring.external_rows([(a, b, zero, zero, one)])
    ring.publish(dma_ring.JOB_EXTERNAL, desc)
    ring.publish(dma_ring.JOB_PYTHON)
    assert serve(ring, 0, np.zeros(2, dtype=np.int64)) == SERVE_PYTHON and ring.head == 1
    assert poll_status(ring, 0, 0) == dma_ring.STATUS_OK
    ring.finish(2)
