"""Address spaces: mmap, faults, read/write, populate, munmap, fork, pins, close and migrate_to_ram."""

from __future__ import annotations

import numpy as np
import pytest
from support import free, rand

from dmamig import AddressFault, InvalidArgument, MigrateMode, OutOfMemory, PteFlag
from dmamig.mm_struct import MMAP_BASE
from dmamig.vma import ZERO_PFN

HOST = 4096
DEV = 4096


START = [HOST, DEV, DEV]


# -- mmap ------------------------------------------------------------------------------------------------------
def test_mmap_returns_page_aligned_disjoint_ranges(m, mm):
    ps = m.page_size
    a = mm.mmap(3 * ps)
    b = mm.mmap(1)  # rounded up to one page
    c = mm.mmap(5 * ps + 7)
    assert a % ps == 0 and b % ps == 0 and c % ps == 0
    spans = sorted([(a, a + 3 * ps), (b, b + ps), (c, c + 6 * ps)])
    for (_s0, e0), (s1, _e1) in zip(spans, spans[1:]):
        assert e0 < s1  # never adjacent: a guard gap between mappings
    assert [(v.start, v.npages) for v in mm.vmas] == [(a, 3), (b, 1), (c, 6)]
    assert free(m) == START  # mmap alone allocates nothing
    assert mm.node_of(c + 5 * ps) == -1 and mm.pfn_of(a) == -1


@pytest.mark.parametrize("order", [1, 4, 9])
def test_mmap_order_aligns_to_the_folio_size(m, mm, order):
    mm.mmap(m.page_size)  # move the next address off any large alignment
    addr = mm.mmap(m.page_size << order, order=order)
    assert addr % (m.page_size << order) == 0


@pytest.mark.parametrize("kw", [
    {"length": 0}, {"length": -1}, {"length": 1.5}, {"length": True}, {"length": "4096"},
    {"order": -1}, {"order": 10}, {"order": 1.0}, {"order": True},
])
def test_mmap_bad_arguments(m, mm, kw):
    args = {"length": m.page_size, "order": 0} | kw
    with pytest.raises(InvalidArgument):
        mm.mmap(args["length"], order=args["order"])
    assert mm.vmas == ()


@pytest.mark.parametrize("kw, match", [
    ({"length": 2**60}, "address space"), ({"length": 2**44}, "at most"), ({"shared": np.zeros(2)}, "shared"),
    ({"shared": 1}, "shared"),
])
def test_mmap_limits_are_checked_before_anything_changes(m, mm, kw, match):
    args = {"length": m.page_size, "shared": False} | kw
    with pytest.raises(InvalidArgument, match=match):
        mm.mmap(args["length"], shared=args["shared"])
    assert mm.vmas == ()
    assert mm.mmap(m.page_size) == MMAP_BASE  # a refused mmap leaves the address cursor alone


# -- read / write / faults -------------------------------------------------------------------------------------
def test_first_touch_read_maps_the_zero_page(m, mm):
    """do_anonymous_page: a read fault on untouched private memory maps the shared zero page, no frame."""
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    faults = m.vmstat["pgfault"]
    out = mm.read(addr + ps + 10, 2 * ps)
    assert out.dtype == np.uint8 and out.shape == (2 * ps,)
    assert not out.any()
    assert mm.pfns_of(addr, 4 * ps).tolist() == [-1, ZERO_PFN, ZERO_PFN, ZERO_PFN]
    assert mm.nodes_of(addr, 4 * ps).tolist() == [-1, -1, -1, -1]
    assert mm.pte_flags(addr + ps) == PteFlag.PRESENT | PteFlag.YOUNG | PteFlag.SPECIAL
    assert m.vmstat["pgfault"] - faults == 3
    assert free(m) == START


def test_first_touch_write_is_zero_filled_on_the_host(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    m.alloc_pages(0, 1)  # a recycled frame must still read as zeros
    mm.write(addr + ps + 10, b"x")
    assert mm.nodes_of(addr, 4 * ps).tolist() == [-1, 0, -1, -1]
    out = mm.read(addr + ps, ps)
    assert out[10] == ord("x") and not out[:10].any() and not out[11:].any()
    assert m.nodes[0].free_pages == HOST - 1 - 1


def test_fault_after_reuse_of_dirty_frames_is_zeroed(m, mm):
    ps = m.page_size
    a = mm.mmap(8 * ps)
    mm.write(a, np.full(8 * ps, 0xEE, np.uint8))
    mm.munmap(a, 8 * ps)
    b = mm.mmap(8 * ps)
    assert not mm.read(b, 8 * ps).any()


@pytest.mark.parametrize("off, length", [(0, 1), (1, 4095), (4095, 2), (100, 3 * 4096), (4096 - 7, 4096 * 2 + 9),
                                         (0, 5 * 4096), (5 * 4096 - 1, 1)])
def test_unaligned_write_then_read(m, mm, off, length):
    ps = m.page_size
    addr = mm.mmap(5 * ps)
    base = rand(5 * ps, 1)
    mm.write(addr, base)
    data = rand(length, 2)
    mm.write(addr + off, data)
    expect = base.copy()
    expect[off: off + length] = data
    assert np.array_equal(mm.read(addr, 5 * ps), expect)
    assert np.array_equal(mm.read(addr + off, length), data)


def test_partial_write_to_fresh_pages_keeps_zeroes_around_it(m, mm):
    ps = m.page_size
    addr = mm.mmap(3 * ps)
    mm.write(addr + ps - 3, b"abcdef")
    assert mm.nodes_of(addr, 3 * ps).tolist() == [0, 0, -1]
    out = mm.read(addr, 3 * ps)
    assert mm.pfn_of(addr + 2 * ps) == ZERO_PFN
    assert out[ps - 3: ps + 3].tobytes() == b"abcdef"
    assert not out[: ps - 3].any() and not out[ps + 3:].any()


def test_write_accepts_bytes_like_and_uint8_arrays(m, mm):
    addr = mm.mmap(m.page_size)
    mm.write(addr, b"ab")
    mm.write(addr + 2, bytearray(b"cd"))
    mm.write(addr + 4, memoryview(b"ef"))
    mm.write(addr + 6, np.frombuffer(b"gh", np.uint8))
    mm.write(addr + 8, np.arange(4, dtype=np.uint8).reshape(2, 2))
    assert mm.read(addr, 12).tobytes() == b"abcdefgh\x00\x01\x02\x03"


def test_read_returns_a_copy(m, mm):
    addr = mm.mmap(m.page_size)
    mm.write(addr, b"abc")
    out = mm.read(addr, 3)
    out[:] = 0
    assert mm.read(addr, 3).tobytes() == b"abc"


def test_read_and_write_up_to_the_end_of_a_mapping(m, mm):
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr + 2 * ps - 4, b"tail")
    assert mm.read(addr + 2 * ps - 4, 4).tobytes() == b"tail"
    with pytest.raises(AddressFault):
        mm.read(addr + 2 * ps - 4, 5)
    with pytest.raises(AddressFault):
        mm.write(addr + 2 * ps - 1, b"xy")
    assert mm.read(addr + 2 * ps - 4, 4).tobytes() == b"tail"


def test_access_spanning_two_mappings_faults_without_side_effects(m, mm):
    ps = m.page_size
    a = mm.mmap(2 * ps)
    mm.mmap(2 * ps)
    before = free(m)
    with pytest.raises(AddressFault):
        mm.write(a + ps, np.ones(4 * ps, np.uint8))  # runs over the guard gap
    assert free(m) == before
    assert mm.nodes_of(a, 2 * ps).tolist() == [-1, -1]


@pytest.mark.parametrize("op", ["read", "write", "populate", "node_of", "pfn_of", "pte_flags", "migrate", "pin"])
def test_unmapped_address_faults(m, mm, op):
    ps = m.page_size
    addr = mm.mmap(ps)
    hole = addr + 16 * ps
    call = {
        "read": lambda: mm.read(hole, 1), "write": lambda: mm.write(hole, b"x"),
        "populate": lambda: mm.populate(hole, ps), "node_of": lambda: mm.node_of(hole),
        "pfn_of": lambda: mm.pfn_of(hole), "pte_flags": lambda: mm.pte_flags(hole),
        "migrate": lambda: mm.migrate(hole, ps, 1), "pin": lambda: mm.pin(hole, ps),
    }[op]
    with pytest.raises(AddressFault):
        call()
    assert free(m) == START


def test_pfn_of_and_node_of_after_populate(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.populate(addr + ps, 2 * ps, node=2)
    assert mm.nodes_of(addr, 4 * ps).tolist() == [-1, 2, 2, -1]
    assert mm.node_of(addr + ps + 5) == 2
    pfn = mm.pfn_of(addr + ps)
    base = m.nodes[2].base_pfn
    assert base <= pfn < base + DEV
    assert mm.pfn_of(addr) == -1 and mm.node_of(addr + 3 * ps) == -1
    assert m.nodes[2].free_pages == DEV - 2
    st = m.page_controls.page_state(pfn)
    assert st["node"] == 2 and st["mapcount"] == 1 and st["refcount"] == 1


def test_populate_keeps_present_pages_where_they_are(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.write(addr, rand(ps, 3))
    mm.populate(addr, 4 * ps, node=1)
    assert mm.nodes_of(addr, 4 * ps).tolist() == [0, 1, 1, 1]
    assert np.array_equal(mm.read(addr, ps), rand(ps, 3))


def test_populate_out_of_memory_leaks_nothing(m, mm):
    ps = m.page_size
    addr = mm.mmap((DEV + 1) * ps)
    before = free(m)
    with pytest.raises(OutOfMemory, match="node 1"):
        mm.populate(addr, (DEV + 1) * ps, node=1)
    assert free(m) == before
    assert (mm.nodes_of(addr, (DEV + 1) * ps) == -1).all()
    mm.populate(addr, DEV * ps, node=1)  # what fits still fits
    assert m.nodes[1].free_pages == 0


def test_write_out_of_host_memory_changes_nothing(m, mm):
    ps = m.page_size
    held = m.alloc_pages(0, HOST - 2)
    addr = mm.mmap(4 * ps)
    mm.write(addr, b"keep")
    with pytest.raises(OutOfMemory):
        mm.write(addr, np.ones(4 * ps, np.uint8))
    assert mm.read(addr, 4).tobytes() == b"keep"
    assert m.nodes[0].free_pages == 1
    m.put_pages(held)


def test_pte_flags_follow_accesses(m, mm):
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    assert mm.pte_flags(addr) == PteFlag(0)
    mm.populate(addr, 2 * ps)
    assert mm.pte_flags(addr) == PteFlag.PRESENT | PteFlag.WRITE | PteFlag.YOUNG
    mm.write(addr + ps, b"x")
    assert PteFlag.DIRTY in mm.pte_flags(addr + ps)
    assert PteFlag.DIRTY not in mm.pte_flags(addr)


# -- bad arguments leave the machine unchanged ---------------------------------------------------------------
def _bad_calls(mm, addr, ps):
    return {
        "read-zero-length": lambda: mm.read(addr, 0),
        "read-negative-length": lambda: mm.read(addr, -4),
        "read-negative-addr": lambda: mm.read(-ps, 4),
        "read-float-addr": lambda: mm.read(float(addr), 4),
        "read-bool-length": lambda: mm.read(addr, True),
        "write-float64": lambda: mm.write(addr, np.ones(8, np.float64)),
        "write-int32": lambda: mm.write(addr, np.ones(8, np.int32)),
        "write-list": lambda: mm.write(addr, [1, 2, 3]),
        "write-str": lambda: mm.write(addr, "text"),
        "write-empty": lambda: mm.write(addr, b""),
        "populate-bad-node": lambda: mm.populate(addr, ps, node=3),
        "populate-negative-node": lambda: mm.populate(addr, ps, node=-1),
        "populate-str-node": lambda: mm.populate(addr, ps, node="1"),
        "populate-zero-length": lambda: mm.populate(addr, 0),
        "migrate-unaligned": lambda: mm.migrate(addr + 1, ps, 1),
        "migrate-bad-node": lambda: mm.migrate(addr, ps, 7),
        "migrate-zero-length": lambda: mm.migrate(addr, 0, 1),
        "migrate-bad-mode": lambda: mm.migrate(addr, ps, 1, mode="SYNC"),
        "munmap-unaligned": lambda: mm.munmap(addr + 1, ps),
        "munmap-zero-length": lambda: mm.munmap(addr, 0),
        "pin-unaligned": lambda: mm.pin(addr + 8, ps),
        "pin-negative-length": lambda: mm.pin(addr, -ps),
        "unpin-unpinned": lambda: mm.unpin(addr, ps),
    }


BAD = list(_bad_calls(None, 0, 4096))


@pytest.mark.parametrize("name", BAD)
def test_bad_arguments_raise_invalid_argument_and_change_nothing(m, mm, name):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    data = rand(4 * ps, 4)
    mm.write(addr, data)
    before = free(m)
    vmstat = m.vmstat
    pte = [mm.pte_flags(addr + i * ps) for i in range(4)]
    with pytest.raises(InvalidArgument):
        _bad_calls(mm, addr, ps)[name]()
    assert free(m) == before
    assert m.vmstat == vmstat
    assert [mm.pte_flags(addr + i * ps) for i in range(4)] == pte
    assert np.array_equal(mm.read(addr, 4 * ps), data)
    assert len(mm.vmas) == 1


# -- munmap ----------------------------------------------------------------------------------------------------
def test_munmap_whole_mapping_frees_frames(m, mm):
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    mm.write(addr, rand(8 * ps))
    mm.populate(addr, 8 * ps)
    assert m.nodes[0].free_pages == HOST - 8
    mm.munmap(addr, 8 * ps)
    assert free(m) == START
    assert mm.vmas == ()
    with pytest.raises(AddressFault):
        mm.read(addr, 1)


@pytest.mark.parametrize("first, count", [(3, 2), (0, 3), (5, 3), (1, 6)])
def test_partial_munmap_splits_and_keeps_the_rest(m, mm, first, count):
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    data = rand(8 * ps, 5)
    mm.write(addr, data)
    mm.migrate(addr + 4 * ps, 2 * ps, 1)  # some pages on a device node: freed there
    mm.munmap(addr + first * ps, count * ps)
    kept = [i for i in range(8) if not first <= i < first + count]
    assert sum(n.total_pages - n.free_pages for n in m.nodes) == len(kept)
    for i in range(8):
        if i in kept:
            assert np.array_equal(mm.read(addr + i * ps, ps), data[i * ps: (i + 1) * ps])
        else:
            with pytest.raises(AddressFault):
                mm.read(addr + i * ps, 1)
    pieces = [(v.start, v.npages) for v in mm.vmas]
    expect = []
    if first:
        expect.append((addr, first))
    if first + count < 8:
        expect.append((addr + (first + count) * ps, 8 - first - count))
    assert pieces == expect
    mm.close()
    assert free(m) == START


def test_munmap_rounds_length_up_and_tolerates_holes(m, mm):
    ps = m.page_size
    a = mm.mmap(2 * ps)
    b = mm.mmap(2 * ps)
    mm.write(a, rand(2 * ps))
    mm.write(b, rand(2 * ps))
    mm.munmap(a + ps, b - a)  # from the second page of a over the gap into the first page of b (rounded up)
    assert [(v.start, v.npages) for v in mm.vmas] == [(a, 1), (b + ps, 1)]
    mm.munmap(a + 100 * ps, ps)  # nothing mapped there: fine
    assert sum(n.total_pages - n.free_pages for n in m.nodes) == 2


def test_munmap_then_mmap_again_reads_zero(m, mm):
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    mm.write(addr, rand(4 * ps))
    mm.munmap(addr + ps, ps)
    with pytest.raises(AddressFault):
        mm.write(addr + ps, b"x")
    b = mm.mmap(ps)
    assert not mm.read(b, ps).any()


# -- fork ------------------------------------------------------------------------------------------------------
def test_fork_shares_private_memory_copy_on_write(m, mm):
    """copy_present_pte: the child maps the parent's frames, write-protected in both, until one writes."""
    ps = m.page_size
    addr = mm.mmap(4 * ps)
    data = rand(3 * ps, 6)
    mm.write(addr, data)
    mm.migrate(addr + 2 * ps, ps, 2)
    child = mm.fork()
    assert np.array_equal(child.pfns_of(addr, 4 * ps), mm.pfns_of(addr, 4 * ps))
    assert sum(n.total_pages - n.free_pages for n in m.nodes) == 3  # one frame per page, shared
    for i in range(3):
        st = m.page_controls.page_state(mm.pfn_of(addr + i * ps))
        assert st["mapcount"] == 2 and st["refcount"] == 2
        assert PteFlag.WRITE not in mm.pte_flags(addr + i * ps)
        assert PteFlag.WRITE not in child.pte_flags(addr + i * ps)
    child.write(addr, b"child")
    mm.write(addr + ps, b"parent")
    assert sum(n.total_pages - n.free_pages for n in m.nodes) == 5  # each writer got a copy of one page
    assert mm.read(addr, 5).tobytes() == data[:5].tobytes()
    assert child.read(addr + ps, 6).tobytes() == data[ps: ps + 6].tobytes()
    assert child.read(addr, 5).tobytes() == b"child"
    assert mm.read(addr + ps, 6).tobytes() == b"parent"
    assert np.array_equal(child.read(addr + 2 * ps, ps), data[2 * ps:])
    assert child.pfn_of(addr + 2 * ps) == mm.pfn_of(addr + 2 * ps)  # read, never written: still shared
    # The page unpopulated at fork is independent in both.
    child.write(addr + 3 * ps, b"c")
    assert mm.read(addr + 3 * ps, 1).tobytes() == b"\x00"
    st = m.page_controls.page_state(mm.pfn_of(addr))
    assert st["mapcount"] == 1 and st["refcount"] == 1
    child.close()
    mm.close()
    assert free(m) == START


def test_fork_shares_shared_memory(m, mm):
    ps = m.page_size
    addr = mm.mmap(3 * ps, shared=True)
    mm.write(addr, b"hello")
    mm.populate(addr + ps, ps, node=1)
    child = mm.fork()
    for off in (0, ps):
        assert child.pfn_of(addr + off) == mm.pfn_of(addr + off)
        st = m.page_controls.page_state(mm.pfn_of(addr + off))
        assert st["mapcount"] == 2
        assert st["refcount"] == 3  # two PTEs and the page cache
    child.write(addr + 1, b"ELLO")
    assert mm.read(addr, 5).tobytes() == b"hELLO"
    mm.write(addr + 2 * ps, b"late")  # populated after the fork: the child finds it in the page cache
    assert child.read(addr + 2 * ps, 4).tobytes() == b"late"
    assert child.pfn_of(addr + 2 * ps) == mm.pfn_of(addr + 2 * ps)
    assert sum(n.total_pages - n.free_pages for n in m.nodes) == 3
    mm.close()
    assert child.read(addr, 5).tobytes() == b"hELLO"
    assert m.page_controls.page_state(child.pfn_of(addr))["mapcount"] == 1
    child.close()
    assert free(m) == START


def test_fork_of_a_closed_space_is_refused(m, mm):
    mm.close()
    with pytest.raises(InvalidArgument):
        mm.fork()


def test_fork_out_of_memory_leaves_nothing_behind(m, mm):
    """copy_present_page: pinned pages are copied at fork, and a fork without frames for them fails whole."""
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    mm.write(addr, rand(8 * ps))
    mm.pin(addr, 8 * ps)
    held = m.alloc_pages(0, HOST - 8 - 4)
    with pytest.raises(OutOfMemory):
        mm.fork()
    assert m.nodes[0].free_pages == 4  # the partial child was torn down
    assert len(m.address_spaces) == 1
    m.put_pages(held)
    child = mm.fork()  # with frames it works
    assert np.array_equal(child.read(addr, 8 * ps), mm.read(addr, 8 * ps))
    assert (child.pfns_of(addr, 8 * ps) != mm.pfns_of(addr, 8 * ps)).all()
    mm.unpin(addr, 8 * ps)
    child.close()
    mm.close()
    assert free(m) == START


# -- pins ------------------------------------------------------------------------------------------------------
def test_pin_faults_in_and_holds_a_reference(m, mm):
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.pin(addr, 2 * ps)
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 0]
    pfn = mm.pfn_of(addr)
    assert m.page_controls.page_state(pfn)["refcount"] == 2
    mm.pin(addr, ps)
    assert m.page_controls.page_state(pfn)["refcount"] == 3
    mm.unpin(addr, ps)
    mm.unpin(addr, 2 * ps)
    assert m.page_controls.page_state(pfn)["refcount"] == 1
    with pytest.raises(InvalidArgument, match="not pinned"):
        mm.unpin(addr, ps)
    assert m.page_controls.page_state(pfn)["refcount"] == 1


def test_pinned_page_outlives_munmap_until_close(m, mm):
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr, rand(2 * ps))
    mm.pin(addr, ps)
    mm.munmap(addr, 2 * ps)
    assert m.nodes[0].free_pages == HOST - 1  # the pinned frame stays allocated
    mm.close()
    assert free(m) == START


def test_pinned_shared_page_outlives_the_mapping(m, mm):
    ps = m.page_size
    addr = mm.mmap(ps, shared=True)
    mm.write(addr, b"s")
    other = m.address_space()
    b = other.mmap(ps)
    other.pin(b, ps)
    mm.pin(addr, ps)
    mm.munmap(addr, ps)
    assert m.nodes[0].free_pages == HOST - 2
    mm.close()
    other.close()
    assert free(m) == START


# -- close -----------------------------------------------------------------------------------------------------
def test_close_frees_everything(m):
    ps = m.page_size
    mm = m.address_space()
    a = mm.mmap(16 * ps)
    b = mm.mmap(4 * ps, shared=True)
    c = mm.mmap(1024 * ps, order=9)
    mm.write(a, rand(16 * ps))
    mm.write(b, rand(4 * ps))
    mm.write(c + 10, b"x")
    mm.migrate(a, 8 * ps, 1)
    mm.migrate(c, 512 * ps, 2)
    mm.pin(a + 8 * ps, 2 * ps)
    child = mm.fork()
    mm.close()
    mm.close()  # idempotent
    child.close()
    assert free(m) == START
    with pytest.raises(InvalidArgument, match="closed"):
        mm.mmap(ps)
    with pytest.raises(InvalidArgument, match="closed"):
        mm.read(a, 1)


# -- device-resident pages and the CPU -------------------------------------------------------------------------
@pytest.mark.parametrize("access", ["read", "write"])
def test_cpu_access_brings_device_pages_back(m, mm, access):
    ps = m.page_size
    addr = mm.mmap(8 * ps)
    data = rand(8 * ps, 8)
    mm.write(addr, data)
    res = mm.migrate(addr, 8 * ps, 1)
    assert res.nr_succeeded == 8
    assert (mm.nodes_of(addr, 8 * ps) == 1).all()
    before = m.vmstat["migrate_to_ram"]
    if access == "read":
        assert np.array_equal(mm.read(addr + 2 * ps + 1, 2 * ps), data[2 * ps + 1: 4 * ps + 1])
    else:
        mm.write(addr + 2 * ps + 1, b"\xff" * (2 * ps))
        data[2 * ps + 1: 4 * ps + 1] = 0xFF
    assert m.vmstat["migrate_to_ram"] - before == 3
    assert mm.nodes_of(addr, 8 * ps).tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    assert m.nodes[1].free_pages == DEV - 5
    assert np.array_equal(mm.read(addr, 8 * ps), data)


def test_referenced_device_page_is_accessed_in_place(m, mm):
    """A coherent device page held by a reference cannot migrate back: the CPU accesses it where it is."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr, b"pinned")
    mm.populate(addr, 2 * ps)
    mm.migrate(addr, 2 * ps, 1)
    pfn = mm.pfn_of(addr)
    m.page_controls.get_page(pfn)
    assert mm.read(addr, 6).tobytes() == b"pinned"
    mm.write(addr, b"PIN")
    assert mm.nodes_of(addr, 2 * ps).tolist() == [1, 1]
    assert mm.read(addr, 6).tobytes() == b"PINned"
    m.page_controls.put_page(pfn)
    assert mm.read(addr, 6).tobytes() == b"PINned"
    assert mm.node_of(addr) == 0


def test_long_term_pin_brings_a_coherent_device_page_to_host(m, mm):
    """FOLL_LONGTERM: a device page is not long-term pinnable, so pin migrates it back first."""
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    mm.write(addr, b"pinned")
    mm.populate(addr, 2 * ps)
    mm.migrate(addr, 2 * ps, 1)
    mm.pin(addr, ps)
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 1]
    assert mm.read(addr, 6).tobytes() == b"pinned"
    mm.unpin(addr, ps)


def test_device_page_read_with_full_host_is_accessed_in_place(m, mm):
    ps = m.page_size
    addr = mm.mmap(2 * ps)
    data = rand(2 * ps, 9)
    mm.write(addr, data)
    mm.migrate(addr, 2 * ps, 1)
    held = m.alloc_pages(0, HOST)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    assert mm.nodes_of(addr, 2 * ps).tolist() == [1, 1]
    m.put_pages(held)
    assert np.array_equal(mm.read(addr, 2 * ps), data)
    assert mm.nodes_of(addr, 2 * ps).tolist() == [0, 0]


def test_shared_device_page_comes_back_for_every_mapper(m, mm):
    ps = m.page_size
    addr = mm.mmap(2 * ps, shared=True)
    mm.write(addr, b"shared!")
    child = mm.fork()
    res = mm.migrate(addr, 2 * ps, 2, mode=MigrateMode.SYNC, move_all=True)
    assert res.nr_succeeded == 1
    assert child.node_of(addr) == 2 and mm.node_of(addr) == 2
    assert child.read(addr, 7).tobytes() == b"shared!"
    assert mm.node_of(addr) == 0 and child.pfn_of(addr) == mm.pfn_of(addr)
    st = m.page_controls.page_state(mm.pfn_of(addr))
    assert st["mapcount"] == 2 and st["refcount"] == 3
    child.close()
    mm.close()
    assert free(m) == START


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_a_vma_finds_its_migration_entries_in_any_slice(m, mm, monkeypatch, compiled):
    import dmamig.vma as vma_mod

    monkeypatch.setattr(vma_mod, "USE_LOOPS", compiled and vma_mod.USE_LOOPS)
    addr = mm.mmap(64 * m.page_size)
    mm.write(addr, b"x" * (64 * m.page_size))
    v = [v for v in mm.vmas if v.start == addr][0]
    assert not v.has_migration_entries()
    v.pte_flags[40] |= np.uint8(PteFlag.MIGRATION)
    try:
        got = [v.has_migration_entries(*s) for s in [(), (0, 40), (40, 41), (41,), (30, 10**6), (-24,), (-23,)]]
        assert got == [True, False, True, False, True, True, False]
    finally:
        v.pte_flags[40] &= np.uint8(~np.uint8(PteFlag.MIGRATION))


def test_a_lookup_by_address_agrees_with_each_page_table_whether_one_vma_or_several_hold_its_addresses(m, mm):
    ps = m.page_size
    a = mm.mmap(8 * ps)
    b = mm.mmap(4 * ps)
    mm.write(a, rand(8 * ps, 1))
    mm.write(b, rand(4 * ps, 2))
    mms = mm.mm_struct
    for addrs in ([a + 5 * ps, a, a + 7 * ps], [b + 3 * ps, a + ps, b], [a + 2 * ps], [b + 100 * ps, a]):
        arr = np.array(addrs, dtype=np.int64)
        pfns, hits = mms.lookup(arr)
        want = [mm.pfn_of(x) if (a <= x < a + 8 * ps or b <= x < b + 4 * ps) else -1 for x in addrs]
        assert pfns.tolist() == want
        covered = np.zeros(arr.size, dtype=bool)
        for v, pos, slots in hits:
            assert (v.pte_pfn[slots] == pfns[pos]).all() and (arr[pos] == v.start + slots * ps).all()
            covered[pos] = True
        assert covered.tolist() == [w != -1 for w in want]
