"""One process's figure for ``blocks.sh``: 2 MiB folios migrated there and back by ``mm.migrate`` (MODE=copy:
the migrating thread copies; else the DMA engine), FOLIOS folios per call (1: a call of one folio; 32: a long
migration), the wall time outside the copy per folio (copy phase and DMA wait taken out). After 200 warm-up calls,
seven blocks of 300 calls; it prints the lowest and the middle of the seven block medians, so that one of the VM's
slow stretches shows in the second figure and not in the first.

    MODE=nocopy FOLIOS=1 python3 blocks.py
"""
import os

import numpy as np

from dmamig import Machine

copying = os.environ.get("MODE") == "copy"
folios = int(os.environ.get("FOLIOS", "1"))
P, ps = 512, 4096
pages = folios * P
with Machine(host_pages=pages + P, device_pages=pages + P, devices=1, backend="cpu", channels=1) as m:
    mm = m.address_space()
    addr = mm.mmap(pages * ps, order=9)
    data = np.random.default_rng(9).integers(0, 256, pages * ps, dtype=np.uint8)
    mm.write(addr, data)
    engine = None if copying else m.dma

    def block(n: int) -> float:
        out = []
        for i in range(n):
            r = mm.migrate(addr, pages * ps, 1 if i % 2 == 0 else 0, engine=engine)
            assert r.ok
            out.append((r.wall_ns - r.phase_ns["copy"] - r.phase_ns["dma_wait"]) / folios)
        return float(np.median(out)) / 1e3

    block(200)
    meds = sorted(block(300) for _ in range(7))
    assert np.array_equal(mm.read(addr, pages * ps), data)
    print("median outside us", round(meds[0], 2), round(meds[3], 2))
