"""The DMA planner: sorting, coalescing, splitting, balancing and method choice (pure numpy, no backend)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmamig.dma.copy_plan import METHOD_BATCH, METHOD_GATHER, METHOD_MEMCPY, PlanOptions
from dmamig.dma.plan import plan_copy
from dmamig.dma.plan_steps import coalesce_runs, sort_pages
from dmamig.errors import InvalidArgument

NO_SPLIT = PlanOptions(split_min_pages=1 << 40)


def expand(plan):
    """Every page of a plan as rows (src_node, src_idx, dst_node, dst_idx), in plan order."""
    n = plan.npages.astype(np.int64)
    first = np.repeat(np.cumsum(n) - n, n)
    off = np.arange(int(n.sum())) - first
    return np.stack([np.repeat(plan.src_node, n), np.repeat(plan.src_start, n) + off,
                     np.repeat(plan.dst_node, n), np.repeat(plan.dst_start, n) + off], axis=1)


def as_set(rows):
    return sorted(map(tuple, np.asarray(rows).tolist()))


def reference_runs(sn, si, dn, di):
    """Maximal runs by a plain loop: sort by (pair, src), merge neighbours contiguous on both sides."""
    order = sorted(range(len(si)), key=lambda i: (sn[i], dn[i], si[i], i))
    runs = []
    for i in order:
        if runs:
            r = runs[-1]
            if (r[0], r[2]) == (sn[i], dn[i]) and si[i] == r[1] + r[4] and di[i] == r[3] + r[4]:
                r[4] += 1
                continue
        runs.append([sn[i], si[i], dn[i], di[i], 1])
    return runs


def check_plan(plan, sn, si, dn, di, channels):
    # Exactly the requested pages, each once.
    assert as_set(expand(plan)) == as_set(np.stack([sn, si, dn, di], axis=1))
    assert (plan.npages >= 1).all()
    assert plan.channel.min() >= 0 and plan.channel.max() < channels
    # Segments are homogeneous, ordered and cover every run.
    covered = 0
    keys = []
    for seg in plan.segments():
        sl = seg.runs
        assert sl.start == covered
        covered = sl.stop
        for arr, val in ((plan.channel, seg.channel), (plan.src_node, seg.src_node),
                         (plan.dst_node, seg.dst_node), (plan.method, seg.method)):
            assert (arr[sl] == val).all()
        keys.append((seg.channel, seg.src_node, seg.dst_node, seg.method))
    assert covered == plan.nr_runs
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    # Within a segment the runs stay in source order.
    for seg in plan.segments():
        s = plan.src_start[seg.runs]
        assert (np.diff(s) > 0).all() or s.size <= 1 or (np.diff(s) >= 0).all()


# -- crafted cases ---------------------------------------------------------------------------------------------
def test_contiguous_block_is_one_run():
    plan = plan_copy(np.zeros(100), np.arange(100), np.ones(100), np.arange(50, 150), channels=1)
    assert plan.nr_runs == 1
    assert (plan.src_start[0], plan.dst_start[0], plan.npages[0]) == (0, 50, 100)
    assert plan.method[0] == METHOD_MEMCPY


def test_contiguous_on_one_side_only_does_not_coalesce():
    src = np.arange(10)
    dst = np.arange(10) * 2  # contiguous source, strided destination
    plan = plan_copy(np.zeros(10), src, np.ones(10), dst, channels=1)
    assert plan.nr_runs == 10
    plan = plan_copy(np.zeros(10), dst, np.ones(10), src, channels=1)
    assert plan.nr_runs == 10
    assert (plan.method == METHOD_GATHER).all()


def test_unsorted_input_coalesces_after_sort():
    rng = np.random.default_rng(1)
    perm = rng.permutation(64)
    plan = plan_copy(np.zeros(64), perm + 1000, np.ones(64), perm + 7, channels=1)
    assert plan.nr_runs == 1
    assert (plan.src_start[0], plan.dst_start[0], plan.npages[0]) == (1000, 7, 64)


def test_runs_break_at_node_pair_changes():
    # Frame indices continue across the pair boundary but the node pair changes: two runs.
    sn = np.array([0, 0, 0, 0])
    dn = np.array([1, 1, 2, 2])
    plan = plan_copy(sn, np.arange(4), dn, np.arange(4), channels=1)
    assert plan.nr_runs == 2
    assert sorted(zip(plan.dst_node.tolist(), plan.npages.tolist())) == [(1, 2), (2, 2)]


def test_two_runs_and_a_gap():
    src = np.array([0, 1, 2, 10, 11, 20])
    dst = np.array([5, 6, 7, 8, 9, 30])
    plan = plan_copy(np.zeros(6), src, np.ones(6), dst, channels=1)
    got = sorted(zip(plan.src_start.tolist(), plan.dst_start.tolist(), plan.npages.tolist()))
    assert got == [(0, 5, 3), (10, 8, 2), (20, 30, 1)]


def test_duplicate_sources_are_kept():
    # One source page copied to two destinations (allowed): both copies stay in the plan.
    plan = plan_copy(np.zeros(3), np.array([4, 4, 5]), np.ones(3), np.array([0, 9, 1]), channels=2)
    assert as_set(expand(plan)) == [(0, 4, 1, 0), (0, 4, 1, 9), (0, 5, 1, 1)]


def test_empty_plan():
    plan = plan_copy(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), channels=3)
    assert plan.nr_runs == 0 and plan.nr_pages == 0 and list(plan.segments()) == []
    assert plan.channel_pages().tolist() == [0, 0, 0]


# -- splitting and balancing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [2, 3, 4, 8])
def test_one_huge_run_uses_every_channel(channels):
    n = 1 << 16
    plan = plan_copy(np.zeros(n), np.arange(n), np.ones(n), np.arange(n), channels=channels)
    loads = plan.channel_pages()
    assert (loads > 0).all()
    assert loads.max() - loads.min() <= 1
    assert plan.nr_runs == channels
    check_plan(plan, np.zeros(n), np.arange(n), np.ones(n), np.arange(n), channels)


def test_short_copy_is_not_split():
    plan = plan_copy(np.zeros(40), np.arange(40), np.ones(40), np.arange(40), channels=4,
                     options=PlanOptions(split_min_pages=64))
    assert plan.nr_runs == 1 and plan.channel_pages().max() == 40


def test_split_pieces_are_at_most_the_fair_share():
    plan = plan_copy(np.zeros(1000), np.arange(1000), np.ones(1000), np.arange(1000), channels=4,
                     options=PlanOptions(split_min_pages=64))
    assert plan.npages.max() <= 250 and plan.nr_pages == 1000


def test_scattered_pages_balance_exactly():
    rng = np.random.default_rng(2)
    src = rng.permutation(10_000)[:4001]
    dst = rng.permutation(10_000)[:4001]
    plan = plan_copy(np.zeros(src.size), src, np.ones(src.size), dst, channels=4)
    loads = plan.channel_pages()
    assert loads.max() - loads.min() <= 1
    # Prefix partition: each channel reads one contiguous stretch of the sorted sources.
    for c in range(4):
        s = plan.src_start[plan.channel == c]
        assert (np.diff(s) > 0).all()


def test_large_runs_are_placed_by_lpt():
    # Runs of 300, 300, 200, 200, 200, 200 pages on 2 channels: LPT gives 700/700.
    sizes = [300, 300, 200, 200, 200, 200]
    starts = np.cumsum([0] + sizes[:-1]) * 2  # gaps keep the runs apart
    src = np.concatenate([s + np.arange(n) for s, n in zip(starts, sizes)])
    plan = plan_copy(np.zeros(src.size), src, np.ones(src.size), src, channels=2,
                     options=PlanOptions(split_min_pages=10_000))
    assert sorted(plan.channel_pages().tolist()) == [700, 700]
    assert plan.nr_runs == len(sizes)


def test_mixed_large_and_small_runs_balance():
    rng = np.random.default_rng(3)
    big = np.arange(5000)
    small = 100_000 + rng.choice(50_000, size=3000, replace=False) * 2
    src = np.concatenate([big, small])
    dst = np.concatenate([big, rng.permutation(src.size)[:small.size] + 20_000])
    plan = plan_copy(np.zeros(src.size), src, np.ones(src.size), dst, channels=3)
    loads = plan.channel_pages()
    assert loads.max() <= -(-src.size // 3) + plan.npages.max()
    assert loads.min() > 0


# -- method choice ----------------------------------------------------------------------------------------
def _runs(lengths, gap=3):
    starts = np.cumsum([0] + [n + gap for n in lengths[:-1]])
    return np.concatenate([s + np.arange(n) for s, n in zip(starts, lengths)])


def test_method_threshold():
    pages = _runs([1, 7, 8, 100])
    plan = plan_copy(np.zeros(pages.size), pages, np.ones(pages.size), pages, channels=1,
                     options=PlanOptions(memcpy_min_pages=8))
    by_len = dict(zip(plan.npages.tolist(), plan.method.tolist()))
    assert by_len == {1: METHOD_GATHER, 7: METHOD_GATHER, 8: METHOD_MEMCPY, 100: METHOD_MEMCPY}


def test_batch_only_when_available_and_chosen():
    pages = _runs([2, 10, 50, 200])
    opts = PlanOptions(memcpy_min_pages=8, use_batch=True, batch_max_pages=100)
    args = (np.zeros(pages.size), pages, np.ones(pages.size), pages)
    plan = plan_copy(*args, channels=1, options=opts, batch_available=True)
    assert dict(zip(plan.npages.tolist(), plan.method.tolist())) == {
        2: METHOD_GATHER, 10: METHOD_BATCH, 50: METHOD_BATCH, 200: METHOD_MEMCPY}
    assert METHOD_BATCH not in plan_copy(*args, channels=1, options=opts, batch_available=False).method
    assert METHOD_BATCH not in plan_copy(*args, channels=1, options=PlanOptions(),
                                         batch_available=True).method


def test_plan_options_are_frozen_and_validated():
    opts = PlanOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.memcpy_min_pages = 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument, match="memcpy_min_pages"):
            PlanOptions(memcpy_min_pages=bad)
    with pytest.raises(InvalidArgument, match="channels"):
        plan_copy(np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1), channels=0)


def test_truncated_keeps_a_prefix_of_each_segment():
    src = np.arange(0, 200, 2)
    plan = plan_copy(np.zeros(src.size), src, np.ones(src.size), src, channels=2)
    half = plan.truncated(0.5)
    assert half.nr_pages == 50
    assert set(as_set(expand(half))) <= set(as_set(expand(plan)))
    assert plan.truncated(0.0).nr_runs == 0


# -- sorting and coalescing primitives -------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["distinct-dense", "duplicates", "sparse", "sorted"])
def test_sort_pages_matches_stable_argsort(case):
    rng = np.random.default_rng(4)
    if case == "distinct-dense":
        src = rng.permutation(5000)
    elif case == "duplicates":
        src = rng.integers(0, 50, 5000)
    elif case == "sparse":
        src = rng.choice(10**9, 500, replace=False)
    else:
        src = np.arange(100)
    pair = rng.integers(0, 3, src.size)
    order = sort_pages(pair, src.astype(np.int64))
    key = pair * (src.max() + 1) + src
    if case == "sorted":
        key = src
        order = sort_pages(0, src.astype(np.int64))
        assert order is None
        return
    np.testing.assert_array_equal(key[order], np.sort(key, kind="stable"))
    np.testing.assert_array_equal(order, np.argsort(key, kind="stable"))


def test_coalesce_runs_primitive():
    starts, src_start, npages = coalesce_runs(np.array([3, 4, 5, 9]), np.array([0, 1, 5, 6]))
    assert starts.tolist() == [0, 2, 3]
    assert src_start.tolist() == [3, 5, 9]
    assert npages.tolist() == [2, 1, 1]


# -- random inputs -------------------------------------------------------------------------------------------------
@st.composite
def submissions(draw):
    nodes = draw(st.integers(1, 3))
    n = draw(st.integers(1, 300))
    frames = draw(st.integers(n, 3 * n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    style = draw(st.sampled_from(["random", "blocks", "contiguous"]))
    if style == "random":
        si = rng.choice(frames, n, replace=draw(st.booleans()))
        di = rng.choice(frames, n, replace=False)
    elif style == "contiguous":
        si = np.arange(n) + rng.integers(0, frames)
        di = np.arange(n) + rng.integers(0, frames)
    else:  # shuffled blocks, contiguous on both sides inside each block
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, rng.integers(0, 6)), replace=False))
        si = np.concatenate([b + rng.integers(0, 4) * 1000 for b in np.split(np.arange(n), cuts)])
        di = si + 17
        perm = rng.permutation(n)
        si, di = si[perm], di[perm]
    sn = rng.integers(0, nodes, n)
    dn = rng.integers(0, nodes, n)
    if draw(st.booleans()):
        sn[:] = sn[0]
        dn[:] = dn[0]
    channels = draw(st.integers(1, 5))
    opts = PlanOptions(memcpy_min_pages=draw(st.integers(1, 16)), split_min_pages=draw(st.integers(1, 80)),
                       large_run_fraction=draw(st.integers(1, 10)), use_batch=draw(st.booleans()),
                       batch_max_pages=draw(st.integers(1, 64)))
    return sn, si.astype(np.int64), dn, di.astype(np.int64), channels, opts, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(submissions())
def test_random_plans_are_exact_balanced_and_typed(sub):
    sn, si, dn, di, channels, opts, batch = sub
    plan = plan_copy(sn, si, dn, di, channels=channels, options=opts, batch_available=batch)
    check_plan(plan, sn, si, dn, di, channels)
    total = si.size
    loads = plan.channel_pages()
    assert loads.sum() == total
    # List-scheduling bound: no channel above the mean by more than the longest run.
    assert loads.max() <= -(-total // channels) + int(plan.npages.max())
    # Method per run follows the thresholds.
    long = plan.npages >= opts.memcpy_min_pages
    assert (plan.method[~long] == METHOD_GATHER).all()
    if batch and opts.use_batch:
        mid = long & (plan.npages < opts.batch_max_pages)
        assert (plan.method[mid] == METHOD_BATCH).all()
        assert (plan.method[long & ~mid] == METHOD_MEMCPY).all()
    else:
        assert (plan.method[long] == METHOD_MEMCPY).all()


@settings(max_examples=100, deadline=None)
@given(submissions())
def test_unsplit_single_channel_runs_are_the_maximal_runs(sub):
    sn, si, dn, di, _, _, _ = sub
    plan = plan_copy(sn, si, dn, di, channels=1, options=NO_SPLIT)
    ref = reference_runs(sn.tolist(), si.tolist(), dn.tolist(), di.tolist())
    got = sorted(zip(plan.src_node.tolist(), plan.src_start.tolist(), plan.dst_node.tolist(),
                     plan.dst_start.tolist(), plan.npages.tolist()))
    assert got == sorted(map(tuple, ref))


@settings(max_examples=200, deadline=None)
@given(submissions())
def test_compiled_plan_equals_the_numpy_reference(sub):
    """The compiled one-pass planner and the numpy steps give the same plan, run for run."""
    import dmamig.dma.plan as plan_mod

    sn, si, dn, di, channels, opts, batch = sub
    sn, dn = np.full_like(sn, sn[0]), np.full_like(dn, dn[0])  # the compiled pass plans one node pair
    got = plan_copy(sn, si, dn, di, channels=channels, options=opts, batch_available=batch)
    try:
        plan_mod.USE_COMPILED = False
        want = plan_copy(sn, si, dn, di, channels=channels, options=opts, batch_available=batch)
    finally:
        plan_mod.USE_COMPILED = True
    for name in ("src_node", "dst_node", "src_start", "dst_start", "npages", "channel", "method", "seg_start",
                 "seg_end"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


@settings(max_examples=200, deadline=None)
@given(submissions())
def test_ring_rows_are_the_plan_run_for_run(sub):
    """One compiled submission onto a lane's rings (plan + rows + publish) gives the planner's runs, channel by
    channel, as each channel's rows, and the counters a channel would count for them."""
    from dmamig.dma import ring as dma_ring
    from dmamig.dma.copy_plan import METHOD_GATHER as GATHER

    if not dma_ring.RING_AVAILABLE:
        pytest.skip(dma_ring.RING_ERROR)
    sn, si, dn, di, channels, opts, _batch = sub
    sn, dn = np.full_like(sn, sn[0]), np.full_like(dn, dn[0])
    want = plan_copy(sn, si, dn, di, channels=channels, options=opts)
    page = 64
    s_addr, d_addr = 1 << 20, 1 << 30
    base_s, base_d = 1000, 5000
    rings = dma_ring.RingSet(channels, row_capacity=max(1, si.size), job_capacity=2)
    got = rings.route(base_s, base_d, s_addr, d_addr, page, opts).submit(si.astype(np.int64) + base_s,
                                                                       di.astype(np.int64) + base_d)
    assert got.nr_runs == want.nr_runs
    for c, ring in enumerate(rings.rings):
        mine = want.channel == c
        k = int(mine.sum())
        assert (got.seqs[c] == -1) == (k == 0)
        assert ring.tail == (1 if k else 0)
        if not k:
            continue
        assert ring.jobs[0, :3].tolist() == [dma_ring.JOB_ROWS, 0, k]
        rows = ring.rows[:k]
        assert np.array_equal(rows[:, 0], s_addr + want.src_start[mine] * page)
        assert np.array_equal(rows[:, 1], d_addr + want.dst_start[mine] * page)
        assert np.array_equal(rows[:, 2], want.npages[mine] * page)
        gather = want.method[mine] == GATHER
        segs = [s for s in want.segments() if s.channel == c and s.method == GATHER]
        assert ring.counters == (len(segs), int((~gather).sum()))
