"""The single-call batch loops against the phase-by-phase reference: same pages, page tables and slots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dmamig.migrate.batch_loops as batch_loops
import dmamig.migrate.state as state
import dmamig.page_loops as page_loops
import dmamig.vma as vma_mod
from dmamig import Machine, MigrateMode, MigrateOptions, PageFlag

PAGE_FIELDS = ("flags", "refcount", "mapcount", "mapping", "index", "private", "last_cpupid", "memcg", "order",
               "head")
FLAGS = [PageFlag.ACTIVE, PageFlag.DIRTY, PageFlag.REFERENCED, PageFlag.UNEVICTABLE, PageFlag.SWAPCACHE,
         PageFlag.WORKINGSET]


def run_scenario(seed: int, path: str) -> dict:
    """Build a machine from ``seed``, run a series of migrations on ``path``, return every piece of state."""
    rng = np.random.default_rng(seed)
    m = Machine(host_pages=4096, device_pages=2048, devices=2, backend="cpu", channels=2)
    try:
        mm = m.address_space()
        regions = []
        shm = set()
        for _ in range(int(rng.integers(1, 4))):
            order = int(rng.choice([0, 0, 4, 9]))
            npages = int(rng.integers(1, 3)) << max(order, 0) if order else int(rng.integers(1, 700))
            addr = mm.mmap(npages * m.page_size, shared=bool(rng.integers(0, 4) == 0), order=order)
            if mm.vmas[-1].shared:
                shm.add(addr)
            mm.write(addr, rng.integers(0, 256, npages * m.page_size, dtype=np.uint8))
            regions.append((addr, npages))
        for addr, npages in regions:
            pfns = mm.pfns_of(addr, npages * m.page_size)
            for pfn in rng.choice(pfns, size=min(8, pfns.size), replace=False).tolist():
                flag = PageFlag(int(rng.choice(FLAGS)))
                if flag == PageFlag.SWAPCACHE and addr in shm:
                    flag = PageFlag.WORKINGSET  # shared memory is in its page cache, not the swap cache
                m.page_controls.set_page_flags(int(pfn), flag)
                m.page_controls.set_page_cpupid(int(pfn), int(rng.integers(0, 1000)))
            if rng.integers(0, 2):
                m.page_controls.get_page(int(pfns[rng.integers(0, pfns.size)]))  # a transient reference: -EAGAIN
        if rng.integers(0, 2):
            mm.fork()  # private pages shared copy-on-write: -EACCES without move_all
        if rng.integers(0, 2):
            addr = mm.mmap(64 * m.page_size)
            mm.read(addr, 64 * m.page_size)  # the zero page: -EFAULT
            mm.write(addr + 8 * m.page_size, b"one real page")
            regions.append((addr, 64))
        locked = bool(rng.integers(0, 3) == 0)
        if locked:  # a busy page lock: -EAGAIN in ASYNC (a sync mode would wait for this very thread)
            addr, npages = regions[0]
            m.page_controls.lock_page(mm.pfn_of(addr + int(rng.integers(0, npages)) * m.page_size))
        out = {"status": [], "stats": []}
        for _ in range(int(rng.integers(2, 5))):
            addr, npages = regions[int(rng.integers(0, len(regions)))]
            mode = MigrateMode.ASYNC if locked else \
                [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC][int(rng.integers(0, 3))]
            engine = m.dma if rng.integers(0, 2) else None
            options = MigrateOptions(batch_pages=int(rng.choice([64, 512])))
            res = mm.migrate(addr, npages * m.page_size, int(rng.integers(0, 3)), mode=mode, engine=engine,
                             options=options, move_all=bool(rng.integers(0, 2)))
            out["status"].append(res.status.copy())
            s = res.stats
            out["stats"].append((s.nr_succeeded, s.nr_failed_pages, s.nr_thp_succeeded, s.nr_no_copy))
        for name in PAGE_FIELDS:
            out[name] = getattr(m.pages, name).copy()
        out["ptes"] = [(v.pte_pfn.copy(), v.pte_flags.copy()) for v in mm.vmas]
        out["free"] = [nd.allocator.is_free(np.arange(nd.total_pages)).copy() for nd in m.nodes]
        out["data"] = [mm.read(a, n * m.page_size) for a, n in regions]
        out["vmstat"] = m.vmstat
        return out
    finally:
        m.close()


def _set_path(monkeypatch, path: str) -> None:
    """``fused``: every compiled path (no-copy batches fused, see core._Migration._fused_steps); ``batch``: one
    compiled call per phase; ``phases``: the phase-by-phase path with compiled loops; ``numpy``: the reference."""
    if path == "numpy":
        for mod, name in ((state, "USE_LOOPS"), (vma_mod, "USE_LOOPS"), (page_loops, "HAVE_NUMBA")):
            monkeypatch.setattr(mod, name, False)
    monkeypatch.setattr(batch_loops, "USE_BATCH_LOOPS", path in ("fused", "batch"))
    if path != "fused":
        monkeypatch.setattr(batch_loops, "fused_batch", None)


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: only the reference path exists")
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_batch_kernels_match_the_phase_by_phase_paths(seed):
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for path in ("fused", "batch", "phases", "numpy"):
            _set_path(mp, path)
            results[path] = run_scenario(seed, path)
            mp.undo()
    ref = results["numpy"]
    for path in ("fused", "batch", "phases"):
        got = results[path]
        for a, b in zip(got["status"], ref["status"]):
            assert np.array_equal(a, b), path
        assert got["stats"] == ref["stats"], path
        for name in PAGE_FIELDS:
            assert np.array_equal(got[name], ref[name]), (path, name)
        for (pa, fa), (pb, fb) in zip(got["ptes"], ref["ptes"]):
            assert np.array_equal(pa, pb) and np.array_equal(fa, fb), path
        for a, b in zip(got["free"], ref["free"]):
            assert np.array_equal(a, b), path
        for a, b in zip(got["data"], ref["data"]):
            assert np.array_equal(a, b), path
        assert got["vmstat"] == ref["vmstat"], path


@settings(max_examples=60, deadline=None)
@given(nr=st.lists(st.sampled_from([1, 1, 1, 2, 16, 512]), min_size=1, max_size=300),
       batch_pages=st.sampled_from([1, 16, 512, 1000]))
def test_batches_cut_compiled_as_the_numpy_reference(nr: list[int], batch_pages: int) -> None:
    from dmamig.migrate.entries import batch_ids

    sizes = np.array(nr, dtype=np.int64)
    compiled = batch_ids(sizes, batch_pages)
    batch_loops.HAVE_NUMBA = False
    try:
        reference = batch_ids(sizes, batch_pages)
    finally:
        batch_loops.HAVE_NUMBA = page_loops.HAVE_NUMBA
    assert np.array_equal(compiled, reference)
    # Each batch but the last holds batch_pages or more, and only its last folio took it there.
    ends = np.flatnonzero(np.diff(compiled)) + 1
    for a, b in zip([0, *ends.tolist()], [*ends.tolist(), sizes.size]):
        held = int(sizes[a:b].sum())
        assert b == sizes.size or held >= batch_pages
        assert held - int(sizes[b - 1]) < batch_pages


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: only the reference path exists")
@pytest.mark.parametrize("order", [0, 4])
def test_a_batch_submits_every_page_of_the_folios_its_unmap_pass_unmapped_and_no_other(monkeypatch, order):
    """A one-VMA batch's DMA submission (listed by its compiled unmap pass) holds every base page of each folio
    the pass unmapped, source to destination, folio by folio; a folio it did not unmap (under writeback: -EBUSY
    in ASYNC, not retried, so the batch has one unmap pass) is not in it."""
    m = Machine(host_pages=1024, device_pages=1024, devices=1, backend="cpu", channels=1)
    try:
        mm = m.address_space()
        nr = 1 << order
        folios = 6
        size = folios * nr * m.page_size
        addr = mm.mmap(size, order=order)
        data = np.random.default_rng(order).integers(0, 256, size, dtype=np.uint8)
        mm.write(addr, data)
        wb = mm.pfn_of(addr + 2 * nr * m.page_size)
        m.page_controls.set_page_flags(wb, PageFlag.WRITEBACK)
        submitted = []
        real = m.dma.copy

        def spy(src, dst):
            submitted.append((np.array(src), np.array(dst)))
            return real(src, dst)

        monkeypatch.setattr(m.dma, "copy", spy)
        before = mm.pfns_of(addr, size)
        res = mm.migrate(addr, size, 1, mode=MigrateMode.ASYNC, engine=m.dma,
                         options=MigrateOptions(batch_pages=folios * nr))
        after = mm.pfns_of(addr, size)
        m.page_controls.clear_page_flags(wb, PageFlag.WRITEBACK)
        assert len(submitted) == 1
        src, dst = submitted[0]
        moved = np.flatnonzero(res.status == 0)
        assert moved.size == (folios - 1) * nr and (res.status[2 * nr:3 * nr] == -16).all()
        assert np.array_equal(src, before[moved]) and np.array_equal(dst, after[moved])
        assert np.array_equal(mm.read(addr, size), data)
    finally:
        m.close()


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("n", [37, 40, 4096])
def test_compiled_page_fields_are_the_page_arrays_own_memory(n: int) -> None:
    # A compiled call finds every field in PageArray.state: the same bytes the named arrays are, both ways.
    from dmamig.pages import PageArray

    pages = PageArray(n)
    views = page_loops.page_fields(pages.state)
    assert [name for name, _dtype, _free in page_loops.PAGE_FIELDS] == \
        ["mapping", "index", "private", "head", "write_seq", "mark", "flags", "refcount", "mapcount",
         "last_cpupid", "memcg", "order"]
    slots = page_loops.page_slots(n)
    assert slots >= n and pages.state.size == slots * page_loops.PAGE_BYTES
    for k, ((name, dtype, free), view) in enumerate(zip(page_loops.PAGE_FIELDS, views)):
        field = getattr(pages, name)
        assert view.dtype == field.dtype == dtype and field.shape == (n,) and view.shape == (slots,)
        assert field.ctypes.data == view.ctypes.data, name
        expect = np.arange(n) if free is None else np.full(n, free)
        np.testing.assert_array_equal(view[:n], expect)
        field[n - 1] = 17 + k  # a write through the named array shows in the buffer's view
        assert view[n - 1] == 17 + k
    # The fields tile the buffer: none overlaps the next.
    ends = [(v.ctypes.data, v.ctypes.data + v.nbytes) for v in views]
    assert ends[0][0] == pages.state.ctypes.data and ends[-1][1] == pages.state.ctypes.data + pages.state.nbytes
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    # One pfn's entries in the wide fields lie in different cache sets (offsets apart within a 4 KiB page).
    wide = [v.ctypes.data % 4096 for v in views if v.dtype.itemsize == 8]
    assert len({off // 64 for off in wide}) == len(wide)


def test_entry_blocks_hold_the_named_rows_also_after_a_split_grows_them() -> None:
    m = Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu")
    try:
        mm = m.address_space()
        addr = mm.mmap(2 * 512 * m.page_size, order=9)
        mm.write(addr, np.ones(2 * 512 * m.page_size, dtype=np.uint8))
        heads = np.unique(m.pages.head[mm.pfns_of(addr, 2 * 512 * m.page_size)])
        from dmamig.migrate.entries import Entries

        e = Entries(m, heads)
        rows = {"order": batch_loops.ROW_ORDER, "nr": batch_loops.ROW_NR, "expected": batch_loops.ROW_EXPECTED,
                "dst": batch_loops.ROW_DST, "batch_of": batch_loops.ROW_BATCH_OF,
                "split_first": batch_loops.ROW_SPLIT_FIRST}
        flags = {"given": batch_loops.ROW_GIVEN, "fresh": batch_loops.ROW_FRESH,
                 "unmapped": batch_loops.ROW_UNMAPPED, "counted": batch_loops.ROW_COUNTED}

        def check() -> None:
            for name, row in rows.items():
                assert getattr(e, name).ctypes.data == e.ints[row].ctypes.data, name
            for name, row in flags.items():
                assert getattr(e, name).ctypes.data == e.bools[row].ctypes.data, name
            assert e.ints.flags.c_contiguous and e.bools.flags.c_contiguous

        check()
        e.fresh[1] = True
        e.dst[0] = 99
        m.pages.refcount[heads[0]] += 1  # the isolation reference, which split_folio expects
        assert e.split(0)
        check()
        assert e.size == 2 + 512
        # The new pieces: base pages, no destination, not yet tried; the old entries kept their values.
        np.testing.assert_array_equal(e.nr[2:], 1)
        np.testing.assert_array_equal(e.dst[2:], -1)
        assert e.dst[0] == 99 and e.fresh[1] and not e.fresh[2:].any()
        assert (e.split_first[2:] == -1).all() and e.split_first[0] == 2
    finally:
        m.close()


@pytest.mark.parametrize("order", [0, 4, 9])
@pytest.mark.parametrize("batch_pages, per_step", [(1, 1), (16, 1), (100, 3), (512, 1), (1000, 2)])
def test_steps_of_folios_of_one_size_are_the_batches_batch_ids_cuts(order, batch_pages, per_step):
    """Folios of one size are cut into slices of a fixed number of folios: the same batches and steps as
    ``batch_ids`` gives for any sizes (a batch takes folios until it holds ``batch_pages`` or more)."""
    from dmamig.migrate.entries import Entries, batch_ids

    with Machine(host_pages=4096, device_pages=512, devices=1, backend="cpu") as m:
        mm = m.address_space()
        folios = 7
        addr = mm.mmap((folios << order) * m.page_size, order=order)
        mm.write(addr, np.ones((folios << order) * m.page_size, dtype=np.uint8))
        heads = np.unique(m.pages.head[mm.pfns_of(addr, (folios << order) * m.page_size)])
        with m.lock:
            e = Entries(m, heads, None)
        assert e.one_order == order
        positions = np.arange(heads.size)
        steps = e.steps(positions, batch_pages, per_step)
        if folios << order <= batch_pages:
            assert len(steps) == 1 and np.array_equal(steps[0], positions)
            return
        batch = batch_ids(np.full(folios, 1 << order, dtype=np.int64), batch_pages)
        assert np.array_equal(e.batch_of[positions], batch)
        step = batch // per_step
        want = [positions[step == s] for s in np.unique(step)]
        assert len(steps) == len(want) and all(np.array_equal(a, b) for a, b in zip(steps, want))


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: collection does not locate pages")
def test_collection_locates_each_page_as_entries_locate_does():
    """collect_located's entry of each page (the call's entries then skip Entries.locate) is the one
    Entries.locate finds: THP pages, base pages, pages repeated, pages on the target node, the zero page."""
    from dmamig.migrate.entries import PENDING, Entries
    from dmamig.migrate.isolate import collect_located, putback_folios

    with Machine(host_pages=4096, device_pages=2048, devices=1, backend="cpu") as m:
        mm = m.address_space()
        ps = m.page_size
        thp = mm.mmap(2 * 512 * ps, order=9)
        mm.write(thp, np.ones(2 * 512 * ps, dtype=np.uint8))
        base = mm.mmap(40 * ps)
        mm.write(base, np.ones(40 * ps, dtype=np.uint8))
        assert mm.migrate(base, 8 * ps, 1).ok  # already on the target node
        zero = mm.mmap(4 * ps)
        mm.read(zero, 4 * ps)
        pfns = np.concatenate([mm.pfns_of(base, 40 * ps), mm.pfns_of(thp + 300 * ps, 600 * ps),
                               mm.pfns_of(zero, 4 * ps), mm.pfns_of(base + 20 * ps, 5 * ps)])
        with m.lock:
            status, heads, entry = collect_located(m, pfns, 1)
            where = Entries(m, heads, None).locate(pfns, status)
            putback_folios(m, heads)
        assert entry is not None and where is not None
        pending = status == PENDING
        assert pending.sum() == 32 + 600 + 5 and (entry[~pending] == -1).all()
        assert np.array_equal(entry[pending], where[0][pending])


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: the numpy collection is the only one")
@pytest.mark.parametrize("seed", range(6))
def test_compiled_collection_matches_the_numpy_reference(seed, monkeypatch):
    """The compiled collection (which settles the pages after a folio's first from that first one) gives the
    numpy code's status and heads and isolates the same folios: pages in and out of order, runs that cross from
    one folio into the next, folios named twice, pages on the target node, shared and busy folios, no page, the
    zero page."""
    from dmamig.flags import EACCES
    from dmamig.migrate.isolate import collect_lru_folios, putback_folios

    rng = np.random.default_rng(seed)
    with Machine(host_pages=4096, device_pages=2048, devices=1, backend="cpu") as m:
        mm = m.address_space()
        ps = m.page_size
        thp = mm.mmap(3 * 512 * ps, order=9)
        mm.write(thp, np.ones(3 * 512 * ps, dtype=np.uint8))
        small = mm.mmap(4 * 16 * ps, order=4)
        mm.write(small, np.ones(4 * 16 * ps, dtype=np.uint8))
        base = mm.mmap(64 * ps)
        mm.write(base, np.ones(64 * ps, dtype=np.uint8))
        assert mm.migrate(base + 32 * ps, 8 * ps, 1).ok  # already on the target node
        zero = mm.mmap(4 * ps)
        mm.read(zero, 4 * ps)
        child = mm.fork()  # the base pages are shared now: -EACCES without move_all
        m.page_controls.lock_page(int(mm.pfns_of(small + 16 * ps, ps)[0]))  # still collected (isolation ignores it)
        with m.lock:
            busy = int(mm.pfns_of(small + 32 * ps, ps)[0])
            m.pages.clear(np.array([busy]), PageFlag.LRU)  # off the LRU: -EBUSY
        every = np.concatenate([mm.pfns_of(thp, 3 * 512 * ps), mm.pfns_of(small, 4 * 16 * ps),
                                mm.pfns_of(base, 64 * ps), mm.pfns_of(zero, 4 * ps), [-1]])
        pieces = [every[a:a + int(rng.integers(1, 700))] for a in rng.integers(0, every.size, 12)]
        pieces = [p[::-1] if rng.integers(0, 3) == 0 else p for p in pieces]
        pfns = np.concatenate(pieces).astype(np.int64)
        for move_all in (True, False):
            got = {}
            for path in ("compiled", "numpy"):
                monkeypatch.setattr(page_loops, "HAVE_NUMBA", path == "compiled")
                with m.lock:
                    status, heads, _entry = collect_lru_folios(m, pfns, 1, move_all)
                    got[path] = (status.copy(), heads.copy(), m.pages.flags.copy(), m.pages.refcount.copy())
                    putback_folios(m, heads)
            monkeypatch.undo()
            for a, b in zip(got["compiled"], got["numpy"]):
                assert np.array_equal(a, b)
            assert (1 if move_all else EACCES) in got["compiled"][0]  # something taken; or refused as shared
        child.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_statuses_of_a_call_whose_folios_all_moved_are_what_their_entries_say(monkeypatch, compiled):
    """Entries.fill_status with ``all_moved`` (no entry looked up) gives every page what the entry lookup gives
    where every entry moved: pending pages 0, the others their collection's status."""
    from dmamig.flags import EACCES, EFAULT, ENOENT
    from dmamig.migrate.entries import PENDING, SPLIT, Entries

    if compiled and not page_loops.HAVE_NUMBA:
        pytest.skip("numba is not available")
    monkeypatch.setattr(page_loops, "HAVE_NUMBA", compiled)
    rng = np.random.default_rng(3)
    n, folios = 700, 9
    collected = rng.choice(np.array([PENDING, 0, ENOENT, EFAULT, EACCES], dtype=np.int32), n, p=[.6, .1, .1, .1, .1])
    entry = np.where(collected == PENDING, rng.integers(0, folios, n), -1)
    pfns = rng.integers(0, 10**6, n)
    # Where the pages find their entries, as Entries.locate gives it: every page (compiled), or the pending ones.
    where = (entry, pfns) if compiled else (entry[collected == PENDING], pfns[collected == PENDING])
    e = Entries.__new__(Entries)  # the columns fill_status reads, every entry moved
    e.status = np.zeros(folios, dtype=np.int32)
    e.ints = np.zeros((6, folios), dtype=np.int64)
    e.src = np.arange(folios, dtype=np.int64)
    fast, looked_up = collected.copy(), collected.copy()
    e.fill_status(fast, where, all_moved=True)
    e.fill_status(looked_up, where)
    assert np.array_equal(fast, looked_up)
    assert np.array_equal(fast, np.where(collected == PENDING, 0, collected)) and SPLIT not in fast


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: collect_range takes the steps")
def test_compiled_slot_collection_reads_only_its_slots():
    """collect_slots over slots s0..s1 fills the first s1 - s0 entries of arrays that may be longer (their rest
    is never set), and an empty range collects nothing."""
    from dmamig.migrate.isolate import putback_folios

    with Machine(host_pages=1024, device_pages=1024, devices=1, backend="cpu") as m:
        mm = m.address_space()
        ps = m.page_size
        addr = mm.mmap(64 * ps)
        mm.write(addr, np.ones(64 * ps, dtype=np.uint8))
        (v, s0, s1), = mm.mm_struct.segments(addr, 64 * ps)
        nd = m.nodes[1]
        lo, hi = nd.base_pfn, nd.base_pfn + nd.total_pages
        pfns, entry, heads = (np.full(64, -7, dtype=np.int64) for _ in range(3))  # garbage past the range
        status = np.full(64, 99, dtype=np.int32)
        with m.lock:
            for a, b in ((s0, s0), (s0 + 10, s0 + 14)):
                k = page_loops.collect_slots(v.pte_pfn, v.pte_flags, a, b, lo, hi, m.pages.state, False, pfns,
                                             status, entry, heads)
                assert k == b - a
                assert np.array_equal(heads[:k], v.pte_pfn[a:b]) and (status[:k] == 1).all()
                assert (status[k:] == 99).all()  # nothing past the range was collected
                putback_folios(m, heads[:k])


def test_a_migration_of_a_range_waits_for_the_migration_entries_in_it():
    """``AddressSpace.migrate`` over a range that another migration holds behind migration entries waits for
    that migration (the wait is counted), then migrates what it finds."""
    import threading
    import time

    from dmamig import MigrateVma

    with Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu") as m:
        mm = m.address_space()
        n = 256 * m.page_size
        a = mm.mmap(n)
        data = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
        mm.write(a, data)
        results = []
        t = threading.Thread(target=lambda: results.append(mm.migrate(a, n, 0)))
        with MigrateVma(mm, a, a + n // 2, 1) as mv:  # leaving the block early aborts: the thread is never stuck
            mv.setup()
            t.start()
            deadline = time.monotonic() + 10
            while mm.migration_stalls[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert mm.migration_stalls[0] == 1 and not results  # waiting for the entries
            mv.alloc_and_copy()
            mv.pages()
            mv.finalize()
        t.join(10)
        assert not t.is_alive() and results[0].ok
        assert (m.nodemap.node_of(mm.pfns_of(a, n)) == 0).all()
        assert np.array_equal(mm.read(a, n), data)


def _partly_mapped_thps(seed: int) -> dict:
    """Two 2 MiB folios (and a 64 KiB one) whose pages are not all mapped as they were: a forked child wrote
    into the first (its slots there hold copies), part of the second is unmapped, some pages are dirty
    through their PTEs; then both address spaces migrate there and back."""
    rng = np.random.default_rng(seed)
    m = Machine(host_pages=4096, device_pages=4096, devices=1, backend="cpu", channels=1)
    try:
        mm = m.address_space()
        regions = []
        for order, npages in ((9, 1024), (4, 16)):
            addr = mm.mmap(npages * m.page_size, order=order)
            mm.write(addr, rng.integers(0, 256, npages * m.page_size, dtype=np.uint8))
            regions.append((addr, npages))
        child = mm.fork()
        thp = regions[0][0]
        for page in rng.choice(512, size=5, replace=False).tolist():
            child.write(thp + page * m.page_size, b"the child's own copy")
        mm.write(thp + 7 * m.page_size, b"the parent's own write")
        mm.munmap(thp + (512 + 100) * m.page_size, 50 * m.page_size)
        ranges = ((thp, 600), (thp + 662 * m.page_size, 362), regions[1])  # around the hole
        out = {"status": []}
        for space in (mm, child):
            for node in (1, 0):
                for addr, npages in ranges:
                    res = space.migrate(addr, npages * m.page_size, node, engine=m.dma if node else None)
                    out["status"].append(res.status.copy())
        for name in PAGE_FIELDS:
            out[name] = getattr(m.pages, name).copy()
        out["ptes"] = [(v.pte_pfn.copy(), v.pte_flags.copy()) for s in (mm, child) for v in s.vmas]
        out["data"] = [s.read(a, n * m.page_size) for s in (mm, child) for a, n in ranges]
        return out
    finally:
        m.close()


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: only the reference path exists")
@pytest.mark.parametrize("seed", [0, 1])
def test_large_folios_whose_slots_no_longer_all_map_them_move_as_the_reference_moves_them(seed):
    """A large folio whose slots do not all map it (a child's copies in some, a hole in another VMA's) is taken
    page by page by the compiled passes (in order in one VMA's slots they go without a branch per page); it must
    come out as the reference leaves it."""
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for path in ("fused", "numpy"):
            _set_path(mp, path)
            results[path] = _partly_mapped_thps(seed)
            mp.undo()
    got, ref = results["fused"], results["numpy"]
    for a, b in zip(got["status"], ref["status"], strict=True):
        assert np.array_equal(a, b)
    for name in PAGE_FIELDS:
        assert np.array_equal(got[name], ref[name]), name
    for (pa, fa), (pb, fb) in zip(got["ptes"], ref["ptes"], strict=True):
        assert np.array_equal(pa, pb) and np.array_equal(fa, fb)
    for a, b in zip(got["data"], ref["data"], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.skipif(batch_loops.fused_batch is None, reason="fused batches need numba and the rings")
@pytest.mark.parametrize("copier", ["dma", "cpu"])
def test_every_fused_call_of_a_migration_passes_arguments_of_the_first_call_s_types(monkeypatch, copier):
    """Every call of a migration's fused loop passes arguments of its first call's types: the compiled function is
    compiled once, whatever the copier and the folios' size."""
    from numba import typeof

    real = batch_loops.fused_batch
    seen: list[tuple] = []

    def fused(*args):
        seen.append(tuple(typeof(a) for a in args))
        return real(*args)

    monkeypatch.setattr(batch_loops, "fused_batch", fused)
    m = Machine(host_pages=4096, device_pages=4096, devices=1, backend="cpu", channels=2)
    try:
        mm = m.address_space()
        for order, npages in ((9, 2048), (0, 1024)):
            addr = mm.mmap(npages * m.page_size, order=order)
            mm.write(addr, np.random.default_rng(order).integers(0, 256, npages * m.page_size, dtype=np.uint8))
            for node in (1, 0):
                seen.clear()
                assert mm.migrate(addr, npages * m.page_size, node, engine=m.dma if copier == "dma" else None).ok
                assert len(seen) > 2 and len(set(seen)) == 1, (order, node)
    finally:
        m.close()
