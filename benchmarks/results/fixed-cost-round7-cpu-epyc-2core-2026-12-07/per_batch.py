"""Measurement (wraps names private to the migration core and the engine; changes nothing they do): where a
fused batch's time goes in a long 2 MiB migration of 32 folios, per folio: the compiled fused call (with the
phases its clock reads, and what the same call costs with nothing to do: its arguments), the wait for its DMA
copy (or the migrating thread's copy), the Python of the fused loop around them, and the rest of the call
(validation, collection, entries, result: the call's own cost, spread over its folios).

    python3 per_batch.py            # no-copy
    python3 per_batch.py copy       # copy mode
"""
import sys
import time

import numpy as np

from dmamig import Machine
from dmamig.dma.engine import RingBatches
from dmamig.migrate import batch_loops, core

copying = "copy" in sys.argv
acc = {"fused": 0, "wait": 0, "steps": 0, "empty": 0}
NONE = np.empty(0, dtype=np.int64)
real_fused, real_wait, real_steps = batch_loops.fused_batch, RingBatches.wait, core._Migration._fused_steps


def fused(*args):
    t = time.perf_counter_ns()
    real_fused(NONE, NONE, *args[2:])  # nothing to move or unmap: the cost of the call and its arguments
    t1 = time.perf_counter_ns()
    got = real_fused(*args)
    acc["fused"] += time.perf_counter_ns() - t1
    acc["empty"] += t1 - t
    return got


def wait(self):
    t = time.perf_counter_ns()
    real_wait(self)
    acc["wait"] += time.perf_counter_ns() - t


def steps(self, *args):
    t = time.perf_counter_ns()
    got = real_steps(self, *args)
    acc["steps"] += time.perf_counter_ns() - t
    return got


phases = dict.fromkeys(("unmap", "submit", "move"), 0)


batch_loops.fused_batch, RingBatches.wait, core._Migration._fused_steps = fused, wait, steps
folios, pages_per_folio, ps = 32, 512, 4096
pages = folios * pages_per_folio
m = Machine(host_pages=pages + pages_per_folio, device_pages=pages + pages_per_folio, devices=1, backend="cpu",
            channels=1)
mm = m.address_space()
addr = mm.mmap(pages * ps, order=9)
data = np.random.default_rng(9).integers(0, 256, pages * ps, dtype=np.uint8)
mm.write(addr, data)
wall = copy_ns = 0
warm, calls = 50, 100
for i in range(warm + calls):
    if i == warm:
        acc = dict.fromkeys(acc, 0)
        phases = dict.fromkeys(phases, 0)
        wall = copy_ns = 0
    res = mm.migrate(addr, pages * ps, 1 if i % 2 == 0 else 0, engine=None if copying else m.dma)
    assert res.ok
    wall += res.wall_ns
    copy_ns += res.phase_ns["copy"]
    for name in phases:
        phases[name] += res.phase_ns[name]
assert np.array_equal(mm.read(addr, pages * ps), data)
n = calls * folios
copied = copy_ns if copying else acc["wait"]
# (the empty calls run inside the fused loop: taken out of its Python share)
print(f"{'copy' if copying else 'no-copy'}, per folio: fused call {acc['fused'] / n / 1e3:.2f} us ("
      + ", ".join(f"{k} {v / n / 1e3:.2f}" for k, v in phases.items()) + f"; the same call empty "
      f"{acc['empty'] / n / 1e3:.2f}); {'copy' if copying else 'DMA wait'} {copied / n / 1e3:.2f} us; the fused "
      f"loop's Python {(acc['steps'] - acc['fused'] - acc['empty'] - copied) / n / 1e3:.2f} us; the rest of the "
      f"call {(wall - acc['steps']) / n / 1e3:.2f} us")
m.close()
