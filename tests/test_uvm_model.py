"""Random device and CPU accesses against a plain-bytes model: no byte lost, no frame leaked."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmamig import DeviceAccessor, Machine, UvmOptions

PS = 4096
NPAGES = 1536  # 1.5x each device

OPS = st.lists(st.tuples(
    st.sampled_from(["dev_read", "dev_write", "dev_pages", "cpu_read", "cpu_write", "migrate", "dev_touch"]),
    st.integers(0, 2),  # device (or node for migrate)
    st.integers(0, NPAGES * PS - 1),  # offset
    st.integers(1, 700 * PS),  # length
    st.integers(0, 2**32 - 1),  # seed
), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, batch=st.sampled_from([16, 256]), prefetch=st.sampled_from(["none", "density"]),
       no_copy=st.booleans(), private=st.booleans(), dup=st.booleans())
def test_random_device_and_cpu_accesses_keep_every_byte(ops, batch, prefetch, no_copy, private, dup):
    with Machine(host_pages=4096, device_pages=1024, devices=2, backend="cpu", channels=2,
                 device_memory="private" if private else "coherent") as m:
        start = [nd.free_pages for nd in m.nodes]
        mm = m.address_space()
        a = mm.mmap(NPAGES * PS)
        model = np.zeros(NPAGES * PS, dtype=np.uint8)
        opts = UvmOptions(fault_batch_size=batch, prefetch=prefetch, no_copy=no_copy, read_duplication=dup)
        devs = [DeviceAccessor(mm, 1, opts), DeviceAccessor(mm, 2, opts)]
        for op, who, off, length, seed in ops:
            length = min(length, NPAGES * PS - off)
            rng = np.random.default_rng(seed)
            dev = devs[who % 2]
            if op == "dev_read":
                assert (dev.read(a + off, length) == model[off: off + length]).all()
            elif op == "cpu_read":
                assert (mm.read(a + off, length) == model[off: off + length]).all()
            elif op in ("dev_write", "cpu_write"):
                buf = rng.integers(0, 256, length, dtype=np.uint8)
                (dev.write if op == "dev_write" else mm.write)(a + off, buf)
                model[off: off + length] = buf
            elif op == "dev_pages":
                idx = rng.integers(0, NPAGES, 1 + length // PS // 4)
                rows = rng.integers(0, 256, (idx.size, PS), dtype=np.uint8)
                assert (dev.read_pages(a + idx * PS) == model.reshape(NPAGES, PS)[idx]).all()
                dev.write_pages(a + idx * PS, rows)
                model.reshape(NPAGES, PS)[idx] = rows
            elif op == "dev_touch":
                dev.touch(a + off, length, write=bool(seed & 1))
            else:
                p0 = off // PS
                npg = min(-(-length // PS), NPAGES - p0)
                mm.migrate(a + p0 * PS, npg * PS, who, engine=m.dma if no_copy else None)
        assert (mm.read(a, NPAGES * PS) == model).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == start
