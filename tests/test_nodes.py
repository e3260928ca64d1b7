"""Nodes and the frame allocator: order-0 and aligned order-k blocks, fragmentation reports, frees."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmamig import InvalidArgument, Machine, OutOfMemory, page_loops
from dmamig.backends.cpu import copy_loops
from dmamig.nodes import MAX_ORDER, FrameAllocator, NodeMap

BLOCK = 1 << MAX_ORDER


def used_frames(a: FrameAllocator) -> np.ndarray:
    return np.flatnonzero(~a.is_free(np.arange(a.nr_frames)))


def check_buddyinfo(a: FrameAllocator) -> list[int]:
    info = a.buddyinfo()
    assert len(info) == MAX_ORDER + 1
    assert sum(c << o for o, c in enumerate(info)) == a.nr_free
    return info


# -- FrameAllocator --------------------------------------------------------------------------------------------
def test_fresh_allocator():
    a = FrameAllocator(4 * BLOCK)
    assert a.nr_free == 4 * BLOCK
    assert check_buddyinfo(a) == [0] * MAX_ORDER + [4]
    assert a.unusable_index(MAX_ORDER) == 0.0


def test_order0_allocations_are_distinct_and_counted():
    a = FrameAllocator(2 * BLOCK)
    first = a.alloc(100)
    second = a.alloc(100)
    both = np.concatenate([first, second])
    assert both.size == 200 and np.unique(both).size == 200
    assert a.nr_free == 2 * BLOCK - 200
    assert not a.is_free(both).any()
    assert np.array_equal(np.sort(both), used_frames(a))


def test_order0_prefers_partly_used_pageblocks():
    a = FrameAllocator(4 * BLOCK)
    a.alloc(1)
    a.alloc(BLOCK - 2)
    # Everything so far fits in one pageblock, so three whole 2 MiB blocks remain.
    assert np.unique(used_frames(a) // BLOCK).size == 1
    assert a.alloc(3, MAX_ORDER).size == 3


@pytest.mark.parametrize("order", [1, 3, 4, 8, MAX_ORDER])
def test_order_k_blocks_are_aligned_and_disjoint(order):
    a = FrameAllocator(8 * BLOCK)
    a.alloc(7)  # make the first pageblock partly used
    before = used_frames(a)
    heads = a.alloc(5, order)
    assert heads.size == 5
    assert (heads % (1 << order) == 0).all()
    frames = (heads[:, None] + np.arange(1 << order)).ravel()
    assert np.unique(frames).size == frames.size
    assert not np.isin(frames, before).any()
    assert a.nr_free == 8 * BLOCK - 7 - 5 * (1 << order)


def test_order_k_short_of_contiguous_frames_returns_fewer():
    a = FrameAllocator(2 * BLOCK)
    a.alloc(1)
    # One pageblock is partly used, so only one whole order-9 block is left.
    assert a.alloc(2, MAX_ORDER).size == 1
    assert a.alloc(1, MAX_ORDER).size == 0


def test_order0_beyond_free_returns_what_is_left():
    a = FrameAllocator(BLOCK)
    got = a.alloc(BLOCK + 10)
    assert got.size == BLOCK
    assert a.nr_free == 0
    assert a.alloc(1).size == 0


def test_node_size_not_a_multiple_of_a_pageblock():
    a = FrameAllocator(BLOCK + 100)
    assert a.nr_free == BLOCK + 100
    got = a.alloc(10_000)
    assert got.size == BLOCK + 100 and got.max() < BLOCK + 100
    assert a.alloc(1, 2).size == 0
    a.free(got)
    assert a.nr_free == BLOCK + 100
    check_buddyinfo(a)


def test_bad_order_is_invalid_argument():
    a = FrameAllocator(BLOCK)
    with pytest.raises(InvalidArgument):
        a.alloc(1, MAX_ORDER + 1)
    with pytest.raises(InvalidArgument):
        a.alloc(1, -1)


def test_double_free_is_refused_and_changes_nothing():
    a = FrameAllocator(BLOCK)
    got = a.alloc(4)
    a.free(got[:2])
    with pytest.raises(RuntimeError, match="double free"):
        a.free(got[1:3])
    assert a.nr_free == BLOCK - 2
    assert not a.is_free(got[2:]).any()
    with pytest.raises(RuntimeError, match="double free"):
        a.free(np.array([got[3] + 50]))  # never allocated


def test_free_returns_to_start():
    a = FrameAllocator(4 * BLOCK)
    start = a.buddyinfo()
    rng = np.random.default_rng(1)
    held = [a.alloc(int(rng.integers(1, 300))) for _ in range(5)]
    held += [(h[:, None] + np.arange(16)).ravel() for h in [a.alloc(3, 4)]]
    rng.shuffle(held)
    for frames in held:
        a.free(frames)
    assert a.nr_free == 4 * BLOCK
    assert a.buddyinfo() == start
    assert a.unusable_index(MAX_ORDER) == 0.0


def test_buddyinfo_counts_maximal_aligned_blocks():
    a = FrameAllocator(2 * BLOCK)
    a.alloc(1)  # frame 0 of a pageblock: the rest of it splits into one block of each order 0..8
    info = check_buddyinfo(a)
    assert info == [1] * MAX_ORDER + [1]


def test_buddyinfo_stays_consistent_under_random_frees():
    a = FrameAllocator(4 * BLOCK)
    got = a.alloc(4 * BLOCK)
    rng = np.random.default_rng(7)
    rng.shuffle(got)
    for chunk in np.array_split(got, 9):
        a.free(chunk)
        check_buddyinfo(a)
    assert a.nr_free == 4 * BLOCK


def test_unusable_index_measures_fragmentation():
    a = FrameAllocator(4 * BLOCK)
    got = a.alloc(4 * BLOCK)
    keep = np.arange(4) * BLOCK + 5  # one used frame in every pageblock
    a.free(got[~np.isin(got, keep)])
    assert a.nr_free == 4 * (BLOCK - 1)
    assert a.unusable_index(MAX_ORDER) == 1.0  # no free 2 MiB block at all
    assert a.unusable_index(0) == 0.0  # every free frame serves an order-0 request
    assert 0.0 < a.unusable_index(3) < 1.0
    assert a.alloc(1, MAX_ORDER).size == 0
    a.free(keep[:1])
    assert a.unusable_index(MAX_ORDER) == pytest.approx(1 - BLOCK / a.nr_free)
    assert a.alloc(1, MAX_ORDER).size == 1


def test_unusable_index_of_a_full_node_is_zero():
    a = FrameAllocator(BLOCK)
    a.alloc(BLOCK)
    assert a.unusable_index(MAX_ORDER) == 0.0
    assert a.buddyinfo() == [0] * (MAX_ORDER + 1)


# -- Node and NodeMap ------------------------------------------------------------------------------------------
def test_nodemap_locates_pfns():
    with Machine(host_pages=1024, device_pages=512, devices=2, backend="cpu") as m:
        nm = NodeMap(m.nodes)
        pfns = np.array([0, 1023, 1024, 1535, 1536, 2047])
        nid, frame = nm.locate(pfns)
        assert nid.tolist() == [0, 0, 1, 1, 2, 2]
        assert frame.tolist() == [0, 1023, 0, 511, 0, 511]
        assert [n.base_pfn for n in m.nodes] == [0, 1024, 1536]
        assert nm.nr_pfns == 2048


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: locate_pair always defers to locate")
def test_nodemap_locates_a_copys_one_node_pair_as_locate_does():
    with Machine(host_pages=1024, device_pages=512, devices=2, backend="cpu") as m:
        nm = NodeMap(m.nodes)
        src = np.array([5, 0, 1023], dtype=np.int64)
        dst = np.array([1600, 2047, 1536], dtype=np.int64)
        s, sframe, d, dframe, nr = nm.locate_pair(src, dst)
        assert (s, d) == (0, 2)
        assert sframe.tolist() == nm.locate(src)[1].tolist() and dframe.tolist() == nm.locate(dst)[1].tolist()
        assert nr.tolist() == [1, 1, 1]  # base pages without page orders
        order = np.zeros(m.nodemap.nr_pfns, dtype=np.int8)
        order[[5, 0, 1023]] = [2, 0, 9]
        assert nm.locate_pair(src, dst, order)[4].tolist() == [4, 1, 512]  # each run the folio its source heads
        assert nm.locate_pair(np.array([5, 1024], dtype=np.int64), dst[:2]) is None  # sources on two nodes
        assert nm.locate_pair(src[:2], np.array([1600, 1024], dtype=np.int64)) is None  # destinations on two
        assert nm.locate_pair(src[:0], dst[:0]) is None
        assert nm.locate_pair(src.astype(np.int32), dst) is None  # another dtype: locate's business


@pytest.mark.skipif(not page_loops.HAVE_NUMBA, reason="numba is not available: locate_one always defers to locate")
def test_nodemap_locates_pfns_of_one_node_as_locate_does():
    with Machine(host_pages=1024, device_pages=512, devices=2, backend="cpu") as m:
        nm = NodeMap(m.nodes)
        pfns = np.array([1600, 2047, 1536], dtype=np.int64)
        n, frames = nm.locate_one(pfns)
        nid, want = nm.locate(pfns)
        assert n == 2 and (nid == 2).all() and frames.tolist() == want.tolist()
        assert nm.locate_one(np.array([5, 1024], dtype=np.int64)) is None  # two nodes: locate's business
        assert nm.locate_one(pfns[:0]) is None
        assert nm.locate_one(pfns.astype(np.int32)) is None


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_copy_runs_outside_their_buffers_are_refused_with_the_first_reason(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(copy_loops, "HAVE_NUMBA", False)
    src, dst = np.zeros((8, 64), np.uint8), np.zeros((4, 64), np.uint8)

    def runs(*cols):
        return [np.array(c, dtype=np.int64) for c in cols]

    copy_loops.check_runs(src, dst, *runs([0, 6], [0, 3], [2, 1]))  # inside: no error
    with pytest.raises(InvalidArgument, match="run lengths must be >= 0"):
        copy_loops.check_runs(src, dst, *runs([7, 0], [0, 9], [2, -1]))  # the negative length is named first
    with pytest.raises(InvalidArgument, match="a source run falls outside the 8 frames"):
        copy_loops.check_runs(src, dst, *runs([0, 7], [3, 9], [1, 2]))
    with pytest.raises(InvalidArgument, match="a destination run falls outside the 4 frames"):
        copy_loops.check_runs(src, dst, *runs([0, 0], [3, 0], [2, 1]))
    with pytest.raises(InvalidArgument, match="a source run falls outside"):
        copy_loops.check_runs(src, dst, *runs([-1], [0], [1]))


def test_node_fragmentation_report():
    with Machine(host_pages=1024, device_pages=2048, backend="cpu") as m:
        node = m.nodes[1]
        rep = node.fragmentation()
        assert rep["free_pages"] == 2048
        assert rep["buddyinfo"][MAX_ORDER] == 4
        assert rep["unusable_index_order9"] == 0.0
        got = m.alloc_pages(1, 2048)
        m.put_pages(got[(got - node.base_pfn) % BLOCK != 0])
        rep = node.fragmentation()
        assert rep["free_pages"] == 2048 - 4
        assert rep["buddyinfo"][MAX_ORDER] == 0
        assert rep["unusable_index_order9"] == 1.0
        assert "free_pages=2044" in repr(node)


# -- Machine.alloc_pages / put_pages --------------------------------------------------------------------------
@pytest.fixture
def m():
    with Machine(host_pages=2048, device_pages=2048, devices=1, backend="cpu", channels=2) as mach:
        yield mach


@pytest.mark.parametrize("order", [0, 2, MAX_ORDER])
def test_alloc_pages_gives_zeroed_aligned_folios(m, order):
    node = m.nodes[1]
    heads = m.alloc_pages(1, 3, order=order)
    assert heads.size == 3
    assert ((heads - node.base_pfn) % (1 << order) == 0).all()
    assert node.free_pages == 2048 - (3 << order)
    pfns = m.pages.expand(heads)
    assert (m.nodemap.node_of(pfns) == 1).all()
    assert not m.frames.read_pfns(pfns).any()
    st = m.page_controls.page_state(int(heads[0]))
    assert st["refcount"] == 1 and st["order"] == order and st["mapping"] == -1
    if order:
        tail = m.page_controls.page_state(int(heads[0]) + 1)
        assert tail["head"] == heads[0]
    m.put_pages(heads)
    assert node.free_pages == 2048


def test_alloc_pages_zeroes_recycled_frames(m):
    heads = m.alloc_pages(1, 4)
    m.frames.write_pfns(heads, np.full((4, m.page_size), 0xAB, np.uint8))
    m.put_pages(heads)
    again = m.alloc_pages(1, 2048)
    assert not m.frames.read_pfns(again).any()
    m.put_pages(again)


def test_alloc_pages_out_of_memory_allocates_nothing(m):
    held = m.alloc_pages(1, 2000)
    with pytest.raises(OutOfMemory, match="node 1"):
        m.alloc_pages(1, 100)
    assert m.nodes[1].free_pages == 48
    with pytest.raises(OutOfMemory):
        m.alloc_pages(1, 1, order=MAX_ORDER)
    assert m.nodes[1].free_pages == 48
    m.put_pages(held)
    assert m.nodes[1].free_pages == 2048


@pytest.mark.parametrize("kw", [
    {"node": 2}, {"node": -1}, {"node": 1.0}, {"count": 0}, {"count": -3},
    {"order": MAX_ORDER + 1}, {"order": -1},
])
def test_alloc_pages_bad_arguments(m, kw):
    args = {"node": 1, "count": 2, "order": 0} | kw
    with pytest.raises(InvalidArgument):
        m.alloc_pages(args["node"], args["count"], order=args["order"])
    assert [n.free_pages for n in m.nodes] == [2048, 2048]


def test_put_pages_refuses_double_free_and_mapped_pages(m):
    heads = m.alloc_pages(1, 2)
    m.put_pages(heads[:1])
    with pytest.raises(InvalidArgument):
        m.put_pages(heads[:1])
    assert m.nodes[1].free_pages == 2047
    mm = m.address_space()
    addr = mm.mmap(m.page_size)
    mm.write(addr, b"x")
    with pytest.raises(InvalidArgument):
        m.put_pages([mm.pfn_of(addr)])
    assert mm.read(addr, 1).tobytes() == b"x"
    big = m.alloc_pages(1, 1, order=2)
    with pytest.raises(InvalidArgument):
        m.put_pages(big + 1)  # a tail page is not a folio head
    m.put_pages(big)
    m.put_pages(heads[1:])
    mm.close()
    assert [n.free_pages for n in m.nodes] == [2048, 2048]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_compiled_allocator_matches_the_numpy_reference(seed):
    """Random allocations and frees of every order: the compiled loops hand out exactly the numpy frames."""
    import dmamig.nodes as nodes_mod

    rng = np.random.default_rng(seed)
    # (free one held block first?, which one as a fraction of those held, order, count)
    ops = [(bool(rng.integers(0, 2)), float(rng.random()), int(rng.choice([0, 0, 1, 4, 9])),
            int(rng.integers(1, 40))) for _ in range(30)]
    results = []
    for compiled in (True, False):
        nodes_mod.USE_COMPILED = compiled
        try:
            a = FrameAllocator(4096 + 300)
            held: list[np.ndarray] = []
            got = []
            for free_some, which, order, count in ops:
                if free_some and held:
                    a.free(held.pop(int(which * len(held))))
                heads = a.alloc(count, order)
                got.append(heads.tolist())
                if heads.size:
                    held.append((heads[:, None] + np.arange(1 << order)).ravel())
            results.append((got, a.nr_free, a.is_free(np.arange(4096 + 300)).tolist()))
        finally:
            nodes_mod.USE_COMPILED = True
    assert results[0] == results[1]
