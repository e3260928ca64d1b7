"""Each policy's decisions on small hand-made epochs, against the migrations expected."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import InvalidArgument
from dmamig.tiering import (
    FirstTouch,
    Lru,
    Migration,
    NumaBalancing,
    Observation,
    Policy,
    Tiers,
    Tpp,
    make_policy,
)

FAST, SLOW = 0, 1


def tiers(pages=16, fast=8) -> Tiers:
    return Tiers(fast=FAST, slow=SLOW, capacity={FAST: fast, SLOW: 32}, pages=pages)


def obs(epoch, accessed, placement, free_fast, counts=None) -> Observation:
    """An epoch in which ``accessed`` pages (repeats count) were touched, with ``placement`` at its start."""
    pages, cnt = np.unique(np.asarray(accessed, dtype=np.int64), return_counts=True)
    if counts is not None:
        cnt = np.asarray(counts)
    placement = np.asarray(placement, dtype=np.int64)
    return Observation(epoch, pages, cnt, np.zeros(pages.size, dtype=bool), placement[pages] == SLOW, placement,
                       {FAST: free_fast, SLOW: 10})


def moves(ms: list[Migration]) -> list[tuple[str, int, list[int]]]:
    return [(m.kind, m.node, sorted(m.pages.tolist())) for m in ms]


PLACE = [FAST] * 4 + [SLOW] * 12  # pages 0..3 fast, 4..15 slow


def test_first_touch_never_moves():
    p = FirstTouch()
    p.start(tiers())
    assert p.epoch(obs(0, [4, 4, 4, 5, 6], PLACE, 4)) == []


def test_numa_balancing_promotes_after_the_threshold():
    p = NumaBalancing(threshold=3, rate_limit=8, decay=False)
    p.start(tiers())
    assert moves(p.epoch(obs(0, [4, 4, 5, 0, 0, 0], PLACE, 4))) == []  # 2 hint faults on page 4: not yet
    assert moves(p.epoch(obs(1, [4, 5], PLACE, 4))) == [("promote", FAST, [4])]  # page 4 reached 3
    # Promoted pages start counting from zero again; fast pages never count.
    place = list(PLACE)
    place[4] = FAST
    assert moves(p.epoch(obs(2, [4, 4, 4, 0, 0, 0], place, 3))) == []


def test_numa_balancing_respects_rate_limit_and_free_room():
    p = NumaBalancing(threshold=1, rate_limit=2, decay=False)
    p.start(tiers())
    # Five slow pages hot; the hottest two go (ties by page number), the rest wait for the next epoch.
    first = p.epoch(obs(0, [4, 5, 6, 7, 8], PLACE, 4, counts=[1, 3, 1, 2, 1]))
    assert moves(first) == [("promote", FAST, [5, 7])]
    p2 = NumaBalancing(threshold=1, rate_limit=8, decay=False)
    p2.start(tiers())
    assert moves(p2.epoch(obs(0, [4, 5, 6], PLACE, 1))) == [("promote", FAST, [4])]  # one free fast frame
    assert moves(p2.epoch(obs(1, [5, 6], PLACE, 0))) == []  # a full fast tier: no promotion, no demotion


def test_numa_balancing_decay_forgets_old_faults():
    p = NumaBalancing(threshold=3, rate_limit=8, decay=True)
    p.start(tiers())
    assert p.epoch(obs(0, [4, 4], PLACE, 4)) == []
    assert p.epoch(obs(1, [], PLACE, 4)) == []  # 2 -> 1 after decay
    assert moves(p.epoch(obs(2, [4], PLACE, 4))) == []  # 1 -> 0, + 1 = 1 < 3


def test_tpp_demotes_cold_pages_under_the_low_watermark():
    p = Tpp(threshold=1, rate_limit=4, low=0.25, high=0.5, decay=False)
    p.start(tiers(fast=8))
    place = [FAST] * 8 + [SLOW] * 8  # the fast tier (8 frames) is full: free 0 < low (2)
    # Up to high (4 free) of the pages not used in this epoch: only 6 and 7 qualify.
    assert moves(p.epoch(obs(0, [0, 1, 2, 3, 4, 5], place, 0))) == [("demote", SLOW, [6, 7])]
    # Next epoch, the coldest first: 6, 7 (never used), then 0..5 (used at epoch 0) were it short of 4.
    # Page 8 is hot but finds no room above low yet: it waits until the demotion made some.
    assert moves(p.epoch(obs(1, [1, 2, 3, 4, 8], place, 0))) == [("demote", SLOW, [0, 5, 6, 7])]


def test_tpp_promotes_within_the_room_above_low():
    p = Tpp(threshold=1, rate_limit=8, low=0.25, high=0.5, decay=False)
    p.start(tiers(fast=8))
    got = moves(p.epoch(obs(0, [8, 9, 10, 11, 12], PLACE, 4)))  # 4 free, low = 2: room for 2 promotions
    assert ("promote", FAST, [8, 9]) in got
    assert got[0][0] == "demote" and got[0][2] == [0, 1]  # more hot pages than room: make room


def test_lru_brings_slow_pages_in_and_evicts_least_recent():
    p = Lru(rate_limit=8)
    p.start(tiers(fast=4))
    assert p.epoch(obs(0, [0, 1, 2], PLACE, 0)) == []  # all fast: nothing to do
    got = moves(p.epoch(obs(1, [1, 2, 3, 6, 7], PLACE, 0)))
    assert got == [("demote", SLOW, [0]), ("promote", FAST, [6])]  # one victim (page 0), one page in


def test_user_policy_in_a_few_lines():
    class PromoteWrites(Policy):
        name = "promote-writes"

        def epoch(self, o):
            hot = o.pages[o.written & o.hint]
            return [Migration(hot[: o.free[self.tiers.fast]], self.tiers.fast)]

    p = PromoteWrites()
    p.start(tiers())
    o = obs(0, [4, 5, 6], PLACE, 1)
    o.written[:] = [False, True, True]
    assert moves(p.epoch(o)) == [("promote", FAST, [5])]


def test_make_policy_and_bad_settings():
    assert isinstance(make_policy("tpp", low=0.1, high=0.2), Tpp)
    with pytest.raises(InvalidArgument, match="built-in policies"):
        make_policy("clock")
    with pytest.raises(InvalidArgument, match="watermarks"):
        Tpp(low=0.5, high=0.1)
    with pytest.raises(InvalidArgument, match="threshold"):
        NumaBalancing(threshold=0)


def test_uvm_policies_set_how_device_actors_fault():
    lru, counters = make_policy("uvm-lru"), make_policy("uvm-counters", threshold=3)
    assert lru.uvm_options(no_copy=True).no_copy and lru.uvm_options(no_copy=True).eviction == "lru"
    assert counters.uvm_options(no_copy=False).access_counter_threshold == 3
    assert not counters.uvm_options(no_copy=False).no_copy
    assert FirstTouch().uvm_options(no_copy=True).access_counter_threshold == 0
    with pytest.raises(InvalidArgument):
        make_policy("uvm-lru", eviction="random")
