"""Where a call that migrates one 2 MiB folio goes (public results only): per block of 300 alternating calls, the
median of the wall time outside the copy (copy phase and DMA wait taken out) and of each phase the result
records, in microseconds; twelve blocks, so that the VM's slow stretches show as whole blocks.

    python3 single_call.py            # no-copy (the DMA engine copies)
    python3 single_call.py copy       # copy mode (the migrating thread copies)
"""
import sys

import numpy as np

from dmamig import Machine

copying = "copy" in sys.argv[1:]
P, ps = 512, 4096
names = ("isolate", "unmap", "submit", "move", "putback")
with Machine(host_pages=2 * P, device_pages=2 * P, devices=1, backend="cpu", channels=1) as m:
    mm = m.address_space()
    addr = mm.mmap(P * ps, order=9)
    data = np.random.default_rng(9).integers(0, 256, P * ps, dtype=np.uint8)
    mm.write(addr, data)
    print(f"{'copy' if copying else 'no-copy'}: outside " + " ".join(f"{n:>7s}" for n in names)
          + "  (us, median of each block)")
    for blk in range(13):
        rows = []
        for i in range(300):
            r = mm.migrate(addr, P * ps, 1 if i % 2 == 0 else 0, engine=None if copying else m.dma)
            assert r.ok
            ph = r.phase_ns
            rows.append([r.wall_ns - ph["copy"] - ph["dma_wait"]] + [ph[n] for n in names])
        if blk:  # the first block warms up (compiles, caches)
            print(" " * (9 if copying else 12) + " ".join(f"{x:7.1f}" for x in np.median(np.array(rows), axis=0) / 1e3))
    assert np.array_equal(mm.read(addr, P * ps), data)
