"""A call of one batch of 512 base pages (each its own 4 KiB folio), there and back: the wall time outside the
copy, the lowest and the middle of five block medians (300 calls each, after 200 warm-up calls).

    MODE=nocopy|copy python3 batch_4k.py
"""
import os

import numpy as np

from dmamig import Machine

copying = os.environ.get("MODE") == "copy"
P, ps = 512, 4096
with Machine(host_pages=2 * P, device_pages=2 * P, devices=1, backend="cpu", channels=1) as m:
    mm = m.address_space()
    addr = mm.mmap(P * ps)
    data = np.random.default_rng(9).integers(0, 256, P * ps, dtype=np.uint8)
    mm.write(addr, data)
    engine = None if copying else m.dma

    def block(n: int) -> float:
        out = []
        for i in range(n):
            r = mm.migrate(addr, P * ps, 1 if i % 2 == 0 else 0, engine=engine)
            out.append(r.wall_ns - r.phase_ns["copy"] - r.phase_ns["dma_wait"])
        return float(np.median(out)) / 1e3

    block(200)
    meds = sorted(block(300) for _ in range(5))
    assert np.array_equal(mm.read(addr, P * ps), data)
    print("4k batch outside", round(meds[0], 2), round(meds[2], 2))
