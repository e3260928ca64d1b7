"""A migration of 2 MiB folios back and forth between the host and a device; per folio, the wall time outside the
copy (the migrating CPU's copy phase and the DMA wait), and each phase, as medians.

    python3 folios.py no-copy 256     # 256 folios per call (a long migration); no-copy: the DMA engine copies
    python3 folios.py copy 1          # one folio per call; copy: the migrating CPU copies
"""

import statistics
import sys

import numpy as np

from dmamig import Machine

mode = sys.argv[1] if len(sys.argv) > 1 else "no-copy"
folios = int(sys.argv[2]) if len(sys.argv) > 2 else 32
PAGES, PS = 512, 4096
pages = folios * PAGES
m = Machine(host_pages=pages + PAGES, device_pages=pages + PAGES, devices=1, backend="cpu", channels=1)
mm = m.address_space()
addr = mm.mmap(pages * PS, order=9)
data = np.random.default_rng(9).integers(0, 256, pages * PS, dtype=np.uint8)
mm.write(addr, data)
engine = m.dma if mode == "no-copy" else None
outside: list[float] = []
phases: dict[str, list[float]] = {}


def rounds(n: int) -> None:
    for i in range(n):
        res = mm.migrate(addr, pages * PS, 1 if i % 2 == 0 else 0, engine=engine)
        assert res.ok
        outside.append((res.wall_ns - res.phase_ns["copy"] - res.phase_ns["dma_wait"]) / folios)
        for k, v in res.phase_ns.items():
            phases.setdefault(k, []).append(v / folios)


rounds(40)  # warm-up
outside.clear()
phases.clear()
rounds(400 // folios * 3)
print(mode, folios, "outside/folio us", statistics.median(outside) / 1e3)
for k, v in phases.items():
    print(" ", k, round(statistics.median(v) / 1e3, 2))
assert np.array_equal(mm.read(addr, pages * PS), data)
m.close()
