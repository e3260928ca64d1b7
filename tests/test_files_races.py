"""Files racing migration: pwrite, ftruncate, fsync, munmap and close against migrators (copy and no-copy, every
mode) and the flusher, and Ctrl-C inside a migration of file folios. Nothing is lost and, after fsync, the
bytes on disk equal the model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dmamig.migrate.core as core
from dmamig import AddressFault, Machine, MigrateMode, PageFlag
from dmamig.check import check_machine

PS = 4096
NPAGES = 32
MODES = (MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC)


@pytest.mark.parametrize("fs", ["generic", "buffer", "no-callback", "unaudited"])
def test_syscalls_munmap_and_the_flusher_race_migration(fs):
    m = Machine(host_pages=1024, device_pages=1024, devices=2, backend="cpu", channels=2)
    start = [nd.free_pages for nd in m.nodes]
    f = m.open(size=NPAGES * PS, fs=fs)
    model = np.zeros(NPAGES * PS, dtype=np.uint8)
    size = [NPAGES * PS]
    lock = threading.Lock()  # the model's: held while a write, a truncation or a check changes or reads it
    mm = m.address_space()
    a = mm.mmap(NPAGES * PS, file=f, shared=True)
    errors: list[str] = []
    stop = threading.Event()

    def guard(fn):
        def body():
            try:
                fn()
            except BaseException as exc:  # reported by the test
                errors.append(f"{fn.__name__}: {exc!r}")
                stop.set()
        return body

    def writer(seed: int):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            with lock:
                n = int(rng.integers(1, 3 * PS))
                off = int(rng.integers(0, size[0] - n)) if size[0] > n else 0
                n = min(n, size[0] - off)
                if n <= 0:
                    continue
                data = rng.integers(0, 256, n, dtype=np.uint8)
                if rng.random() < 0.5:
                    f.pwrite(data, off)
                else:
                    mm.write(a + off, data)
                model[off: off + n] = data

    def migrator(seed: int):
        rng = np.random.default_rng(seed)
        other = m.address_space()
        b = other.mmap(NPAGES * PS, file=f, shared=True)
        for i in range(150):
            if stop.is_set():
                break
            node, mode = int(rng.integers(3)), MODES[int(rng.integers(3))]
            engine = m.dma if rng.random() < 0.5 else None
            first = int(rng.integers(NPAGES))
            n = int(rng.integers(1, NPAGES - first + 1))
            try:
                res = other.migrate(b + first * PS, n * PS, node, mode=mode, engine=engine, move_all=True)
                assert (res.status <= 0).all()
            except AddressFault:
                pass  # the range is past the end of the file just now
            if i % 25 == 0:  # munmap and map again while others migrate
                other.munmap(b, NPAGES * PS)
                b = other.mmap(NPAGES * PS, file=f, shared=True)
        other.close()

    def truncater():
        for i in range(40):
            with lock:
                new = (NPAGES // 2) * PS + 123 if i % 2 == 0 else NPAGES * PS
                if new < size[0]:
                    model[new:] = 0
                f.ftruncate(new)
                size[0] = new
            assert f.fsync() == 0

    threads = [threading.Thread(target=guard(fn), daemon=True) for fn in
               (lambda: writer(1), lambda: writer(2), lambda: migrator(3), lambda: migrator(4), truncater)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert errors == []
    f.ftruncate(NPAGES * PS)
    model[size[0]:] = 0
    assert np.array_equal(mm.read(a, NPAGES * PS), model)
    assert f.fsync() == 0
    with open(f.path, "rb") as fh:
        assert np.array_equal(np.frombuffer(fh.read(), dtype=np.uint8), model)
    assert check_machine(m) == [] and m.page_cache.check_counters() == []
    f.close()  # the mapping keeps the file
    assert np.array_equal(mm.read(a, NPAGES * PS), model)
    mm.close()
    assert [nd.free_pages for nd in m.nodes] == start
    m.close()


@pytest.mark.parametrize("engine", [False, True])
@pytest.mark.parametrize("phase", ["_unmap_pass", "_move_pass"])
def test_ctrl_c_inside_a_migration_of_file_folios(monkeypatch, phase, engine):
    m = Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu", channels=2)
    m.page_cache.writeback_interval = 3600.0
    n = 3 * 512
    f = m.open(size=n * PS, fs="buffer")
    data = np.random.default_rng(2).integers(0, 256, n * PS, dtype=np.uint8)
    f.pwrite(data, 0)
    mm = m.address_space()
    a = mm.mmap(n * PS, file=f, shared=True)
    mm.populate(a, n * PS)
    calls = []
    real = getattr(core._Migration, phase)

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:  # the second batch, after the first one moved
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(core._Migration, phase, interrupted)
    with pytest.raises(KeyboardInterrupt):
        mm.migrate(a, n * PS, 1, engine=m.dma if engine else None)
    monkeypatch.undo()
    for pfn in mm.pfns_of(a, n * PS).tolist()[::97]:
        assert not m.page_controls.page_flags(pfn) & (PageFlag.LOCKED | PageFlag.ISOLATED)
    assert check_machine(m) == [] and m.page_cache.check_counters() == []
    assert np.array_equal(mm.read(a, n * PS), data)
    assert (mm.migrate(a, n * PS, 1, engine=m.dma if engine else None).status == 0).all()
    assert f.fsync() == 0
    with open(f.path, "rb") as fh:
        assert fh.read() == data.tobytes()
    mm.close()
    f.close()
    assert [nd.free_pages for nd in m.nodes] == [nd.total_pages for nd in m.nodes]
    m.close()
