"""State transfer: every page flag, cpupid, memcg and private data, PTE bits, and reference bookkeeping.

Each test runs on the compiled per-page loops and on the numpy reference code.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import dmamig.migrate.batch_loops as batch_loops
import dmamig.migrate.state as state
import dmamig.page_loops as page_loops
import dmamig.vma as vma_mod
from dmamig import MigrateMode, PageFlag, PteFlag
from dmamig.migrate.state import migrate_folio_mapping, migrate_folio_states
from dmamig.pages import PageArray

HOST = DEV = 2048

COPIED = [PageFlag.ERROR, PageFlag.REFERENCED, PageFlag.UPTODATE, PageFlag.WORKINGSET, PageFlag.CHECKED,
          PageFlag.MAPPEDTODISK, PageFlag.DIRTY, PageFlag.YOUNG, PageFlag.IDLE, PageFlag.MLOCKED,
          PageFlag.RECLAIM]


@pytest.fixture(params=["compiled", "numpy"], autouse=True)
def implementation(request, monkeypatch):
    """Run on the compiled loops and on the numpy reference (where both exist)."""
    if request.param == "compiled":
        if not page_loops.HAVE_NUMBA:
            pytest.skip("numba is not available: only the numpy path exists")
    else:
        for mod, name in ((state, "USE_LOOPS"), (vma_mod, "USE_LOOPS"), (page_loops, "HAVE_NUMBA")):
            monkeypatch.setattr(mod, name, False, raising=False)
    return request.param


@pytest.fixture
def freed(m, monkeypatch):
    """Snapshots of folios as the core frees them (the old folios of a migration), by head pfn."""
    seen: dict[int, dict] = {}
    real = m.frames.free_folios

    def snapshot(heads):
        pg = m.pages
        for h in np.asarray(heads, dtype=np.int64).tolist():
            seen[h] = {"flags": PageFlag(int(pg.flags[h])), "last_cpupid": int(pg.last_cpupid[h]),
                       "memcg": int(pg.memcg[h]), "private": int(pg.private[h])}

    def spy(heads):
        snapshot(heads)
        return real(heads)

    monkeypatch.setattr(m.frames, "free_folios", spy)
    # The single-call batch kernels reset the old folio in the same compiled call that moves its state, so
    # there is no moment to look at it: take the phase-by-phase path, which runs the same state kernels.
    monkeypatch.setattr(batch_loops, "USE_BATCH_LOOPS", False)
    if page_loops.HAVE_NUMBA:
        # The compiled migrate_folio_done frees the old folios itself.
        real_done = page_loops.done_folios

        def done_spy(old, *args):
            snapshot(old)
            return real_done(old, *args)

        monkeypatch.setattr(page_loops, "done_folios", done_spy)
    return seen


def one_page(m, mm, data=b"state") -> tuple[int, int]:
    addr = mm.mmap(2 * m.page_size)
    mm.write(addr, data)
    return addr, mm.pfn_of(addr)


def migrate(mm, addr, node=1, n=1, **kw):
    res = mm.migrate(addr, n * mm.machine.page_size, node, **kw)
    assert res.ok, res.status
    return res


# -- flags through a whole migration --------------------------------------------------------------------------
@pytest.mark.parametrize("flag", COPIED, ids=lambda f: f.name)
def test_copied_flag_reaches_the_new_page(m, mm, freed, flag):
    addr, old = one_page(m, mm)
    m.page_controls.clear_page_flags(old, PageFlag.DIRTY)  # start from a clean page: only the flag under test is extra
    mm.vmas[0].pte_flags[0] &= np.uint8(~np.uint8(PteFlag.DIRTY))
    if flag != PageFlag.UPTODATE:
        before = m.page_controls.page_flags(old)
        assert flag not in before
    m.page_controls.set_page_flags(old, flag)
    migrate(mm, addr)
    new = mm.pfn_of(addr)
    assert new != old
    assert flag in m.page_controls.page_flags(new)


@pytest.mark.parametrize("flag", [PageFlag.REFERENCED, PageFlag.WORKINGSET, PageFlag.ERROR, PageFlag.IDLE,
                                  PageFlag.MLOCKED, PageFlag.CHECKED], ids=lambda f: f.name)
def test_copied_flag_absent_stays_absent(m, mm, flag):
    addr, old = one_page(m, mm)
    assert flag not in m.page_controls.page_flags(old)
    migrate(mm, addr)
    assert flag not in m.page_controls.page_flags(mm.pfn_of(addr))


def test_dirty_pte_makes_the_new_page_dirty(m, mm):
    addr, old = one_page(m, mm)
    assert PageFlag.DIRTY not in m.page_controls.page_flags(old)
    assert PteFlag.DIRTY in mm.pte_flags(addr)
    migrate(mm, addr)
    assert PageFlag.DIRTY in m.page_controls.page_flags(mm.pfn_of(addr))


def test_clean_page_stays_clean(m, mm):
    addr = mm.mmap(m.page_size)
    mm.populate(addr, m.page_size)
    migrate(mm, addr)
    assert PageFlag.DIRTY not in m.page_controls.page_flags(mm.pfn_of(addr))


def test_active_moves_and_is_cleared_on_the_old_page(m, mm, freed):
    addr, old = one_page(m, mm)
    m.page_controls.set_page_flags(old, PageFlag.ACTIVE)
    migrate(mm, addr)
    assert PageFlag.ACTIVE in m.page_controls.page_flags(mm.pfn_of(addr))
    assert PageFlag.ACTIVE not in freed[old]["flags"]


def test_unevictable_moves_when_not_active(m, mm, freed):
    addr, old = one_page(m, mm)
    m.page_controls.set_page_flags(old, PageFlag.UNEVICTABLE)
    migrate(mm, addr)
    flags = m.page_controls.page_flags(mm.pfn_of(addr))
    assert PageFlag.UNEVICTABLE in flags and PageFlag.ACTIVE not in flags
    assert PageFlag.UNEVICTABLE not in freed[old]["flags"]


def test_active_wins_over_unevictable(m, mm):
    addr, old = one_page(m, mm)
    m.page_controls.set_page_flags(old, PageFlag.ACTIVE | PageFlag.UNEVICTABLE)
    migrate(mm, addr)
    flags = m.page_controls.page_flags(mm.pfn_of(addr))
    assert PageFlag.ACTIVE in flags and PageFlag.UNEVICTABLE not in flags


def test_private_moves_with_its_data(m, mm, freed):
    addr, old = one_page(m, mm)
    m.page_controls.set_page_flags(old, PageFlag.PRIVATE)
    with m.lock:
        m.pages.private[old] = 0xC0FFEE
    migrate(mm, addr)
    new = mm.pfn_of(addr)
    assert PageFlag.PRIVATE in m.page_controls.page_flags(new)
    assert m.page_controls.page_state(new)["private"] == 0xC0FFEE
    assert PageFlag.PRIVATE not in freed[old]["flags"]
    assert freed[old]["private"] == 0


def test_no_private_flag_no_private_data(m, mm):
    addr, old = one_page(m, mm)
    migrate(mm, addr)
    new = mm.pfn_of(addr)
    assert PageFlag.PRIVATE not in m.page_controls.page_flags(new) and m.page_controls.page_state(new)["private"] == 0


def test_swapcache_is_cleared_on_the_old_page(m, mm, freed):
    addr, old = one_page(m, mm)
    m.page_controls.set_page_flags(old, PageFlag.SWAPCACHE)
    migrate(mm, addr)
    assert PageFlag.SWAPCACHE not in freed[old]["flags"]


def test_swapbacked_and_lru_on_the_new_page(m, mm):
    addr, old = one_page(m, mm)
    migrate(mm, addr)
    flags = m.page_controls.page_flags(mm.pfn_of(addr))
    assert PageFlag.SWAPBACKED in flags and PageFlag.LRU in flags
    assert PageFlag.ISOLATED not in flags and PageFlag.LOCKED not in flags


def test_last_cpupid_moves_and_the_old_page_gets_minus_one(m, mm, freed):
    addr, old = one_page(m, mm)
    m.page_controls.set_page_cpupid(old, 4321)
    migrate(mm, addr)
    assert m.page_controls.page_state(mm.pfn_of(addr))["last_cpupid"] == 4321
    assert freed[old]["last_cpupid"] == -1


def test_memcg_moves(m, mm, freed):
    addr, old = one_page(m, mm)
    assert m.page_controls.page_state(old)["memcg"] != 0
    with m.lock:
        m.pages.memcg[old] = 17
    migrate(mm, addr)
    assert m.page_controls.page_state(mm.pfn_of(addr))["memcg"] == 17
    assert freed[old]["memcg"] == 0


def test_everything_at_once_on_a_thp_and_back(m, mm):
    ps = m.page_size
    addr = mm.mmap(512 * ps, order=9)
    mm.write(addr, np.ones(512 * ps, np.uint8))
    head = mm.pfn_of(addr)
    extra = PageFlag.REFERENCED | PageFlag.WORKINGSET | PageFlag.ACTIVE | PageFlag.MAPPEDTODISK | PageFlag.ERROR
    m.page_controls.set_page_flags(head, extra)
    m.page_controls.set_page_cpupid(head + 3, 99)  # any page of the folio sets its folio's
    for node in (1, 2, 0):
        res = mm.migrate(addr, 512 * ps, node, mode=MigrateMode.SYNC)
        assert res.nr_thp_succeeded == 1
        st = m.page_controls.page_state(mm.pfn_of(addr))
        assert st["node"] == node and st["order"] == 9
        assert extra | PageFlag.DIRTY | PageFlag.HEAD | PageFlag.UPTODATE <= st["flags"]
        assert st["last_cpupid"] == 99 and st["memcg"] == 1


# -- the state functions on their own (writeback, the old page) ------------------------------------------------
def transfer(pages: PageArray, old: np.ndarray, new: np.ndarray, implementation: str) -> None:
    """folio_migrate_mapping + folio_migrate_flags on a bare PageArray (pages of no object)."""
    if implementation == "compiled":
        page_loops.move_folio_state(old, new, np.ones(old.size, np.int64), pages.flags, pages.refcount,
                                 pages.mapping, pages.index, pages.private, pages.last_cpupid, pages.memcg)
    else:
        fake = SimpleNamespace(pages=pages)
        migrate_folio_mapping(fake, old, new)
        migrate_folio_states(fake, old, new)


def test_writeback_is_never_set_on_the_new_page(implementation):
    pages = PageArray(4)
    old, new = np.array([0, 1]), np.array([2, 3])
    pages.set(old, PageFlag.WRITEBACK | PageFlag.UPTODATE)
    pages.set(new[1:], PageFlag.WRITEBACK)
    transfer(pages, old, new, implementation)
    assert not pages.test(new, PageFlag.WRITEBACK).any()
    assert pages.test(new, PageFlag.UPTODATE).all()


def test_moved_flags_are_cleared_on_the_old_page(implementation):
    pages = PageArray(8)
    old, new = np.arange(4), np.arange(4, 8)
    moved = PageFlag.ACTIVE | PageFlag.UNEVICTABLE | PageFlag.SWAPCACHE | PageFlag.PRIVATE
    pages.set(old, moved | PageFlag.REFERENCED)
    pages.private[old] = [5, 6, 7, 8]
    pages.last_cpupid[old] = [1, 2, 3, 4]
    pages.memcg[old] = 3
    transfer(pages, old, new, implementation)
    assert not (pages.flags[old] & np.uint32(moved)).any()
    assert pages.test(old, PageFlag.REFERENCED).all()  # copied flags stay on the old page
    assert (pages.private[old] == 0).all() and (pages.private[new] == [5, 6, 7, 8]).all()
    assert (pages.last_cpupid[old] == -1).all() and (pages.last_cpupid[new] == [1, 2, 3, 4]).all()
    assert (pages.memcg[new] == 3).all()
    assert pages.test(new, PageFlag.ACTIVE).all() and not pages.test(new, PageFlag.UNEVICTABLE).any()


def test_compiled_and_numpy_state_transfer_agree(implementation):
    if page_loops.move_folio_state is None:
        pytest.skip("numba is not available: no compiled path to compare")
    n = 256
    rng = np.random.default_rng(5)
    flags_old = rng.integers(0, 1 << 21, n, dtype=np.uint32) & ~np.uint32(PageFlag.HEAD)
    flags_new = rng.integers(0, 1 << 21, n, dtype=np.uint32) & ~np.uint32(PageFlag.HEAD)
    out = []
    for impl in ("numpy", "compiled"):
        pages = PageArray(2 * n)
        old, new = np.arange(n, dtype=np.int64), np.arange(n, 2 * n, dtype=np.int64)
        pages.flags[old], pages.flags[new] = flags_old, flags_new
        pages.private[old] = np.arange(n) + 1
        pages.private[new] = 77
        pages.last_cpupid[old] = np.arange(n) * 3
        pages.memcg[old] = np.arange(n) % 5
        pages.refcount[old] = np.arange(n) % 4 + 1
        pages.index[old] = np.arange(n) * 2
        transfer(pages, old, new, impl)
        out.append(pages)
    for k in ("flags", "refcount", "mapping", "index", "private", "last_cpupid", "memcg"):
        assert np.array_equal(getattr(out[0], k), getattr(out[1], k)), k


# -- PTE bits --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [
    PteFlag.PRESENT,
    PteFlag.PRESENT | PteFlag.WRITE,
    PteFlag.PRESENT | PteFlag.YOUNG,
    PteFlag.PRESENT | PteFlag.WRITE | PteFlag.DIRTY,
    PteFlag.PRESENT | PteFlag.WRITE | PteFlag.YOUNG | PteFlag.DIRTY,
], ids=lambda b: str(int(b)))
@pytest.mark.parametrize("engine", [False, True], ids=["copy", "no-copy"])
def test_pte_bits_survive_migration(m, mm, bits, engine):
    ps = m.page_size
    addr = mm.mmap(3 * ps)
    mm.populate(addr, 3 * ps)
    v = mm.vmas[0]
    with m.lock:
        v.pte_flags[1] = np.uint8(bits)
    res = mm.migrate(addr, 3 * ps, 2, engine=m.dma if engine else None)
    assert res.ok
    assert mm.pte_flags(addr + ps) == bits
    res = mm.migrate(addr, 3 * ps, 0)
    assert res.ok
    assert mm.pte_flags(addr + ps) == bits


def test_pte_bits_restored_on_a_failed_migration(m, mm):
    ps = m.page_size
    addr = mm.mmap(ps)
    mm.populate(addr, ps)
    bits = PteFlag.PRESENT | PteFlag.DIRTY
    with m.lock:
        mm.vmas[0].pte_flags[0] = np.uint8(bits)
    m.page_controls.get_page(mm.pfn_of(addr))
    res = mm.migrate(addr, ps, 1)
    assert not res.ok
    assert mm.pte_flags(addr) == bits
    m.page_controls.put_page(mm.pfn_of(addr))


# -- references and mapcounts ----------------------------------------------------------------------------------
def test_anon_refcount_equals_mapcount_after_migration(m, mm):
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    mm.write(addr, np.ones(8 * ps, np.uint8))
    for node in (1, 2, 0):
        migrate(mm, addr, node, 8)
        for i in range(8):
            st = m.page_controls.page_state(mm.pfn_of(addr + i * ps))
            assert st["refcount"] == st["mapcount"] == 1


def test_shared_refcount_is_mapcount_plus_page_cache(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps, shared=True)
    mm.write(addr, np.ones(4 * ps, np.uint8))
    child = mm.fork()
    grandchild = child.fork()
    for node in (2, 1):
        migrate(child, addr, node, 4, move_all=True)  # mapped by three processes
        for i in range(4):
            pfn = mm.pfn_of(addr + i * ps)
            assert child.pfn_of(addr + i * ps) == grandchild.pfn_of(addr + i * ps) == pfn
            st = m.page_controls.page_state(pfn)
            assert st["node"] == node and st["mapcount"] == 3 and st["refcount"] == 4
    grandchild.close()
    st = m.page_controls.page_state(mm.pfn_of(addr))
    assert st["mapcount"] == 2 and st["refcount"] == 3
    child.close()


@pytest.mark.parametrize("engine", [False, True], ids=["copy", "no-copy"])
def test_reference_taken_on_a_fresh_destination_survives(m, mm, monkeypatch, engine):
    """A pfn walker that finds a destination folio while its copy runs keeps its reference."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr, np.ones(2 * ps, np.uint8))
    grabbed = []
    if engine:
        # The hook is the general path's submission: no fused batch (which submits from its compiled call).
        monkeypatch.setattr(batch_loops, "fused_batch", None)
        real = m.dma.copy

        def copy(src, dst):
            m.page_controls.get_page(int(dst[0]))
            grabbed.append(int(dst[0]))
            return real(src, dst)

        monkeypatch.setattr(m.dma, "copy", copy)
    else:
        real = m.frames.copy_folios

        def copy(src, dst):
            m.page_controls.get_page(int(dst[0]))
            grabbed.append(int(dst[0]))
            real(src, dst)

        monkeypatch.setattr(m.frames, "copy_folios", copy)
    migrate(mm, addr, 1, 2, engine=m.dma if engine else None)
    monkeypatch.undo()
    pfn = grabbed[0]
    assert mm.pfn_of(addr) == pfn
    st = m.page_controls.page_state(pfn)
    assert st["mapcount"] == 1 and st["refcount"] == 2
    m.page_controls.put_page(pfn)
    st = m.page_controls.page_state(pfn)
    assert st["refcount"] == 1 and m.nodes[1].free_pages == DEV - 2  # still mapped, still allocated
    mm.close()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_mapping_and_index_move_with_the_page(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.write(addr, np.ones(4 * ps, np.uint8))
    old = m.page_controls.page_state(mm.pfn_of(addr + 2 * ps))
    migrate(mm, addr, 1, 4)
    new = m.page_controls.page_state(mm.pfn_of(addr + 2 * ps))
    assert (new["mapping"], new["index"]) == (old["mapping"], old["index"]) == (old["mapping"], 2)
    assert m.object(new["mapping"]).pfns[2] == new["pfn"]


def test_shared_page_cache_follows_a_migration_of_an_unmapped_index(m, mm):
    """A shared page migrated while another mapper has not faulted it: that mapper finds the new page."""
    ps = m.page_size
    addr = mm.mmap(2 * ps, shared=True)
    child = mm.fork()
    mm.write(addr, b"cache")
    migrate(mm, addr, 2)
    assert child.node_of(addr) == -1
    child.populate(addr, ps, node=0)  # finds the page in the page cache: no new frame
    assert child.pfn_of(addr) == mm.pfn_of(addr) and child.node_of(addr) == 2
    assert m.nodes[0].free_pages == HOST
    assert child.read(addr, 5).tobytes() == b"cache"
    assert child.pfn_of(addr) == mm.pfn_of(addr) and mm.node_of(addr) == 0
    assert m.page_controls.page_state(mm.pfn_of(addr))["mapcount"] == 2
    child.close()


def test_free_pages_balance_after_migrations(m, mm):
    ps = m.page_size
    addr = mm.mmap(64 * ps)
    mm.write(addr, np.ones(64 * ps, np.uint8))
    migrate(mm, addr, 1, 64)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 64, DEV]
    migrate(mm, addr, 2, 32)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV - 32, DEV - 32]
    mm.close()
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]
