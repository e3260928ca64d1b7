"""The DMA channel protocol: one descriptor ring per channel, written by one compiled call per submission.

Real copy engines take work the same way: the driver writes descriptor rows into a ring in memory the engine can
read, publishes a tail, and the engine publishes how far it got and how each job ended. dmamig's channels
speak this protocol whatever runs them (the CPU backend's compiled workers; a device consumer on a GPU), so the
host work of a submission is the same small compiled call everywhere.

**Layout.** A lane (the channels of one device) owns four int64 arrays, allocated once (pinned and mapped for the
device where there is one, see :class:`RingSet`):

* ``rows[c]``: channel ``c``'s ring of rows ``(src address, dst address, bytes, flags)``; row ``r`` (a running
  count) sits at ``r % row_capacity``, so a job's rows may wrap around the end.
* ``jobs[c]``: its ring of job slots ``(kind, first row, row count, status)``; job ``s`` sits at
  ``s % job_capacity``. A :data:`JOB_ROWS` job's rows are in the ring; a :data:`JOB_EXTERNAL` job's are in an
  array of their own (``first`` is its address: one job larger than the ring); a :data:`JOB_PYTHON` job is
  handed back to the consumer's host side (injected faults, staged copies, the stop request).
* ``ctl[c]``: the channel's words, a cache line apart where different threads write them. ``TAIL`` (jobs
  published) alone on the line the consumer polls. The submitter's own line: ``ROW_TAIL`` (rows written),
  ``REAPED`` (jobs whose status the host side has collected, so their slots may be reused) and the
  ``LAUNCHES`` and ``CALLS`` counters. The consumer's line: ``HEAD`` (jobs finished), ``ROW_HEAD`` (rows it
  no longer reads), ``BUSY_NS`` and ``HEARTBEAT``. Then ``SLEEPERS`` (waiters asleep) and ``IDLE`` (the
  consumer is asleep).
* ``regions``: the registered memory a row may touch, ``[lo, hi)`` byte ranges (row 0 holds their count). A row
  outside them ends its job with :data:`STATUS_BAD_ROW` before any of its rows is copied: a status, never a
  wild write or a poisoned device context.

**Ordering.** The submitter writes rows and the job slot with plain stores, then publishes ``TAIL`` with a
release store. The consumer reads ``TAIL`` with an acquire load before it reads a row, copies, makes its stores
visible (a fence after streaming stores), writes the job's status, then publishes ``HEAD`` (and ``ROW_HEAD``)
with a release store. A waiter reads ``HEAD`` with an acquire load before it trusts the status and the
destination bytes, so the protocol holds on weakly ordered CPUs (Arm) as on x86. A consumer about to sleep
stores ``IDLE``, fences, and looks at ``TAIL`` once more; a submitter stores ``TAIL``, fences, and reads
``IDLE``: one of the two always sees the other, so no job waits for a sleeping consumer.

A submission (:meth:`RingRoute.submit`) is one compiled call: put the pages in source order, plan runs
(:func:`dmamig.dma.plan_loops.plan_runs`: coalesce, split, balance over the channels), check every channel has
room, write every channel's rows, and publish. It allocates nothing (a per-lane workspace is reused) and makes
no Python object per page or per run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..array_table import TABLE_ERROR, ArrayTable, TableLayout
from ..atomics import ATOMICS_ERROR
from ..errors import InvalidArgument
from . import plan_loops
from .copy_plan import PlanOptions

__all__ = [
    "JOB_CAPACITY",
    "JOB_EXTERNAL",
    "JOB_PYTHON",
    "JOB_ROWS",
    "RING_AVAILABLE",
    "RING_ERROR",
    "ROUTE_LAYOUT",
    "ROW_CAPACITY",
    "ROW_STREAM",
    "RT_CTL",
    "RT_JOBS",
    "RT_OUT",
    "RT_ROUTE",
    "RT_ROWS",
    "RT_WM",
    "RT_WRITE_SEQ",
    "RT_WS",
    "Ring",
    "RingRoute",
    "RingSet",
    "STATUS_BAD_ROW",
    "STATUS_FAILED",
    "STATUS_OK",
    "STATUS_PENDING",
    "SUBMIT_NO_ROOM",
    "SUBMIT_OUTSIDE",
    "SUBMIT_TOO_BIG",
    "SUBMIT_UNCHECKED",
    "Submitted",
    "status_text",
    "submit_pages",
    "submit_table",
]

# -- the words ------------------------------------------------------------------------------------------------
# ctl, per channel, 8 words (a cache line) apart where different threads write: TAIL alone on the line the
# consumer polls (so the submitter's other stores do not pull that line away from it once per word), the
# submitter's private words, the consumer's, then each half of the sleep hand-shakes.
TAIL = 0
ROW_TAIL, REAPED, LAUNCHES, CALLS = 8, 9, 10, 11
HEAD, ROW_HEAD, BUSY_NS, HEARTBEAT = 16, 17, 18, 19
SLEEPERS, IDLE = 24, 32
CTL_WORDS = 40
# A job slot.
J_KIND, J_FIRST, J_COUNT, J_STATUS = 0, 1, 2, 3
#: Job kinds: rows in the ring, rows in an array of their own, work for the consumer's host side.
JOB_ROWS, JOB_EXTERNAL, JOB_PYTHON = 1, 2, 3
#: Job statuses: not finished, copied, refused for a row outside registered memory, not copied (its channel
#: failed or was closed).
STATUS_PENDING, STATUS_OK, STATUS_BAD_ROW, STATUS_FAILED = 0, 1, 2, 3
#: Row flag: the consumer may copy this row with streaming (non-temporal) stores.
ROW_STREAM = 1
#: Bytes of one row.
ROW_BYTES = 32
#: Rows per channel ring (1 MiB of rows: a 1 GiB batch of scattered 4 KiB pages spread over 8 channels fits).
ROW_CAPACITY = 1 << 15
#: Job slots per channel ring.
JOB_CAPACITY = 1024
#: Registered memory ranges a lane can hold.
MAX_REGIONS = 64
#: What :meth:`RingRoute.submit` returns when it wrote nothing: a channel's ring has no room now (wait for
#: its oldest job); a channel's share is more rows than its ring holds (submit it as an external job); a page
#: is outside the node pair; the destinations are not increasing and the caller did not check them.
SUBMIT_NO_ROOM, SUBMIT_TOO_BIG, SUBMIT_OUTSIDE, SUBMIT_UNCHECKED = -1, -2, -3, -4
_NO_SEQ = np.zeros(0, dtype=np.int64)
# The gather method's number, written out: numba's on-disk cache freezes globals and is refreshed only when this
# file changes (checked against the planner's at import).
_GATHER = 1
if _GATHER != plan_loops.GATHER:  # pragma: no cover
    raise ImportError("dmamig.dma.ring: its copy of the gather method number differs from the planner's")
# Words of the radix sort's digit counts (10-bit digits), in the submission workspace.
_COUNT_WORDS = 1026
# A route's words (RingRoute): what stays the same from one submission between two nodes to the next.
R_SRC_BASE, R_DST_BASE, R_SRC_PAGES, R_DST_PAGES, R_SRC_ADDR, R_DST_ADDR, R_PAGE, R_SPLIT_MIN, R_MEMCPY_MIN = range(9)
_ROUTE_WORDS = 9
# Streaming stores need a 16-byte aligned destination and whole 64-byte steps.
_STREAM_ALIGN, _STREAM_STEP = 16, 64
#: Slots of a route's table (:meth:`RingRoute.table`): what :func:`submit_pages` takes besides the pfns,
#: ``checked`` and the sequence number, as one argument of a compiled call (:mod:`dmamig.array_table`); the
#: large-run fraction is its one scalar.
RT_CTL, RT_ROWS, RT_JOBS, RT_ROUTE, RT_WRITE_SEQ, RT_WS, RT_WM, RT_OUT = range(8)
ROUTE_LAYOUT = TableLayout(((np.int64, 2), (np.int64, 3), (np.int64, 3), (np.int64, 1), (np.int64, 1),
                            (np.int64, 1), (np.int8, 1), (np.int64, 2)), scalars=1)
_W_LARGE_FRACTION = ROUTE_LAYOUT.scalar_word(0)

#: Why the ring cannot be driven here (``None`` where it can).
RING_ERROR: str | None = ATOMICS_ERROR if ATOMICS_ERROR else (
    None if plan_loops.HAVE_NUMBA else "numba is not importable") or TABLE_ERROR
#: Whether rings can be used here.
RING_AVAILABLE = RING_ERROR is None

_STATUS_TEXT = {STATUS_PENDING: "pending", STATUS_OK: "copied",
                STATUS_BAD_ROW: "a row outside registered memory (nothing of the job was copied)",
                STATUS_FAILED: "not copied: its channel failed, broke or was closed before the job finished"}


def status_text(status: int) -> str:
    """What a job status means, in words."""
    return _STATUS_TEXT.get(int(status), f"unknown status {int(status)}")



if RING_AVAILABLE:
    from numba import njit

    from ..array_table import table_array1, table_array2, table_array3, table_float
    from ..atomics import full_fence, load_acquire, store_release

    @njit(nogil=True, cache=True)
    def _source_order(keys, n, order, tmp, count):  # pragma: no cover - compiled
        """Stable order of ``keys[:n]`` (non-negative) into ``order``: least-significant-digit radix with as few
        passes of at most 10-bit digits as the largest key needs (one for a batch within 4 MiB of 4 KiB frames,
        two up to 4 GiB). ``count`` holds at least 1025 words."""
        top = 0
        for i in range(n):
            order[i] = i
            if keys[i] > top:
                top = keys[i]
        bits = 0
        while (top >> bits) > 0:
            bits += 1
        passes = (bits + 9) // 10
        if passes == 0:
            return
        digit = (bits + passes - 1) // passes
        mask = (1 << digit) - 1
        for p in range(passes):
            shift = p * digit
            for d in range(mask + 2):
                count[d] = 0
            for i in range(n):
                count[((keys[order[i]] >> shift) & mask) + 1] += 1
            for d in range(mask + 1):
                count[d + 1] += count[d]
            for i in range(n):
                k = order[i]
                d = (keys[k] >> shift) & mask
                tmp[count[d]] = k
                count[d] += 1
            for i in range(n):
                order[i] = tmp[i]

    @njit(nogil=True, cache=True)
    def _write_rows(rows, at, capacity, src_addr, dst_addr, page, flags, run_src, run_dst, run_np, a, b):
        # pragma: no cover - compiled
        slot = at % capacity  # one division: a modulo per row costs more than the row
        for r in range(a, b):
            rows[slot, 0] = src_addr + run_src[r] * page
            rows[slot, 1] = dst_addr + run_dst[r] * page
            rows[slot, 2] = run_np[r] * page
            rows[slot, 3] = flags
            slot += 1
            if slot == capacity:
                slot = 0

    @njit(nogil=True, cache=True)
    def _publish(ctl, jobs, kind, first, count):  # pragma: no cover - compiled
        """Fill the next job slot and release ``TAIL``; return ``(seq, consumer asleep)``. The caller checked
        there is a free slot and holds the lane's publishing lock."""
        base = ctl.ctypes.data
        tail = ctl[TAIL]
        slot = tail % jobs.shape[0]
        jobs[slot, J_KIND] = kind
        jobs[slot, J_FIRST] = first
        jobs[slot, J_COUNT] = count
        jobs[slot, J_STATUS] = STATUS_PENDING
        store_release(base + TAIL * 8, tail + 1)
        full_fence()  # TAIL before IDLE: the consumer fences between its IDLE store and its TAIL load
        return tail, load_acquire(base + IDLE * 8)

    @njit(nogil=True, cache=True)
    def _small_runs(ctl, rows, jobs, by_table, table, low, span, src_idx, dst_idx, split_min, large_fraction,
                    memcpy_min, src_addr, dst_addr, page, flags, dst_pfns, write_seq, seq, aux,
                    out):  # pragma: no cover - compiled
        """Publish a submission whose runs are all small (scattered pages) in one pass over them: each run
        becomes its channel's next row as soon as it ends. Returns the runs, or -1 (nothing written or stamped)
        where the planner is needed: a run long enough to split, to place by LPT or to copy by memcpy, or a
        channel that might lack room.

        The pages come in source order, ``(src_idx[i], dst_idx[i])``, or (``by_table``) as ``table[k]``, the
        destination of source ``low + k`` (-1: none) for ``k < span``. The rows are those of
        :func:`dmamig.dma.plan_loops.plan_coalesced`'s plan for such runs: every run a gather, channels by the
        prefix partition, in run order.
        """
        n = dst_pfns.shape[0]
        channels = ctl.shape[0]
        row_cap = rows.shape[1]
        job_cap = jobs.shape[1]
        # Room for every page as a run of its own on every channel: then the exact plan fits too.
        if n > row_cap:
            return -1
        for c in range(channels):
            if ctl[c, TAIL] - ctl[c, REAPED] >= job_cap or \
                    ctl[c, ROW_TAIL] + n - load_acquire(ctl[c].ctypes.data + ROW_HEAD * 8) > row_cap:
                return -1
        # The planner's thresholds: a run this long would be split, placed by LPT or copied by memcpy.
        limit = memcpy_min
        mean = n / channels
        bounds = aux[0:channels]
        used = aux[channels:2 * channels]
        slot = aux[2 * channels:3 * channels]
        if channels > 1:
            share = -(-n // channels)
            limit = min(limit, max(share, split_min) + 1)
            large_min = max(mean / large_fraction, 1.0)
            limit = min(limit, np.int64(np.ceil(large_min)))
            acc = 0.0
            for k in range(channels - 1):
                acc += mean
                bounds[k] = np.int64(np.floor(acc + 0.5))
        for c in range(channels):
            used[c] = 0
            slot[c] = ctl[c, ROW_TAIL] % row_cap
        # The channel being filled keeps its next slot and row count in locals, stored back when the walk moves on:
        # kept in memory, each row's store would wait for the row before's.
        c = 0
        at = slot[0]
        count = 0
        end = 0
        nr = 0
        rs = -1
        rd = -1
        length = 0
        last = span if by_table else n
        # The destinations' content changes from now on: each is stamped as the walk meets it, before anything
        # is published (a walk cut short by a long run leaves the planner to stamp them all again).
        stamp = write_seq.shape[0] > 0
        for k in range(last + 1):
            if k < last:
                if by_table:
                    d = table[k]
                    if d < 0:
                        continue
                    s = low + k
                else:
                    s = src_idx[k]
                    d = dst_idx[k]
                if stamp:
                    write_seq[d] = seq
                if s == rs + length and d == rd + length:
                    length += 1
                    continue
            if length:  # the run ends: its row
                if length >= limit:
                    return -1
                end += length
                while c < channels - 1 and end > bounds[c]:
                    slot[c] = at
                    used[c] = count
                    c += 1
                    at = slot[c]
                    count = 0
                rows[c, at, 0] = src_addr + rs * page
                rows[c, at, 1] = dst_addr + rd * page
                rows[c, at, 2] = length * page
                rows[c, at, 3] = flags
                at += 1
                if at == row_cap:
                    at = 0
                count += 1
                nr += 1
            if k < last:
                rs = s
                rd = d
                length = 1
        slot[c] = at
        used[c] = count
        for c in range(channels):
            k = used[c]
            if k == 0:
                out[c, 0] = -1
                out[c, 1] = 0
                continue
            first = ctl[c, ROW_TAIL]
            ctl[c, ROW_TAIL] = first + k
            ctl[c, LAUNCHES] += 1
            seq_c, idle = _publish(ctl[c], jobs[c], JOB_ROWS, first, k)
            out[c, 0] = seq_c
            out[c, 1] = idle
        return nr

    @njit(nogil=True, cache=True)
    def submit_pages(ctl, rows, jobs, src_pfns, dst_pfns, route, large_fraction, checked, write_seq, seq, ws, wm,
                     out):  # pragma: no cover - compiled
        """The compiled submission (:meth:`RingRoute.submit`), for a caller that submits from its own compiled
        call, with the set's and the route's arrays (:func:`submit_table` takes them as a route's table). Caller
        holds the set's lock."""
        src_base = route[R_SRC_BASE]
        dst_base = route[R_DST_BASE]
        src_pages = route[R_SRC_PAGES]
        dst_pages = route[R_DST_PAGES]
        src_addr = route[R_SRC_ADDR]
        dst_addr = route[R_DST_ADDR]
        page = route[R_PAGE]
        split_min = route[R_SPLIT_MIN]
        memcpy_min = route[R_MEMCPY_MIN]
        n = src_pfns.shape[0]
        channels = ctl.shape[0]
        if wm.shape[0] < n or ws.shape[0] < 11 * n + 1 + _COUNT_WORDS + 4 * channels:  # the caller's workspace is too small
            return SUBMIT_TOO_BIG
        # One pass to validate and look: every page on the node pair; destinations distinct (strictly
        # increasing, or checked by the caller; the caller checked that the two nodes differ or that no page is
        # both read and written); sources in order or not, and the lowest. Each pass over a batch costs about
        # as much as the work in it, so the passes are fused.
        s0 = src_pfns[0]
        d0 = dst_pfns[0]
        low = s0
        high = s0
        outside = (s0 < src_base) | (s0 >= src_base + src_pages) | (d0 < dst_base) | (d0 >= dst_base + dst_pages)
        decreasing = False  # destinations not strictly increasing
        unordered = False  # sources not in order
        broken = False  # not one run contiguous on both sides
        for i in range(1, n):  # branch-free, so the compiler can vectorise it
            s = src_pfns[i]
            d = dst_pfns[i]
            outside |= (s < src_base) | (s >= src_base + src_pages) | (d < dst_base) | (d >= dst_base + dst_pages)
            broken |= (s != s0 + i) | (d != d0 + i)
            decreasing |= d <= dst_pfns[i - 1]
            unordered |= s < src_pfns[i - 1]
            low = min(low, s)
            high = max(high, s)
        if outside:
            return SUBMIT_OUTSIDE
        if decreasing and not checked:
            return SUBMIT_UNCHECKED
        # Workspace: pfns in source order, the radix scratch, the planner's run arrays and its scratch. The plan
        # works on machine pfns; the rows subtract the node bases.
        src_idx = ws[0:n]
        dst_idx = ws[n:2 * n]
        order = ws[2 * n:3 * n]
        tmp = ws[3 * n:4 * n]
        run_src = ws[4 * n:5 * n]
        run_dst = ws[5 * n:6 * n]
        run_np = ws[6 * n:7 * n]
        run_ch = ws[7 * n:8 * n]
        seg = ws[8 * n:9 * n + 1]
        count = ws[9 * n + 1:9 * n + 1 + _COUNT_WORDS]
        aux = ws[9 * n + 1 + _COUNT_WORDS:11 * n + 1 + _COUNT_WORDS + 4 * channels]
        nr = -1
        by_table = False
        span = 0
        if not broken:  # one run: nothing to order or coalesce
            run_src[0] = s0
            run_dst[0] = d0
            run_np[0] = n
            nr, longest = 1, n
        elif not unordered:
            src_idx = src_pfns
            dst_idx = dst_pfns
        elif high - low < _COUNT_WORDS - 2:
            # Sources within a few MiB (a migration's batch). Distinct sources (the rule) go straight into a
            # table by source, and the runs are read off it in source order: the same runs as a stable sort and a
            # coalesce, in two passes instead of five.
            span = high - low + 1
            for k in range(span):
                count[k] = -1
            repeated = False
            for i in range(n):
                k = src_pfns[i] - low
                repeated |= count[k] >= 0
                count[k] = dst_pfns[i]
            by_table = not repeated
            if repeated:
                # A source read twice: one stable counting pass puts them in order.
                for k in range(span + 1):
                    count[k] = 0
                for i in range(n):
                    count[src_pfns[i] - low + 1] += 1
                for k in range(span):
                    count[k + 1] += count[k]
                for i in range(n):
                    at = count[src_pfns[i] - low]
                    count[src_pfns[i] - low] = at + 1
                    src_idx[at] = src_pfns[i]
                    dst_idx[at] = dst_pfns[i]
        else:
            # Otherwise a stable radix over keys counted from the lowest source (two passes up to 4 GiB).
            for i in range(n):
                tmp[i] = src_pfns[i] - low
            _source_order(tmp, n, order, run_src, count)
            for i in range(n):
                k = order[i]
                src_idx[i] = src_pfns[k]
                dst_idx[i] = dst_pfns[k]
        if nr < 0:
            # The common case first: small runs only (scattered pages), written as rows while they are found.
            got = _small_runs(ctl, rows, jobs, by_table, count, low, span, src_idx, dst_idx, split_min, large_fraction,
                              memcpy_min, src_addr - src_base * page, dst_addr - dst_base * page, page,
                              ROW_STREAM if dst_addr % _STREAM_ALIGN == 0 and page % _STREAM_STEP == 0 else 0,
                              dst_pfns, write_seq, seq, aux, out)
            if got >= 0:
                return got
        if nr < 0 and by_table:
            nr = 0
            longest = 0
            rs = s0
            rd = d0
            length = 0
            for k in range(span):
                d = count[k]
                if d < 0:
                    continue
                s = low + k
                if s == rs + length and d == rd + length:
                    length += 1
                    continue
                if length:
                    run_src[nr] = rs
                    run_dst[nr] = rd
                    run_np[nr] = length
                    nr += 1
                    longest = max(longest, length)
                rs = s
                rd = d
                length = 1
            run_src[nr] = rs
            run_dst[nr] = rd
            run_np[nr] = length
            nr += 1
            longest = max(longest, length)
        elif nr < 0:
            nr, longest = plan_loops.coalesce(src_idx, dst_idx, run_src, run_dst, run_np)
        nr, nseg = plan_loops.plan_coalesced(n, nr, longest, channels, split_min, large_fraction, memcpy_min,
                                             False, 0, run_src, run_dst, run_np, run_ch, wm, seg, aux)
        # Per channel: first run, runs, gather segments (a launch each), memcpy runs (a call each).
        for c in range(channels):
            out[c, 0] = nr
            out[c, 1] = 0
            out[c, 2] = 0
            out[c, 3] = 0
        for k in range(nseg):
            a = seg[k]
            c = run_ch[a]
            if out[c, 0] > a:
                out[c, 0] = a
            out[c, 1] += seg[k + 1] - a
            if wm[a] == _GATHER:
                out[c, 2] += 1
            else:
                out[c, 3] += seg[k + 1] - a
        # Room on every channel before anything is written: a submission is published whole or not at all.
        row_cap = rows.shape[1]
        job_cap = jobs.shape[1]
        for c in range(channels):
            k = out[c, 1]
            if k == 0:
                continue
            if k > row_cap:
                return SUBMIT_TOO_BIG
            base = ctl[c].ctypes.data
            if ctl[c, TAIL] - ctl[c, REAPED] >= job_cap or \
                    ctl[c, ROW_TAIL] + k - load_acquire(base + ROW_HEAD * 8) > row_cap:
                return SUBMIT_NO_ROOM
        # The destinations' content changes from now on: stamped before anything is published.
        if write_seq.shape[0]:
            for i in range(n):
                write_seq[dst_pfns[i]] = seq
        flags = ROW_STREAM if dst_addr % _STREAM_ALIGN == 0 and page % _STREAM_STEP == 0 else 0
        for c in range(channels):
            k = out[c, 1]
            if k == 0:
                out[c, 0] = -1
                out[c, 1] = 0
                continue
            first = ctl[c, ROW_TAIL]
            a = out[c, 0]
            _write_rows(rows[c], first, row_cap, src_addr - src_base * page, dst_addr - dst_base * page, page,
                        flags, run_src, run_dst, run_np, a, a + k)
            ctl[c, ROW_TAIL] = first + k
            ctl[c, LAUNCHES] += out[c, 2]
            ctl[c, CALLS] += out[c, 3]
            seq, idle = _publish(ctl[c], jobs[c], JOB_ROWS, first, k)
            out[c, 0] = seq
            out[c, 1] = idle
        return nr

    @njit(nogil=True, cache=True)
    def submit_table(table, src_pfns, dst_pfns, checked, seq):  # pragma: no cover - compiled
        """:func:`submit_pages` over a route's table (:meth:`RingRoute.table`). Caller holds the set's lock."""
        return submit_pages(table_array2(table, RT_CTL, np.int64), table_array3(table, RT_ROWS, np.int64),
                            table_array3(table, RT_JOBS, np.int64), src_pfns, dst_pfns,
                            table_array1(table, RT_ROUTE, np.int64), table_float(table, _W_LARGE_FRACTION),
                            checked, table_array1(table, RT_WRITE_SEQ, np.int64), seq,
                            table_array1(table, RT_WS, np.int64), table_array1(table, RT_WM, np.int8),
                            table_array2(table, RT_OUT, np.int64))

    @njit(nogil=True, cache=True)
    def _load_word(ctl, index):  # pragma: no cover - compiled
        return load_acquire(ctl.ctypes.data + index * 8)

    @njit(nogil=True, cache=True)
    def _store_word(ctl, index, value):  # pragma: no cover - compiled
        store_release(ctl.ctypes.data + index * 8, value)
        full_fence()

    @njit(nogil=True, cache=True)
    def _fill_rows(desc, at, src, dst, src_start, dst_start, npages):  # pragma: no cover - compiled
        page = src.shape[1]
        dbase = dst.ctypes.data
        flags = ROW_STREAM if dbase % _STREAM_ALIGN == 0 and page % _STREAM_STEP == 0 else 0
        _write_rows(desc, at, desc.shape[0], src.ctypes.data, dbase, page, flags, src_start, dst_start, npages,
                    0, npages.shape[0])


class Submitted:
    """What :meth:`RingRoute.submit` published: the runs planned and, per channel, ``[seq, asleep]``: the
    job's sequence number (``-1``: no rows for that channel) and whether its consumer was asleep."""

    __slots__ = ("jobs", "nr_runs")

    def __init__(self, nr_runs: int, jobs: list[list[int]]) -> None:
        self.nr_runs = nr_runs
        self.jobs = jobs

    @property
    def seqs(self) -> list[int]:
        """Per channel, the job's sequence number (``-1``: none)."""
        return [j[0] for j in self.jobs]


class Ring:
    """Channel ``c``'s view of a :class:`RingSet`: its words, rows and job slots, and typed calls on them.

    Publishing goes through the set's :attr:`RingSet.lock`; reads never block.
    """

    def __init__(self, ring_set: RingSet, c: int) -> None:
        self.ring_set = ring_set
        self.index = int(c)
        self.ctl = ring_set.ctl[c]
        self.rows = ring_set.rows[c]
        self.jobs = ring_set.jobs[c]
        self.regions = ring_set.regions
        # Statuses other than STATUS_OK of jobs whose slots were reaped (their slots may be reused).
        self._failed: dict[int, int] = {}

    @property
    def job_capacity(self) -> int:
        """Job slots."""
        return int(self.jobs.shape[0])

    @property
    def row_capacity(self) -> int:
        """Rows the ring holds."""
        return int(self.rows.shape[0])

    @property
    def tail(self) -> int:
        """Jobs published so far."""
        return int(self.ctl[TAIL])

    @property
    def head(self) -> int:
        """Jobs finished so far (job ``s`` is done once ``head > s``); an acquire load, so the job's status and
        destination bytes may be trusted after it."""
        return int(_load_word(self.ctl, HEAD))

    @property
    def busy_ns(self) -> int:
        """Nanoseconds the consumer has spent copying."""
        return int(self.ctl[BUSY_NS])

    @property
    def counters(self) -> tuple[int, int]:
        """Gather segments (launches) and memcpy runs (calls) published by compiled submissions."""
        return int(self.ctl[LAUNCHES]), int(self.ctl[CALLS])

    def status(self, seq: int) -> int:
        """The status of job ``seq``, once :attr:`head` passed it (``STATUS_PENDING`` before)."""
        if self.head <= seq:
            return STATUS_PENDING
        s = int(self.jobs[seq % self.job_capacity, J_STATUS])
        if int(self.ctl[REAPED]) <= seq:  # read after the slot: had it been reaped, REAPED would be past seq
            return s
        return self._failed.get(seq, STATUS_OK)

    def has_room(self) -> bool:
        """Whether one more job slot is free (caller holds the set's lock; reaps first when needed)."""
        if self.tail - int(self.ctl[REAPED]) < self.job_capacity:
            return True
        self.reap()
        return self.tail - int(self.ctl[REAPED]) < self.job_capacity

    def publish(self, kind: int, desc: np.ndarray | None = None) -> tuple[int, bool]:
        """Publish a job; returns ``(seq, consumer asleep)``. The caller holds the set's lock and checked
        :meth:`has_room`.

        ``desc``: the ``(n, 4)`` int64 rows of a :data:`JOB_EXTERNAL` job (kept alive by the caller until the
        job is done); ``None`` for a :data:`JOB_PYTHON` job.
        """
        if desc is None:
            seq, idle = _publish(self.ctl, self.jobs, kind, 0, 0)
        else:
            seq, idle = _publish(self.ctl, self.jobs, kind, desc.ctypes.data, desc.shape[0])
        return int(seq), bool(idle)

    def reap(self) -> None:
        """Collect the statuses of finished jobs, so that their slots can be reused (caller holds the lock)."""
        head = self.head
        first = int(self.ctl[REAPED])
        if head > first:
            # One look at every slot at once: a full ring of finished jobs is reaped in one go (a compiled
            # submission that finds no free slot sends its batch the general way, which reaps them all).
            statuses = self.jobs[np.arange(first, head) % self.job_capacity, J_STATUS]
            for k in np.flatnonzero(statuses != STATUS_OK).tolist():
                self._failed[first + k] = int(statuses[k])
        _store_word(self.ctl, REAPED, head)

    def finish(self, to: int, status: int = STATUS_OK) -> None:
        """Finish every job below ``to`` from the host side with ``status`` (a host-side job, or a failed,
        drained or closed channel): their statuses, then ``HEAD`` and ``ROW_HEAD``."""
        head = int(self.ctl[HEAD])
        row_head = int(self.ctl[ROW_HEAD])
        for seq in range(head, to):
            slot = seq % self.job_capacity
            if int(self.jobs[slot, J_STATUS]) == STATUS_PENDING:
                self.jobs[slot, J_STATUS] = status
            if int(self.jobs[slot, J_KIND]) == JOB_ROWS:
                row_head = int(self.jobs[slot, J_FIRST]) + int(self.jobs[slot, J_COUNT])
        _store_word(self.ctl, ROW_HEAD, row_head)
        if to > head:
            _store_word(self.ctl, HEAD, to)

    def set_idle(self, idle: bool) -> int:
        """Store ``IDLE`` and, after a full fence, return :attr:`tail` (the consumer's half of the hand-shake)."""
        _store_word(self.ctl, IDLE, int(idle))
        return int(_load_word(self.ctl, TAIL))

    def announce_sleepers(self, count: int) -> int:
        """Publish how many waiters sleep, then (after a full fence) return :attr:`head`."""
        _store_word(self.ctl, SLEEPERS, int(count))
        return self.head


def external_rows(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The rows of a :data:`JOB_EXTERNAL` job: one ``(src_frames, dst_frames, src_start, dst_start, npages)``
    per piece of work (C-contiguous uint8 frames of equal rows, int64 runs), run by run, in order; streaming
    where the destination allows it."""
    desc = np.empty((sum(int(p[4].shape[0]) for p in pieces), 4), dtype=np.int64)
    at = 0
    for src, dst, s, d, n in pieces:
        _fill_rows(desc, at, src, dst, s, d, n)
        at += int(n.shape[0])
    return desc


class RingSet:
    """The rings of one lane: ``channels`` channels' words, rows and job slots, the registered memory, the
    publishing lock, and the compiled submission over them.

    Parameters
    ----------
    channels : int
        Channels in the lane (>= 1).
    row_capacity, job_capacity : int, optional
        Rows and job slots per channel (:data:`ROW_CAPACITY`, :data:`JOB_CAPACITY` by default).
    alloc : callable, optional
        ``alloc(shape) -> int64 array`` for the shared arrays (zero-filled): pinned, device-mapped host memory
        on a GPU backend. ``np.zeros`` by default.
    """

    def __init__(self, channels: int, row_capacity: int | None = None, job_capacity: int | None = None,
                 alloc: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> None:
        row_capacity = ROW_CAPACITY if row_capacity is None else row_capacity
        job_capacity = JOB_CAPACITY if job_capacity is None else job_capacity
        if not RING_AVAILABLE:
            raise RuntimeError(f"DMA rings are not available here: {RING_ERROR}")
        for name, value in (("channels", channels), ("row_capacity", row_capacity), ("job_capacity", job_capacity)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"RingSet {name} must be an integer >= 1, got {value!r}")
        make = alloc or (lambda shape: np.zeros(shape, dtype=np.int64))
        self.ctl = make((int(channels), CTL_WORDS))
        self.rows = make((int(channels), int(row_capacity), 4))
        self.jobs = make((int(channels), int(job_capacity), 4))
        self.regions = make((MAX_REGIONS + 1, 2))
        #: Serialises publishing on every ring of the set (compiled submissions and channels' own jobs).
        self.lock = threading.Lock()
        #: Called with :attr:`Submitted.jobs` right after a compiled submission published (under :attr:`lock`, so
        #: in publishing order): a consumer that is started per submission (a GPU kernel launch) starts here.
        self.consumer: Callable[[list[list[int]]], None] | None = None
        self.rings = [Ring(self, c) for c in range(int(channels))]
        self._ws = np.empty(0, dtype=np.int64)
        self._wm = np.empty(0, dtype=np.int8)
        self._out = np.empty((int(channels), 4), dtype=np.int64)
        self._jobs_out = self._out[:, :2]  # what a submission hands back, a view made once
        self._known: dict[tuple[int, int], Any] = {}

    @property
    def channels(self) -> int:
        """Channels in the lane."""
        return len(self.rings)

    def register(self, lo: int, hi: int, owner: Any = None) -> None:
        """Let rows touch the bytes ``[lo, hi)`` (a node's frames, a bounce buffer). Idempotent.

        ``owner`` (the frames the range belongs to) is kept alive until :meth:`detach`: memory that is freed
        when its last reference goes (pinned host frames) is then never freed while a job may still point into
        it; the lane detaches only after its consumer has finished.

        Raises
        ------
        InvalidArgument
            An empty range, or the set already holds ``MAX_REGIONS`` ranges.
        """
        lo, hi = int(lo), int(hi)
        if hi <= lo:
            raise InvalidArgument(f"a registered range must hold bytes, got [{lo:#x}, {hi:#x})")
        with self.lock:
            if (lo, hi) in self._known:
                if owner is not None:
                    self._known[(lo, hi)] = owner
                return
            n = int(self.regions[0, 0])
            if n >= MAX_REGIONS:
                raise InvalidArgument(f"a DMA lane registers at most {MAX_REGIONS} memory ranges")
            self.regions[n + 1] = (lo, hi)
            self._known[(lo, hi)] = owner
            _store_word(self.regions[0], 0, n + 1)

    def register_frames(self, frames: np.ndarray) -> None:
        """:meth:`register` the bytes of a C-contiguous frame buffer (kept alive until :meth:`detach`)."""
        self.register(frames.ctypes.data, frames.ctypes.data + frames.nbytes, owner=frames)

    def _grow(self, n: int) -> None:
        """Room in the compiled submission's scratch for ``n`` pages, grown by doubling and reused ever after
        (caller holds :attr:`lock`): ``11 m + 1 + _COUNT_WORDS + 4 channels`` int64 words (the sorted pfns, the
        radix, the runs, the radix's counts, the planner's scratch) and ``m`` method bytes for one ``m >= n``."""
        m = max(n, 2 * self._wm.size)
        self._wm = np.empty(m, dtype=np.int8)
        self._ws = np.empty(11 * m + 1 + _COUNT_WORDS + 4 * self.channels, dtype=np.int64)

    def route(self, src_base: int, dst_base: int, src_addr: int, dst_addr: int, page: int,
              options: PlanOptions, *, src_pages: int = 1 << 62, dst_pages: int = 1 << 62) -> RingRoute:
        """Submissions from one memory to another over these rings (see :class:`RingRoute`)."""
        return RingRoute(self, src_base, dst_base, src_addr, dst_addr, page, options, src_pages=src_pages,
                         dst_pages=dst_pages)

    def detach(self, keep_registered: bool = False) -> None:
        """Move every array into memory of its own (copies), before the memory they were allocated in is freed:
        views held by rings, completions and readers stay valid, with the last values. The registered memory's
        owners are let go unless ``keep_registered`` (a consumer that may still run, whose lane keeps its
        memory)."""
        with self.lock:
            self.ctl, self.rows, self.jobs, self.regions = (a.copy() for a in (self.ctl, self.rows, self.jobs,
                                                                               self.regions))
            if not keep_registered:
                self._known = dict.fromkeys(self._known)  # no job runs any more: the registered memory may go
            for c, ring in enumerate(self.rings):
                ring.ctl, ring.rows, ring.jobs, ring.regions = self.ctl[c], self.rows[c], self.jobs[c], self.regions

    def fail_unfinished(self, jobs: list[list[int]]) -> None:
        """End with :data:`STATUS_FAILED` each job of ``jobs`` (:attr:`Submitted.jobs`: ``[seq, _]`` per channel,
        ``seq`` -1 for none) that its consumer has not finished: a consumer that could not be started."""
        for ring, (seq, _) in zip(self.rings, jobs):
            if seq >= 0 and ring.head <= seq:
                ring.finish(seq + 1, STATUS_FAILED)

    def make_room(self) -> None:
        """Reap every ring (caller does not hold the lock)."""
        with self.lock:
            for ring in self.rings:
                ring.reap()


class RingRoute:
    """Submissions of pages from one memory to another over a :class:`RingSet`: the constant half of the compiled
    call, packed once, so that a submission passes only what changes.

    Page ``p`` of the source is at ``src_addr + (p - src_base) * page``, and the source holds ``src_pages``
    pages (likewise the destination). ``options`` is a :class:`~dmamig.dma.copy_plan.PlanOptions` (batched
    copies never apply here).
    """

    __slots__ = ("_args", "_dst_range", "_set_ctl", "_set_seq", "_set_ws", "_src_range", "_table", "ring_set")

    def __init__(self, ring_set: RingSet, src_base: int, dst_base: int, src_addr: int, dst_addr: int, page: int,
                 options: PlanOptions, *, src_pages: int = 1 << 62, dst_pages: int = 1 << 62) -> None:
        if not isinstance(options, PlanOptions):
            raise InvalidArgument(f"options must be a PlanOptions, got {type(options).__name__}")
        words = np.empty(_ROUTE_WORDS, dtype=np.int64)
        words[R_SRC_BASE], words[R_DST_BASE] = src_base, dst_base
        words[R_SRC_PAGES], words[R_DST_PAGES] = src_pages, dst_pages
        words[R_SRC_ADDR], words[R_DST_ADDR], words[R_PAGE] = src_addr, dst_addr, page
        words[R_SPLIT_MIN], words[R_MEMCPY_MIN] = options.split_min_pages, options.memcpy_min_pages
        self.ring_set = ring_set
        self._args = words
        self._table = ROUTE_LAYOUT.table()
        self._table.set_float(_W_LARGE_FRACTION, float(options.large_run_fraction))
        # The set's arrays the table holds (table(): set again where they moved).
        self._set_ctl = self._set_ws = self._set_seq = None
        self._src_range = (int(src_base), int(src_base) + int(src_pages))
        self._dst_range = (int(dst_base), int(dst_base) + int(dst_pages))

    def covers(self, src_pfn: int, dst_pfn: int) -> bool:
        """Whether the copy of page ``src_pfn`` to ``dst_pfn`` is between this route's memories: a caller's
        cheap look at a submission's first page before it tries the route (the compiled call checks every
        page)."""
        lo, hi = self._src_range
        if not lo <= src_pfn < hi:
            return False
        lo, hi = self._dst_range
        return lo <= dst_pfn < hi

    def table(self, pages: int, write_seq: np.ndarray | None = None) -> ArrayTable:
        """What :func:`submit_table` takes besides the pfns, ``checked`` and the write sequence number, for
        submissions of at most ``pages`` pages stamped in ``write_seq``: the route's table (:data:`ROUTE_LAYOUT`:
        the set's words, rows, job slots, workspace and out words, the route's words, ``write_seq``, the
        large-run fraction). One table per route, kept and set again only where an array moved since (the
        workspace grown, the lane detached) or ``write_seq`` is another; the workspace is grown here. Caller
        holds the set's :attr:`RingSet.lock` while it submits with it."""
        rs = self.ring_set
        if rs._wm.size < pages:
            rs._grow(pages)
        if write_seq is None:
            write_seq = _NO_SEQ
        table = self._table
        if rs.ctl is not self._set_ctl or rs._ws is not self._set_ws or write_seq is not self._set_seq:
            table.set(RT_CTL, (rs.ctl, rs.rows, rs.jobs, self._args, write_seq, rs._ws, rs._wm, rs._out))
            self._set_ctl, self._set_ws, self._set_seq = rs.ctl, rs._ws, write_seq
        return table

    def jobs_published(self) -> list[list[int]]:
        """What the last :func:`submit_pages` published, per channel ``[seq, asleep]`` (as :attr:`Submitted.jobs`);
        hands it to the set's :attr:`RingSet.consumer` where one is started per submission. Caller holds the
        set's lock, right after that submission."""
        rs = self.ring_set
        table = rs._jobs_out.tolist()
        if rs.consumer is not None:
            rs.consumer(table)
        return table

    def submit(self, src_pfns: np.ndarray, dst_pfns: np.ndarray, checked: bool = True,
               write_seq: np.ndarray | None = None, seq: int = 0) -> Submitted | int:
        """Check, plan and publish pages ``src_pfns[i] -> dst_pfns[i]`` (int64) over every channel, in one compiled
        call.

        ``checked``: the caller validated the pfns (distinct destinations, no page both read and written);
        otherwise destinations must be strictly increasing, and the two memories must differ. ``write_seq``:
        stamped with ``seq`` at every destination before anything is published.

        Returns
        -------
        Submitted or int
            What was published, or a ``SUBMIT_*`` code when nothing was.
        """
        rs = self.ring_set
        with rs.lock:
            nr = submit_table(self.table(src_pfns.shape[0], write_seq).words, src_pfns, dst_pfns, checked, seq)
            if nr < 0:
                return nr
            table = rs._jobs_out.tolist()
            if rs.consumer is not None:
                rs.consumer(table)
        return Submitted(nr, table)


def warm_up() -> None:
    """Compile (or load from the cache) the submission now rather than inside a first copy."""
    if not RING_AVAILABLE:
        return
    rs = RingSet(2, row_capacity=8, job_capacity=4)
    src = np.array([3, 1, 2], dtype=np.int64)
    dst = np.array([10, 11, 12], dtype=np.int64)
    got = rs.route(0, 8, 4096, 8192, 64, PlanOptions()).submit(src, dst)
    assert isinstance(got, Submitted)
    external_rows([(np.zeros((2, 64), np.uint8), np.zeros((2, 64), np.uint8), np.zeros(1, np.int64),
                    np.ones(1, np.int64), np.ones(1, np.int64))])
    ring = rs.rings[0]
    ring.publish(JOB_PYTHON)
    ring.finish(ring.tail)
    ring.reap()
    ring.set_idle(False)
    ring.announce_sleepers(0)
