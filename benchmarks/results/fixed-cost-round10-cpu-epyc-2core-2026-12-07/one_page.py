"""One process's figure for ``one_page.sh``: a call of one 4 KiB page migrated there and back by ``mm.migrate``
(MODE=copy: the migrating thread copies; else the DMA engine), the wall time outside the copy (copy phase and DMA
wait taken out). After 200 warm-up calls, seven blocks of 300 calls; it prints the lowest and the middle of the
seven block medians.

    MODE=copy python3 one_page.py
"""
import os

import numpy as np

from dmamig import Machine

copying = os.environ.get("MODE") == "copy"
with Machine(host_pages=1024, device_pages=1024, devices=1, backend="cpu", channels=1) as m:
    mm = m.address_space()
    addr = mm.mmap(m.page_size)
    data = np.random.default_rng(9).integers(0, 256, m.page_size, dtype=np.uint8)
    mm.write(addr, data)
    engine = None if copying else m.dma

    def block(n: int) -> float:
        out = []
        for i in range(n):
            r = mm.migrate(addr, m.page_size, 1 if i % 2 == 0 else 0, engine=engine)
            assert r.ok
            out.append(r.wall_ns - r.phase_ns["copy"] - r.phase_ns["dma_wait"])
        return float(np.median(out)) / 1e3

    block(200)
    meds = sorted(block(300) for _ in range(7))
    assert np.array_equal(mm.read(addr, m.page_size), data)
    print("median outside us", round(meds[0], 2), round(meds[3], 2))
