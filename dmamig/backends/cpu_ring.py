"""The doorbell ring of a polling CPU DMA channel: shared words, and the compiled loops that read them.

A hardware DMA engine watches its doorbell and writes a completion word: nobody wakes it, it wakes nobody, and
the kernel's ``dma_sync_wait()`` polls that word with ``cpu_relax()``. A channel thread that sleeps between jobs
cannot be that engine on a VM, where every wake-up costs tens of microseconds (about 25 us a hop on the 2-vCPU
reference machine: more than a 4K batch's whole state work), twice per submission. So a polling channel's worker
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

Descriptors are ``(source address, destination address, bytes, flags)`` rows; flag :data:`DESC_STREAM` copies
with streaming stores (the DMA kernel of :mod:`~dmamig.backends.cpu_kernels`), else with ``memcpy``. The arrays
the addresses point into are kept alive by the channel until the job is complete.

Linux and macOS (the loops call libc's ``sched_yield`` and ``clock_gettime``) with numba; elsewhere
:data:`RING_AVAILABLE` is False and channels sleep between jobs.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Any, NamedTuple

import numpy as np

from .cpu_kernels import HAVE_NUMBA

__all__ = ["CAPACITY", "DESC_STREAM", "JOB_COPY", "JOB_PYTHON", "RING_AVAILABLE", "RING_ERROR", "SERVE_IDLE",
           "SERVE_PYTHON", "SERVE_WAKE", "PlannedCopy", "Ring", "descriptors", "plan_descriptors", "warm_up"]

#: Job ring slots: a submitter finding the ring full waits for the oldest job.
CAPACITY = 1024
#: Job kinds: copies the compiled loop runs itself, and jobs it hands back to Python (faults, staged copies,
#: the stop request, channels whose jobs are customised).
JOB_COPY, JOB_PYTHON = 1, 2
#: Descriptor flag: copy with streaming stores.
DESC_STREAM = 1
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
_CLOCK_MONOTONIC = 1 if platform.system() == "Linux" else 6  # CLOCK_MONOTONIC on Linux; on macOS it is 6

RING_ERROR: str | None = None
if platform.system() not in ("Linux", "Darwin"):  # pragma: no cover - Windows
    RING_ERROR = f"the loops call libc's sched_yield and clock_gettime, which {platform.system()} lacks"
if not HAVE_NUMBA:  # pragma: no cover - installs without numba
    RING_ERROR = "numba is not importable"
if ctypes.sizeof(ctypes.c_void_p) != 8:  # pragma: no cover
    RING_ERROR = "a 64-bit Python is needed"
#: Whether polling channels can run here.
RING_AVAILABLE = RING_ERROR is None


if RING_AVAILABLE:
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from ..dma import plan_kernels
    from .cpu_kernels import _memcpy, _store_fence, _stream64

    _X86 = platform.machine().lower() in ("x86_64", "amd64")

    @intrinsic
    def _load_acquire(typingctx, addr):
        """An acquire load of the int64 at ``addr`` (never hoisted out of a polling loop)."""
        sig = types.int64(types.intp)

        def codegen(context, builder, signature, args):
            return builder.load_atomic(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), "acquire", 8)

        return sig, codegen

    @intrinsic
    def _store_release(typingctx, addr, value):
        """A release store of ``value`` to the int64 at ``addr``: every earlier write is visible before it."""
        sig = types.void(types.intp, types.int64)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
            builder.store_atomic(args[1], ptr, "release", 8)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _load_plain(typingctx, addr):
        """A plain load of the int64 at ``addr`` (descriptor words, published before the job's release)."""
        sig = types.int64(types.intp)

        def codegen(context, builder, signature, args):
            return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), align=8)

        return sig, codegen

    @intrinsic
    def _cpu_relax(typingctx):
        """``cpu_relax()``: the x86 PAUSE hint inside a spin loop (nothing elsewhere)."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            if _X86:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _sched_yield(typingctx):
        """libc's ``sched_yield()``: let another thread that is ready to run have this CPU."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _clock_gettime(typingctx, clock, timespec):
        """libc's ``clock_gettime(clock, timespec)``, the timespec given by address."""
        sig = types.void(types.int32, types.intp)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.IntType(8).as_pointer()])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
            builder.call(fn, [args[0], builder.inttoptr(args[1], ir.IntType(8).as_pointer())])
            return context.get_dummy_value()

        return sig, codegen

    @njit(nogil=True, cache=True)
    def _now_ns(ts):  # pragma: no cover - compiled
        _clock_gettime(np.int32(_CLOCK_MONOTONIC), ts.ctypes.data)
        return ts[0] * 1_000_000_000 + ts[1]

    @njit(nogil=True, cache=True)
    def _run_descriptors(addr, count):  # pragma: no cover - compiled
        for i in range(count):
            row = addr + i * 32
            src = _load_plain(row)
            dst = _load_plain(row + 8)
            nbytes = _load_plain(row + 16)
            if _load_plain(row + 24) & DESC_STREAM:
                for off in range(0, nbytes, 64):
                    _stream64(dst + off, src + off)
            else:
                _memcpy(dst, src, nbytes)
        _store_fence()  # streaming stores are weakly ordered: make them visible before HEAD moves

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
            _run_descriptors(jobs[slot, 1], jobs[slot, 2])
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
    def _fill(desc, at, src, dst, src_start, dst_start, npages):  # pragma: no cover - compiled
        row = src.shape[1]
        sbase = src.ctypes.data
        dbase = dst.ctypes.data
        # Streaming stores need an aligned destination and whole 64-byte steps (see cpu_kernels.stream_copy_ok).
        flags = DESC_STREAM if dbase % 16 == 0 and row % 64 == 0 else 0
        for i in range(npages.shape[0]):
            desc[at + i, 0] = sbase + src_start[i] * row
            desc[at + i, 1] = dbase + dst_start[i] * row
            desc[at + i, 2] = npages[i] * row
            desc[at + i, 3] = flags

    @njit(nogil=True, cache=True)
    def _publish_desc(ctl, jobs, kind, desc):  # pragma: no cover - compiled
        return _publish(ctl, jobs, kind, desc.ctypes.data, desc.shape[0])

    @njit(nogil=True, cache=True)
    def _in_order(a):  # pragma: no cover - compiled
        for i in range(1, a.shape[0]):
            if a[i] < a[i - 1]:
                return False
        return True

    @njit(nogil=True, cache=True)
    def _plan_descriptors(src_pfns, dst_pfns, src_base, dst_base, channels, split_min, large_fraction, memcpy_min,
                          src, dst, desc, run_dst, run_np, per_channel):  # pragma: no cover - compiled
        n = src_pfns.shape[0]
        src_idx = src_pfns - src_base
        dst_idx = dst_pfns - dst_base
        run_src = np.empty(n, dtype=np.int64)
        run_ch = np.empty(n, dtype=np.int64)
        run_m = np.empty(n, dtype=np.int8)
        seg = np.empty(n + 1, dtype=np.int64)
        nr, nseg = plan_kernels.plan_runs(src_idx, dst_idx, channels, split_min, large_fraction, memcpy_min,
                                          False, 0, run_src, run_dst, run_np, run_ch, run_m, seg)
        _fill(desc, 0, src, dst, run_src[:nr], run_dst[:nr], run_np[:nr])
        # Per channel: first run, gather segments (one kernel launch each), memcpy runs (one call each).
        for c in range(channels):
            per_channel[c, 0] = nr
            per_channel[c, 1] = 0
            per_channel[c, 2] = 0
        for k in range(nseg - 1, -1, -1):
            a = seg[k]
            b = seg[k + 1]
            c = run_ch[a]
            per_channel[c, 0] = a
            if run_m[a] == plan_kernels._GATHER:
                per_channel[c, 1] += 1
            else:
                per_channel[c, 2] += b - a
        for c in range(channels - 2, -1, -1):  # channels without runs start where the next one does
            if per_channel[c, 0] > per_channel[c + 1, 0]:
                per_channel[c, 0] = per_channel[c + 1, 0]
        return nr

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


def descriptors(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The descriptor rows of a copy job, run by run, in order: one ``(src_frames, dst_frames, src_start,
    dst_start, npages)`` per piece of work (C-contiguous uint8 frames of equal rows, int64 runs). Streaming
    stores where the destination allows them."""
    if len(runs) == 1:
        src, dst, s, d, n = runs[0]
        desc = np.empty((n.shape[0], 4), dtype=np.int64)
        _fill(desc, 0, src, dst, s, d, n)
        return desc
    desc = np.empty((sum(int(r[4].shape[0]) for r in runs), 4), dtype=np.int64)
    at = 0
    for src, dst, s, d, n in runs:
        _fill(desc, at, src, dst, s, d, n)
        at += int(n.shape[0])
    return desc


class PlannedCopy(NamedTuple):
    """A one-node-pair submission planned straight into descriptor rows (:func:`plan_descriptors`).

    Attributes
    ----------
    desc : numpy.ndarray
        ``(nr_runs, 4)`` descriptor rows, ordered by channel.
    dst_start, npages : numpy.ndarray
        Destination frame index and pages of each run (what a failed share names).
    bounds : list of int
        Channel ``c`` takes runs ``bounds[c]:bounds[c + 1]``.
    launches, calls : list of int
        Per channel, gather segments (kernel launches) and memcpy runs (calls), for the channel counters.
    """

    desc: np.ndarray
    dst_start: np.ndarray
    npages: np.ndarray
    bounds: list[int]
    launches: list[int]
    calls: list[int]

    @property
    def nr_runs(self) -> int:
        """Runs planned."""
        return int(self.npages.size)


def plan_descriptors(src: np.ndarray, dst: np.ndarray, src_pfns: np.ndarray, dst_pfns: np.ndarray,
                     src_base: int, dst_base: int, channels: int, options: Any) -> PlannedCopy:
    """Plan pages ``src[src_pfns[i] - src_base] -> dst[dst_pfns[i] - dst_base]`` over ``channels`` and write the
    descriptor rows, in one compiled call.

    The pages are put in source order (stably) as :func:`~dmamig.dma.plan.plan_one_pair` does, then planned by
    :func:`dmamig.dma.plan_kernels.plan_runs`, the planner's compiled pass (coalesce, split, balance, order by
    channel), with ``options`` a :class:`~dmamig.dma.plan.PlanOptions` (batched copies never apply on the CPU).
    ``src_pfns`` and ``dst_pfns`` are validated int64 arrays.
    """
    n = int(src_pfns.shape[0])
    if not (src_pfns.flags.c_contiguous and dst_pfns.flags.c_contiguous):  # one compiled signature only
        src_pfns, dst_pfns = np.ascontiguousarray(src_pfns), np.ascontiguousarray(dst_pfns)
    if not _in_order(src_pfns):  # source order first, stably (what sort_pages gives the planner)
        order = np.argsort(src_pfns, kind="stable")
        src_pfns, dst_pfns = src_pfns[order], dst_pfns[order]
    desc = np.empty((n, 4), dtype=np.int64)
    run_dst = np.empty(n, dtype=np.int64)
    run_np = np.empty(n, dtype=np.int64)
    per_channel = np.empty((int(channels), 3), dtype=np.int64)
    nr = int(_plan_descriptors(src_pfns, dst_pfns, int(src_base), int(dst_base), int(channels),
                               int(options.split_min_pages), float(options.large_run_fraction),
                               int(options.memcpy_min_pages), src, dst, desc, run_dst, run_np, per_channel))
    table = per_channel.tolist()
    return PlannedCopy(desc[:nr], run_dst[:nr], run_np[:nr], [row[0] for row in table] + [nr],
                       [row[1] for row in table], [row[2] for row in table])


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
