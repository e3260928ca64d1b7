"""Host microseconds of one ``m.dma.copy`` submission of 512 pages (bench_submit.py's case: scattered 4 KiB pages,
or one 2 MiB folio) on the CPU backend, for two copies of the package in one process (``dmamig_before``,
``dmamig_now`` under $AB_DIR), in blocks of 400 calls that alternate between them (each fence waited for outside
the timed call). Prints per copy the lowest and the middle block median, and the middle paired difference.

    AB_DIR=/tmp/ab KIND=4k|2m CH=1|4 python3 submit_ab.py
"""
import importlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.environ["AB_DIR"])
kind = os.environ.get("KIND", "4k")
channels = int(os.environ.get("CH", "1"))
blocks = int(os.environ.get("BLOCKS", "9"))
B = 512
rigs = {}
for name in ("dmamig_before", "dmamig_now"):
    pkg = importlib.import_module(name)
    m = pkg.Machine(host_pages=32 * B, device_pages=32 * B, devices=1, backend="cpu", channels=channels)
    rng = np.random.default_rng(0)
    if kind == "4k":
        src, dst = m.alloc_pages(0, B)[rng.permutation(B)], m.alloc_pages(1, B)
    else:
        src, dst = m.pages.expand(m.alloc_pages(0, 1, order=9)), m.pages.expand(m.alloc_pages(1, 1, order=9))
    rigs[name] = (m, src, dst)


def block(name: str, n: int) -> float:
    m, src, dst = rigs[name]
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fence = m.dma.copy(src, dst)
        t1 = time.perf_counter_ns()
        fence.wait()
        out.append(t1 - t0)
    return float(np.median(out)) / 1e3


for name in rigs:
    block(name, 400)
meds: dict[str, list[float]] = {name: [] for name in rigs}
for b in range(blocks):
    for name in (list(rigs) if b % 2 == 0 else list(rigs)[::-1]):
        meds[name].append(block(name, 400))
for m, src, dst in rigs.values():
    assert np.array_equal(m.frames.read_pfns(dst), m.frames.read_pfns(src))
    m.close()
diff = np.median(np.array(meds["dmamig_now"]) - np.array(meds["dmamig_before"]))
print(f"{kind} channels={channels}",
      " ".join(f"{n.split('_')[1]} {min(v):.2f} {sorted(v)[len(v) // 2]:.2f}" for n, v in meds.items()),
      f"paired {diff:+.2f}")
