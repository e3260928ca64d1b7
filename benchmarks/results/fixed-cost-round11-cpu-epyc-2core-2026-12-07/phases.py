"""Per 2 MiB folio of a long migration (32 folios there and back, 400 calls after 100 warm-up calls): the wall
time outside the copy, the fused compiled calls' own time (a wrapper times each call, so every call takes the
compiled function's checked path, not its entry point) and the phase times the call reports. Medians.

    MODE=nocopy|copy python3 phases.py
"""
import os
import time

import numpy as np

from dmamig import Machine
from dmamig.migrate import batch_loops

copying = os.environ.get("MODE") == "copy"
folios, P, ps = 32, 512, 4096
pages = folios * P
real = batch_loops.fused_batch
calls: list[int] = []


def timed(*args):
    t0 = time.perf_counter_ns()
    got = real(*args)
    calls.append(time.perf_counter_ns() - t0)
    return got


batch_loops.fused_batch = timed
with Machine(host_pages=pages + P, device_pages=pages + P, devices=1, backend="cpu", channels=1) as m:
    mm = m.address_space()
    addr = mm.mmap(pages * ps, order=9)
    mm.write(addr, np.random.default_rng(9).integers(0, 256, pages * ps, dtype=np.uint8))
    engine = None if copying else m.dma
    outside, fused, phases = [], [], {}
    for i in range(500):
        calls.clear()
        r = mm.migrate(addr, pages * ps, 1 if i % 2 == 0 else 0, engine=engine)
        if i >= 100:
            outside.append((r.wall_ns - r.phase_ns["copy"] - r.phase_ns["dma_wait"]) / folios)
            fused.append(sum(calls) / folios)
            for k in ("isolate", "unmap", "submit", "move", "putback"):
                phases.setdefault(k, []).append(r.phase_ns[k] / folios)
    print("outside", round(np.median(outside) / 1e3, 2), "fused call", round(np.median(fused) / 1e3, 2),
          {k: round(float(np.median(v)) / 1e3, 2) for k, v in phases.items()})
