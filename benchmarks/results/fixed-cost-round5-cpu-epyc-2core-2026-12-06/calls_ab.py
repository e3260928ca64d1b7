"""Two lookups by address: ``mm.move_pages`` as a query (where is each of 37 pages of one mapping), median of
2,000 calls, and a device touching 32 MiB of host pages (every page faults, batches of 256), median of six
sweeps after two. ``calls-ab.txt`` ran it beside the commit before (``PYTHONPATH`` pointing at a checkout of it),
alternating."""

import statistics
import time

import numpy as np

from dmamig import Machine
from dmamig.uvm import DeviceAccessor, UvmOptions

with Machine(host_nodes=[(2048, 1.0), (2048, 3.0)], devices=1, device_pages=1024, backend="cpu") as m:
    mm = m.address_space()
    addr = mm.mmap(256 * 4096)
    mm.write(addr, b"x" * (256 * 4096))
    addrs = addr + np.arange(0, 256, 7) * 4096
    times = []
    for _ in range(4000):
        t0 = time.perf_counter_ns()
        mm.move_pages(addrs)
        times.append(time.perf_counter_ns() - t0)
    query_us = statistics.median(times[2000:]) / 1e3

with Machine(host_pages=16384, device_pages=16384, devices=1, backend="cpu", channels=2) as m:
    mm = m.address_space()
    n = 8192
    addr = mm.mmap(n * 4096)
    mm.write(addr, b"x" * (n * 4096))
    sweeps = []
    with DeviceAccessor(mm, 1, UvmOptions(fault_batch_size=256)) as acc:
        for _ in range(8):
            mm.migrate(addr, n * 4096, 0)
            t0 = time.perf_counter_ns()
            acc.touch(addr, n * 4096)
            sweeps.append(time.perf_counter_ns() - t0)
    touch_ms = statistics.median(sweeps[2:]) / 1e6

print(f"move_pages query us {query_us:.2f} device touch of 32 MiB ms {touch_ms:.2f}")
