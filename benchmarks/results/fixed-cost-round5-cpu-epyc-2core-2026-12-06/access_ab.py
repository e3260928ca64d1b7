"""Host access cost: ``mm.read`` of 64 bytes and ``mm.write`` of 64 bytes at random pages of a 1 MiB mapping on
two host tiers, medians of 16,000 reads and 4,000 writes after 2,000 warm-up reads. ``access-ab.txt`` ran it
beside the commit before (``PYTHONPATH`` pointing at a checkout of it), alternating."""

import statistics
import time

import numpy as np

from dmamig import Machine

m = Machine(host_nodes=[(2048, 1.0), (2048, 3.0)], devices=0, backend="cpu")
mm = m.address_space()
addr = mm.mmap(256 * 4096)
mm.write(addr, b"x" * (256 * 4096))
offsets = np.random.default_rng(0).integers(0, 256, 20000) * 4096
for off in offsets[:2000]:
    mm.read(addr + int(off), 64)
reads: list[int] = []
writes: list[int] = []
for i, off in enumerate(offsets):
    t0 = time.perf_counter_ns()
    if i % 5 == 0:
        mm.write(addr + int(off), b"y" * 64)
        writes.append(time.perf_counter_ns() - t0)
    else:
        mm.read(addr + int(off), 64)
        reads.append(time.perf_counter_ns() - t0)
print(f"read us {statistics.median(reads) / 1e3:.2f} write us {statistics.median(writes) / 1e3:.2f}")
m.close()
