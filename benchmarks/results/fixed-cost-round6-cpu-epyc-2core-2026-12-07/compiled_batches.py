"""Experiment (not a path of dmamig): a long 2 MiB no-copy migration whose batches run in compiled code, to
measure what a batch costs when little or no Python runs between its phases. It reaches into the engine's ring
route, the ring's compiled submission, the CPU consumer's compiled poll and the page array's write sequence (names
private to them) because the path it measures does not exist yet; counters and engine accounting are left out, the
bytes are checked at the end.

- ``held``: one compiled loop runs every batch of the call (unmap pass, ring submission, poll for the job, move
  pass) with the machine lock held throughout, the DMA waits included: the floor, but not dmamig's lock
  discipline (other threads get the lock while a batch's copy runs).
- ``fused``: per batch, one compiled call under the lock (the move pass of the batch before, then the unmap pass
  and the submission of this one), and the wait for the copy outside the lock, as dmamig's batches do.

    python3 compiled_batches.py held      # per folio: the loop, and the whole call, outside the DMA waits
    python3 compiled_batches.py fused
"""
import itertools
import statistics
import sys
import time

import numpy as np
from numba import njit

import dmamig.migrate.core as core
from dmamig import Machine
from dmamig.backends.cpu import ring_consumer as RC
from dmamig.backends.cpu.spin import now_ns
from dmamig.dma import ring as R
from dmamig.migrate import batch_loops
from dmamig.migrate.entries import PENDING

unmap_one_vma = batch_loops.unmap_one_vma
move_one_vma = batch_loops.move_one_vma
submit_pages = R._submit_pages
poll_status = RC._poll_status


@njit(nogil=True)
def loop(start, stop, status, src, ints, bools, state, oid, pgoff, npages, pte_pfn, pte_flags, tfree, tbf, block,
         tbase, order, sfree, sbf, sbase, obj_pfns, ctl, rows, jobs, rctl, rjobs, route, lf, write_seq, seq, ws, wm,
         out, wait, counts, pending):
    ts = np.empty(2, dtype=np.int64)
    rc = np.empty(1, dtype=np.int32)
    pos = np.empty(1, dtype=np.int64)
    listed = np.empty((2, 1 << order), dtype=np.int64)
    freed = np.empty(1 << order, dtype=np.int64)
    fresh = bools[1]
    for i in range(start, stop):
        pos[0] = i
        if pending >= 0:  # this batch was submitted before the caller woke the consumer
            job = pending
            pending = -1
        else:
            bad, taken, n = unmap_one_vma(pos, status, PENDING, src, ints, bools, state, oid, pgoff, npages,
                                          pte_pfn, pte_flags, tfree, tbf, block, tbase, order, rc, listed)
            if bad or taken < 0:
                return i, 1, -1
            counts[0] += taken
            nr = submit_pages(ctl, rows, jobs, listed[0, :n], listed[1, :n], route, lf, True, write_seq, seq + i,
                              ws, wm, out)
            if nr < 0:
                return i, 2, -1
            job = out[0, 0]
            if out[0, 1]:
                return i, 3, job  # consumer asleep: the caller wakes it, then this batch goes on from its wait
        t1 = now_ns(ts)
        st = poll_status(rctl, rjobs, job, 10 ** 9, ts)
        t2 = now_ns(ts)
        if st != 1:  # STATUS_OK
            return i, 4, st
        fresh[i] = True
        nfreed, thp, large, no_copy, dead, nbusy, bad = move_one_vma(
            pos, status, src, ints, bools, state, oid, obj_pfns, pgoff, npages, pte_pfn, pte_flags, rc, freed, sfree,
            sbf, block, sbase)
        if nbusy or bad >= 0 or dead:
            return i, 5, -1
        counts[1] += nfreed
        wait[0] += t2 - t1
    return stop, 0, -1


def _prepare(mig):
    """What both drivers take from a call: its VMA, the two nodes and their allocator arrays, the node pair's ring
    route (opened by a general-path copy first), and the write sequence its copies are stamped from."""
    e, m = mig.e, mig.m
    vma = mig.one_object.vmas[0]
    tn, sn = m.nodes[mig.node], m.nodes[e.src_node]
    ta, sa = tn.allocator, sn.allocator
    tfree, tbf = ta.arrays()
    sfree, sbf = sa.arrays()
    route, lane, _differ = mig.engine._routes[(e.src_node, mig.node)]
    rs = route.ring_set
    if rs._wm.size < 512:
        rs._grow(512)
    return vma, tn, sn, ta, sa, tfree, tbf, sfree, sbf, route, lane, rs, rs.rings[0], m.pages.next_write_seq() + 1


def _settle(mig, n, seq, counts, rs, ta, sa):
    """After a call's n folios: later writes stay newer than these copies, the rings are reaped, the allocators
    count what the compiled passes took and gave back, and the call counts its folios."""
    mig.m.pages._seq = itertools.count(seq + n + 1)
    rs.make_room()
    ta.taken(int(counts[0]))
    sa.taken(-int(counts[1]))
    mig.stats.nr_succeeded += int(counts[1])
    mig.nr_moved_folios += n


per_folio: list[tuple[float, float]] = []  # per call and folio: the DMA wait, the batches outside their waits


@njit(nogil=True)
def fused(i, stop, status, src, ints, bools, state, oid, pgoff, npages, pte_pfn, pte_flags, tfree, tbf, block,
          tbase, order, sfree, sbf, sbase, obj_pfns, ctl, rows, jobs, route, lf, write_seq, seq, ws, wm, out,
          counts, rc, pos, listed, freed):
    """Under the lock: the move pass of batch i-1 (its copy done), then the unmap pass and the submission of
    batch i. Returns (why, job)."""
    fresh = bools[1]
    if i > 0:
        pos[0] = i - 1
        fresh[i - 1] = True
        nfreed, thp, large, no_copy, dead, nbusy, bad = move_one_vma(
            pos, status, src, ints, bools, state, oid, obj_pfns, pgoff, npages, pte_pfn, pte_flags, rc, freed, sfree,
            sbf, block, sbase)
        if nbusy or bad >= 0 or dead:
            return 5, -1
        counts[1] += nfreed
    if i == stop:
        return 0, -1
    pos[0] = i
    bad, taken, n = unmap_one_vma(pos, status, PENDING, src, ints, bools, state, oid, pgoff, npages, pte_pfn,
                                  pte_flags, tfree, tbf, block, tbase, order, rc, listed)
    if bad or taken < 0:
        return 1, -1
    counts[0] += taken
    nr = submit_pages(ctl, rows, jobs, listed[0, :n], listed[1, :n], route, lf, True, write_seq, seq + i, ws, wm,
                      out)
    if nr < 0:
        return 2, -1
    return (3 if out[0, 1] else 0), out[0, 0]


def fused_migrate_pages(self, positions):
    e, m = self.e, self.m
    vma, tn, sn, ta, sa, tfree, tbf, sfree, sbf, route, lane, rs, ring, seq = _prepare(self)
    counts = np.zeros(2, dtype=np.int64)
    rc = np.empty(1, dtype=np.int32)
    pos = np.empty(1, dtype=np.int64)
    listed = np.empty((2, 1 << e.one_order), dtype=np.int64)
    freed = np.empty(1 << e.one_order, dtype=np.int64)
    ts = np.empty(2, dtype=np.int64)
    waits = 0
    t_all = time.perf_counter_ns()
    n = positions.size
    for i in range(n + 1):
        with m.lock:
            why, job = fused(i, n, e.status, e.src, e.ints, e.bools, m.pages.state, e.oid, vma.pgoff, vma.npages,
                             vma.pte_pfn, vma.pte_flags, tfree, tbf, ta.block, tn.base_pfn, e.one_order, sfree, sbf,
                             sn.base_pfn, self.one_object.pfns, rs.ctl, rs.rows, rs.jobs, route._args,
                             route._large_fraction, m.pages.write_seq, seq, rs._ws, rs._wm, rs._out, counts, rc, pos,
                             listed, freed)
            m.changed.notify_all()
        if i == n:
            break
        if why == 2:  # the unmap pass ran: the experiment does not retry its submission (rings are made room for)
            raise AssertionError("ring full")
        if why == 3:
            lane[0].wake()
        assert why in (0, 3), why
        t0 = time.perf_counter_ns()
        st = poll_status(ring.ctl, ring.jobs, job, 10 ** 9, ts)
        waits += time.perf_counter_ns() - t0
        assert st == 1, st
        if i % 32 == 31:
            rs.make_room()
    wall = time.perf_counter_ns() - t_all
    _settle(self, n, seq, counts, rs, ta, sa)
    per_folio.append((waits / n, (wall - waits) / n))


def compiled_migrate_pages(self, positions):
    e, m = self.e, self.m
    vma, tn, sn, ta, sa, tfree, tbf, sfree, sbf, route, lane, rs, ring, seq = _prepare(self)
    wait = np.zeros(1, dtype=np.int64)
    counts = np.zeros(2, dtype=np.int64)
    pending = -1
    i = 0
    t_all = time.perf_counter_ns()
    with m.lock:
        while i < positions.size:
            i, why, pending = loop(i, positions.size, e.status, e.src, e.ints, e.bools, m.pages.state, e.oid, vma.pgoff,
                          vma.npages, vma.pte_pfn, vma.pte_flags, tfree, tbf, ta.block, tn.base_pfn, e.one_order,
                          sfree, sbf, sn.base_pfn, self.one_object.pfns, rs.ctl, rs.rows, rs.jobs, ring.ctl,
                          ring.jobs, route._args, route._large_fraction, m.pages.write_seq, seq, rs._ws, rs._wm,
                          rs._out, wait, counts, pending)
            if why == 2:
                rs.make_room()
                continue
            if why == 3:
                lane[0].wake()
                continue
            assert why == 0, (why, pending, i)
    wall = time.perf_counter_ns() - t_all
    _settle(self, positions.size, seq, counts, rs, ta, sa)
    per_folio.append((wait[0] / positions.size, (wall - wait[0]) / positions.size))


if __name__ == "__main__":
    folios = 256
    PAGES, PS = 512, 4096
    pages = folios * PAGES
    m = Machine(host_pages=pages + PAGES, device_pages=pages + PAGES, devices=1, backend="cpu", channels=1)
    mm = m.address_space()
    addr = mm.mmap(pages * PS, order=9)
    data = np.random.default_rng(9).integers(0, 256, pages * PS, dtype=np.uint8)
    mm.write(addr, data)
    for node in (1, 0):  # the general path opens the lanes and the routes
        assert mm.migrate(addr, pages * PS, node, engine=m.dma).ok
    FUSED = sys.argv[1] == "fused"
    core._Migration.migrate_pages = fused_migrate_pages if FUSED else compiled_migrate_pages
    outside = []
    for i in range(24):
        res = mm.migrate(addr, pages * PS, 1 if i % 2 == 0 else 0, engine=m.dma)
        assert res.ok, res.status
        outside.append((res.wall_ns - per_folio[-1][0] * folios) / folios)
    assert np.array_equal(mm.read(addr, pages * PS), data)  # (device -> host read migrates through the loop too)
    k = len(per_folio) // 4
    print(f"{sys.argv[1]}, per folio: wait {statistics.median(p[0] for p in per_folio[k:]) / 1e3:.2f} us, "
          f"the batches outside their waits "
          f"{statistics.median(p[1] for p in per_folio[k:]) / 1e3:.2f} us; the whole call outside its waits "
          f"{statistics.median(outside[k:]) / 1e3:.2f} us per folio")
    m.close()
