"""A device accessing a range while the CPU reads, writes and migrates it on another thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dmamig import DeviceAccessor, Machine, UvmOptions

PS = 4096


@pytest.mark.parametrize("dup", [False, True], ids=["migrate", "read-duplication"])
def test_device_and_cpu_threads_on_one_range(dup):
    with Machine(host_pages=4096, device_pages=768, devices=1, backend="cpu", channels=2) as m:
        mm = m.address_space()
        n = 1024  # more than the device holds: evictions race with the CPU's migrations
        a = mm.mmap(n * PS)
        # The device owns the even pages' contents, the CPU the odd ones; both read everything.
        data = np.random.default_rng(0).integers(0, 256, (n, PS), dtype=np.uint8)
        mm.write(a, data.reshape(-1))
        even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
        errors: list[BaseException] = []
        acc = DeviceAccessor(mm, 1, UvmOptions(fault_batch_size=64, read_duplication=dup))

        def device():
            try:
                rng = np.random.default_rng(1)
                for r in range(12):
                    rows = rng.integers(0, 256, (even.size, PS), dtype=np.uint8)
                    acc.write_pages(a + even * PS, rows)
                    data[even] = rows
                    got = acc.read_pages(a + even * PS)
                    assert (got == rows).all(), f"round {r}: device read back other bytes"
                    acc.touch(a, n * PS)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        def cpu():
            try:
                rng = np.random.default_rng(2)
                for r in range(12):
                    rows = rng.integers(0, 256, (odd.size, PS), dtype=np.uint8)
                    for i, p in enumerate(odd[:64].tolist()):
                        mm.write(a + p * PS, rows[i])
                    data[odd[:64]] = rows[:64]
                    got = mm.read(a, n * PS).reshape(n, PS)
                    assert (got[odd] == data[odd]).all(), f"round {r}: CPU read back other bytes"
                    mm.migrate(a, n * PS, 0, engine=m.dma if r % 2 else None)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=device), threading.Thread(target=cpu)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a thread is stuck"
        assert not errors, errors[0]
        assert (mm.read(a, n * PS).reshape(n, PS) == data).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [4096, 768]
