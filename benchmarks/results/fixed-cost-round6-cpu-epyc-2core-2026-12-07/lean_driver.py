"""Experiment (not a path of dmamig): how much of a 2 MiB folio's batch is the driver's Python around its calls.

``lean`` replaces ``_Migration.migrate_pages_batch`` with a driver that makes only the batch's own calls (the
compiled unmap pass, the DMA submission, the wait, the compiled move pass, the counters and phase times) and
asserts that the common case holds (every folio unmapped and moved in one pass); ``full`` runs dmamig as it is.
Both run ``folios.py no-copy 256`` (a long migration) and print its per-folio time outside the copy. The lean
run's final read-back migrates without an engine, which the lean driver does not handle: only its first line
counts.

    python3 lean_driver.py lean
    python3 lean_driver.py full
"""

import os
import runpy
import sys
import time

import numpy as np

import dmamig.migrate.core as core
from dmamig.migrate import batch_loops
from dmamig.migrate.entries import PENDING


def lean_batch(self, todo, mode, passes, ends_call=True):
    m, e, pages = self.m, self.e, self.m.pages
    pc = time.perf_counter_ns
    t0 = pc()
    vma = self.one_object.vmas[0]
    nd = m.nodes[self.node]
    alloc = nd.allocator
    free, block_free = alloc.arrays()
    rc = np.empty(todo.size, dtype=np.int32)
    listed = np.empty((2, todo.size << e.one_order), dtype=np.int64)
    with m.lock:
        bad, taken, n = batch_loops.unmap_one_vma(
            todo, e.status, PENDING, e.src, e.ints, e.bools, pages.state, e.oid, vma.pgoff, vma.npages,
            vma.pte_pfn, vma.pte_flags, free, block_free, alloc.block, nd.base_pfn, e.one_order, rc, listed)
    assert bad == 0 and taken >= 0
    alloc.taken(taken)
    t1 = pc()
    fence = self.engine.copy(listed[0, :n], listed[1, :n])
    t2 = pc()
    yield
    fence.wait()
    t3 = pc()
    e.fresh[todo] = True
    snd = m.nodes[e.src_node]
    salloc = snd.allocator
    sfree, sbf = salloc.arrays()
    freed = np.empty(n, dtype=np.int64)
    with m.lock:
        nfreed, thp, large, no_copy, dead, nbusy, bad = batch_loops.move_one_vma(
            todo, e.status, e.src, e.ints, e.bools, pages.state, e.oid, self.one_object.pfns, vma.pgoff,
            vma.npages, vma.pte_pfn, vma.pte_flags, rc, freed, sfree, sbf, salloc.block, snd.base_pfn)
        m.changed.notify_all()
    assert nbusy == 0 and bad < 0 and dead == 0
    salloc.taken(-nfreed)
    s = self.stats
    s.nr_succeeded += nfreed
    s.nr_thp_succeeded += thp
    s.nr_large_succeeded += large
    s.nr_no_copy += no_copy
    self.nr_moved_folios += todo.size
    t4 = pc()
    ph = self.phase_ns
    ph["unmap"] += t1 - t0
    ph["submit"] += t2 - t1
    ph["dma_wait"] += t3 - t2
    ph["move"] += t4 - t3


if sys.argv[1] == "lean":
    core._Migration.migrate_pages_batch = lean_batch
sys.argv = ["folios.py", "no-copy", "256"]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "folios.py"), run_name="__main__")
