"""Wall time outside the copy per folio of ``mm.migrate`` calls, for two copies of the package in one process
(``before`` and ``now``: the packages ``dmamig_before`` and ``dmamig_now`` under $AB_DIR, see run_all.sh), in
blocks that alternate between them, so that the VM's slow and fast stretches fall on both alike.

MODE=copy: the migrating thread copies; else the DMA engine. FOLIOS folios of ORDER 9 (2 MiB) per call, or with
ORDER 0 FOLIOS batches of 512 base pages (4 KiB folios), there and back; figures per folio (per batch). After 200 warm-up calls each, BLOCKS blocks of 300 calls each;
it prints, per copy, the lowest and the middle block median, and the middle of the paired differences
(now - before, block by block).

    AB_DIR=/tmp/ab MODE=nocopy FOLIOS=32 ORDER=9 python3 migrate_ab.py
"""
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.environ["AB_DIR"])
copying = os.environ.get("MODE") == "copy"
folios = int(os.environ.get("FOLIOS", "1"))
order = int(os.environ.get("ORDER", "9"))
blocks = int(os.environ.get("BLOCKS", "9"))
ps = 4096
pages = folios << order if order else folios * 512
per = folios  # figures per 2 MiB folio, or per batch of 512 base pages
rigs = {}
for name in ("dmamig_before", "dmamig_now"):
    pkg = importlib.import_module(name)
    m = pkg.Machine(host_pages=pages + 512, device_pages=pages + 512, devices=1, backend="cpu", channels=1)
    mm = m.address_space()
    addr = mm.mmap(pages * ps, order=order)
    data = np.random.default_rng(9).integers(0, 256, pages * ps, dtype=np.uint8)
    mm.write(addr, data)
    rigs[name] = (m, mm, addr, data, None if copying else m.dma)


def block(name: str, n: int) -> float:
    m, mm, addr, data, engine = rigs[name]
    out = []
    for i in range(n):
        r = mm.migrate(addr, pages * ps, 1 if i % 2 == 0 else 0, engine=engine)
        assert r.ok
        out.append((r.wall_ns - r.phase_ns["copy"] - r.phase_ns["dma_wait"]) / per)
    return float(np.median(out)) / 1e3


for name in rigs:
    block(name, 200)
meds: dict[str, list[float]] = {name: [] for name in rigs}
for b in range(blocks):
    for name in (list(rigs) if b % 2 == 0 else list(rigs)[::-1]):
        meds[name].append(block(name, 300))
for m, mm, addr, data, _engine in rigs.values():
    assert np.array_equal(mm.read(addr, pages * ps), data)
    m.close()
diff = np.median(np.array(meds["dmamig_now"]) - np.array(meds["dmamig_before"]))
print(os.environ.get("MODE", "nocopy"), f"folios={folios} order={order}",
      " ".join(f"{n.split('_')[1]} {min(v):.2f} {sorted(v)[len(v) // 2]:.2f}" for n, v in meds.items()),
      f"paired {diff:+.2f}")
