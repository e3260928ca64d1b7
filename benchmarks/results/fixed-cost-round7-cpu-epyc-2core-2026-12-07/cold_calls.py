"""Measurement (wraps names private to the migration core): a call's own steps run cold after a long migration's
batches. Times ``Entries.steps`` and ``_Migration._count_vmstat`` inside 32-folio 2 MiB no-copy calls, each
timed twice in a row (the second call finds the caches the first one warmed), beside the same steps called in a
loop (hot).

    python3 cold_calls.py
"""
import statistics
import time
import timeit

import numpy as np

from dmamig import Machine
from dmamig.migrate import core

real_steps, real_count = core.Entries.steps, core._Migration._count_vmstat
seen: dict[str, list[tuple[float, float]]] = {"steps": [], "count_vmstat": []}
last = []  # the last call's migration, to time its _count_vmstat hot at the end (it adds to vmstat again)


def twice(name, fn, *args):
    t0 = time.perf_counter_ns()
    got = fn(*args)
    t1 = time.perf_counter_ns()
    if name == "steps":
        fn(*args)  # the same cut again (it writes the same batch numbers)
    t2 = time.perf_counter_ns()
    seen[name].append(((t1 - t0) / 1e3, (t2 - t1) / 1e3))
    return got


core.Entries.steps = lambda self, *a: twice("steps", real_steps, self, *a)
core._Migration._count_vmstat = lambda self: (last.append(self), twice("count_vmstat", real_count, self))[1]
pages, ps = 512 * 32, 4096
m = Machine(host_pages=pages + 512, device_pages=pages + 512, devices=1, backend="cpu", channels=1)
mm = m.address_space()
addr = mm.mmap(pages * ps, order=9)
mm.write(addr, np.ones(pages * ps, np.uint8))
for i in range(40):
    mm.migrate(addr, pages * ps, 1 if i % 2 == 0 else 0, engine=m.dma)
first = statistics.median(a for a, _ in seen["steps"][10:])
again = statistics.median(b for _, b in seen["steps"][10:])
positions = np.arange(32)
with m.lock:
    entries = core.Entries(m, np.unique(m.pages.head[mm.pfns_of(addr, pages * ps)]), None)
hot = timeit.timeit(lambda: real_steps(entries, positions, 512, 1), number=2000) / 2000 * 1e6
with m.lock:
    hot_count = timeit.timeit(lambda: real_count(last[-1]), number=2000) / 2000 * 1e6
print(f"Entries.steps of 32 folios: in the call {first:.1f} us, again right after {again:.1f} us, hot {hot:.1f} us")
print(f"_count_vmstat: in the call {statistics.median(a for a, _ in seen['count_vmstat'][10:]):.1f} us, "
      f"hot {hot_count:.1f} us")
m.close()
