"""Concurrency: accessors hammer pages while other threads migrate them; races with munmap, close and fork.

Every test is bounded by operation counts, never by time; joins carry a generous timeout only so that a
deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
from support import finish_within

import dmamig.migrate.batch_loops as batch_loops
import dmamig.migrate.core as core
from dmamig import AddressFault, InvalidArgument, MigrateMode, MigrateVma, PageFlag

HOST = DEV = 2048
WAIT = 60.0
MODES = [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]
EAGAIN, EBUSY, ENOMEM = -errno.EAGAIN, -errno.EBUSY, -errno.ENOMEM


def engine_or_skip(m, use_engine: bool):
    if not use_engine:
        return None
    pytest.importorskip("dmamig.dma")
    return m.dma


class Crew:
    """Threads that each run a bounded body; the first exception is re-raised by ``join``."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def add(self, fn, *args) -> None:
        def body():
            try:
                fn(*args)
            except BaseException as exc:  # re-raised by join
                self.errors.append(exc)

        self.threads.append(threading.Thread(target=body, daemon=True))

    def run(self) -> None:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + WAIT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self.threads if t.is_alive()]
        assert not stuck, f"{len(stuck)} threads did not finish: a deadlock or a lost wakeup"
        if self.errors:
            raise self.errors[0]


def stamp(ps: int, owner: int, seq: int) -> np.ndarray:
    """A page filled with one 8-byte word that names its writer and sequence number."""
    return np.full(ps // 8, (seq << 8) | owner, dtype=np.int64).view(np.uint8)


def unstamp(page: np.ndarray) -> tuple[int, int]:
    words = page.view(np.int64)
    assert (words == words[0]).all(), "a torn page: two writes mixed in one page"
    v = int(words[0])
    return v & 0xFF, v >> 8


@pytest.mark.parametrize("use_engine", [False, True], ids=["copy", "no-copy"])
def test_accessors_and_migrators_never_lose_a_byte(m, use_engine):
    engine = engine_or_skip(m, use_engine)
    ps = m.page_size
    mm = m.address_space()
    npriv, nshared = 48, 16
    priv = mm.mmap(npriv * ps)
    shared = mm.mmap(nshared * ps, shared=True)
    # page i is written only by writer i % writers; a page's address: (space, addr)
    pages = [(mm, priv + i * ps) for i in range(npriv)] + [(mm, shared + i * ps) for i in range(nshared)]
    writers, writes = 3, 120
    last = [0] * len(pages)
    for i, (space, addr) in enumerate(pages):
        space.write(addr, stamp(ps, i % writers, 0))
    child = mm.fork()  # maps the shared pages too
    crew = Crew()

    def writer(w: int) -> None:
        rng = np.random.default_rng(100 + w)
        mine = [i for i in range(len(pages)) if i % writers == w]
        for seq in range(1, writes + 1):
            i = int(rng.choice(mine))
            space, addr = pages[i]
            if i >= npriv and rng.random() < 0.5:
                space = child  # the child maps the shared pages too
            space.write(addr, stamp(ps, w, seq))
            last[i] = seq
            owner, got = unstamp(space.read(addr, ps))
            assert (owner, got) == (w, seq), "a write was not read back by its writer"

    def reader(r: int) -> None:
        rng = np.random.default_rng(200 + r)
        seen = [0] * len(pages)
        for _ in range(150):
            lo = int(rng.integers(0, npriv - 4))
            data = mm.read(priv + lo * ps, 4 * ps).reshape(4, ps)
            for k in range(4):
                owner, seq = unstamp(data[k])
                assert owner == (lo + k) % writers
                assert seq >= seen[lo + k], "a page went back in time: a migration lost a write"
                seen[lo + k] = seq
            j = int(rng.integers(0, nshared))
            owner, seq = unstamp(child.read(shared + j * ps, ps))
            assert owner == (npriv + j) % writers and seq >= seen[npriv + j]
            seen[npriv + j] = seq

    def migrator(k: int) -> None:
        rng = np.random.default_rng(300 + k)
        for _ in range(40):
            node = int(rng.integers(0, 3))
            mode = MODES[int(rng.integers(0, 3))]
            if rng.random() < 0.7:
                first = int(rng.integers(0, npriv))
                count = int(rng.integers(1, npriv - first + 1))
                # Private pages are shared copy-on-write with the child until written: move them all.
                res = mm.migrate(priv + first * ps, count * ps, node, mode=mode, engine=engine, move_all=True)
            else:
                # The shared pages are mapped by both processes: MPOL_MF_MOVE_ALL is needed to move them.
                res = child.migrate(shared, nshared * ps, node, mode=mode, engine=engine, move_all=True)
            assert set(np.unique(res.status).tolist()) <= {0, EAGAIN, EBUSY}

    def driver() -> None:
        rng = np.random.default_rng(400)
        for _ in range(15):
            first = int(rng.integers(0, npriv - 8))
            mv = MigrateVma(mm, priv + first * ps, priv + (first + 8) * ps, int(rng.integers(1, 3)))
            mv.setup()
            mv.alloc_and_copy(engine=engine)
            mv.pages()
            mv.finalize()
            assert set(np.unique(mv.status).tolist()) <= {0, EAGAIN, EBUSY}

    def prodder() -> None:
        rng = np.random.default_rng(500)
        for _ in range(100):
            i = int(rng.integers(0, npriv))
            pfn = int(mm.vmas[0].pte_pfn[i])  # a speculative lookup: the page may move or go meanwhile
            try:
                m.page_controls.get_page(pfn)
            except InvalidArgument:
                continue  # freed since it was looked up
            time.sleep(0)
            m.page_controls.put_page(pfn)

    def pinner() -> None:
        rng = np.random.default_rng(600)
        for _ in range(40):
            first = int(rng.integers(0, npriv - 3))
            mm.pin(priv + first * ps, 3 * ps)
            time.sleep(0)
            mm.unpin(priv + first * ps, 3 * ps)

    for w in range(writers):
        crew.add(writer, w)
    crew.add(pinner)
    for r in range(2):
        crew.add(reader, r)
    for k in range(2):
        crew.add(migrator, k)
    crew.add(driver)
    crew.add(prodder)
    crew.run()

    for i, (space, addr) in enumerate(pages):
        assert unstamp(space.read(addr, ps)) == (i % writers, last[i])
    assert sum(n.total_pages - n.free_pages for n in m.nodes) == 2 * npriv + nshared  # the child copied priv
    finish_within(child.close, "close", WAIT)
    finish_within(mm.close, "close", WAIT)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


@pytest.mark.parametrize("use_engine", [False, True], ids=["copy", "no-copy"])
def test_two_migrators_on_the_same_pages(m, use_engine):
    engine = engine_or_skip(m, use_engine)
    ps = m.page_size
    mm = m.address_space()
    addr = mm.mmap(256 * ps)
    data = np.random.default_rng(1).integers(0, 256, 256 * ps, dtype=np.uint8)
    mm.write(addr, data)
    crew = Crew()

    def mover(node: int) -> None:
        for _ in range(15):
            res = mm.migrate(addr, 256 * ps, node, mode=MigrateMode.SYNC, engine=engine)
            assert set(np.unique(res.status).tolist()) <= {0, EBUSY}
            res = mm.migrate(addr, 256 * ps, 0, mode=MigrateMode.ASYNC, engine=engine)
            assert set(np.unique(res.status).tolist()) <= {0, EBUSY, EAGAIN}

    crew.add(mover, 1)
    crew.add(mover, 2)
    crew.run()
    assert np.array_equal(mm.read(addr, 256 * ps), data)
    finish_within(mm.close, "close", WAIT)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_fork_during_migrations_copies_consistent_content(m):
    ps = m.page_size
    mm = m.address_space()
    addr = mm.mmap(128 * ps)
    data = np.random.default_rng(2).integers(0, 256, 128 * ps, dtype=np.uint8)
    mm.write(addr, data)
    crew = Crew()

    def mover() -> None:
        for i in range(30):
            mm.migrate(addr, 128 * ps, (1, 2, 0)[i % 3], mode=MODES[i % 3])

    def forker() -> None:
        for _ in range(10):
            child = mm.fork()
            assert np.array_equal(child.read(addr, 128 * ps), data)
            child.close()

    crew.add(mover)
    crew.add(forker)
    crew.run()
    finish_within(mm.close, "close", WAIT)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("how", ["munmap", "close"])
def test_mapping_removed_while_a_migration_waits_for_a_page_lock(m, shared, how):
    ps = m.page_size
    mm = m.address_space()
    addr = mm.mmap(4 * ps, shared=shared)
    mm.write(addr, np.ones(4 * ps, np.uint8))
    pfn = mm.pfn_of(addr)
    m.page_controls.lock_page(pfn)
    out: dict = {}

    def migrate() -> None:
        out["res"] = mm.migrate(addr, 4 * ps, 1, mode=MigrateMode.SYNC)

    crew = Crew()
    crew.add(migrate)
    crew.threads[0].start()
    deadline = time.monotonic() + WAIT
    # Wait until the other pages moved: the locked page is isolated and waited for alone.
    while not (PageFlag.ISOLATED in m.page_controls.page_flags(pfn) and mm.node_of(addr + 3 * ps) == 1):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    if how == "munmap":
        mm.munmap(addr, 4 * ps)
    else:
        mm.close()
    m.page_controls.unlock_page(pfn)
    crew.threads = crew.threads[:1]
    crew.threads[0].join(WAIT)
    assert not crew.threads[0].is_alive()
    if crew.errors:
        raise crew.errors[0]
    assert out["res"].status[1:].tolist() == [0, 0, 0]
    finish_within(mm.close, "close", WAIT)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_pinned_page_munmapped_between_passes(m, monkeypatch):
    # The munmap lands between the general path's unmap passes (a fused batch makes the first in its own
    # compiled call).
    monkeypatch.setattr(batch_loops, "fused_batch", None)
    ps = m.page_size
    mm = m.address_space()
    addr = mm.mmap(2 * ps)
    mm.write(addr, b"pinned")
    mm.pin(addr, ps)
    calls = []
    real = core._Migration._unmap_pass

    def hook(self, todo, mode):
        calls.append(todo.size)
        if len(calls) == 2:
            # Between the batched passes and the folio's own SYNC retry (it was remapped in between), the
            # mapping goes away; the pin keeps the page.
            mm.munmap(addr, 2 * ps)
        return real(self, todo, mode)

    monkeypatch.setattr(core._Migration, "_unmap_pass", hook)
    res = mm.migrate(addr, ps, 1, mode=MigrateMode.SYNC)
    assert len(calls) == 2
    assert res.status.tolist() == [EAGAIN]
    monkeypatch.undo()
    assert m.nodes[0].free_pages == HOST - 1  # still pinned
    finish_within(mm.close, "close", WAIT)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_close_races_with_migrations(m):
    ps = m.page_size
    spaces = []
    for i in range(4):
        mm = m.address_space()
        addr = mm.mmap(64 * ps)
        mm.write(addr, np.full(64 * ps, i, np.uint8))
        spaces.append((mm, addr))
    crew = Crew()

    def mover(k: int) -> None:
        for i in range(40):
            mm, addr = spaces[(k + i) % len(spaces)]
            try:
                mm.migrate(addr, 64 * ps, 1 + i % 2, mode=MODES[i % 3])
            except InvalidArgument as exc:
                assert "closed" in str(exc)
            except AddressFault:
                pass  # started before the close, looked after it: the mapping is gone

    def closer() -> None:
        for mm, addr in spaces:
            mm.read(addr, ps)
            mm.close()

    crew.add(mover, 0)
    crew.add(mover, 1)
    crew.add(closer)
    crew.run()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_waiters_wake_when_a_lock_holder_unlocks(m):
    """Several accessors block behind one migration; every one of them wakes and sees the right data."""
    ps = m.page_size
    mm = m.address_space()
    addr = mm.mmap(8 * ps)
    data = np.random.default_rng(3).integers(0, 256, 8 * ps, dtype=np.uint8)
    mm.write(addr, data)
    mv = MigrateVma(mm, addr, addr + 8 * ps, 1)
    mv.setup()
    results = []
    crew = Crew()
    for _ in range(4):
        crew.add(lambda: results.append(mm.read(addr, 8 * ps)))
    for t in crew.threads:
        t.start()
    mv.alloc_and_copy()
    mv.pages()
    mv.finalize()
    for t in crew.threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in crew.threads)
    assert not crew.errors
    assert len(results) == 4 and all(np.array_equal(r, data) for r in results)
    finish_within(mm.close, "close", WAIT)
