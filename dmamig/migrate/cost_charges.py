"""What a batch of the migration core charges to a cost model's clock: the counts of the work it really did.

The core calls :meth:`BatchCharges.unmapped` once a batch is unmapped, flushed and submitted, and the
:meth:`BatchRecord.moved` it returns once the batch is moved (see :mod:`dmamig.cost_model.clock` for why there are two
halves). Only the counts are gathered here; the prices are the model's. Without a cost model the core makes no
:class:`BatchCharges` and pays nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..cost_model.clock import CallCharge, Hist, ModelClock, MoveCharge, UnmapCharge, histogram

if TYPE_CHECKING:
    from ..machine import Machine
    from .entries import Entries
    from .result import MigrateStats

__all__ = ["BatchCharges", "BatchRecord", "coalesced_runs"]


def coalesced_runs(src: np.ndarray, dst: np.ndarray, nr: np.ndarray) -> np.ndarray:
    """Base pages per run once folios contiguous on both sides are merged (in source order), as the DMA
    engine's planner coalesces a submission."""
    if src.size == 0:
        return nr[:0]
    order = np.argsort(src, kind="stable")
    s, d, n = src[order], dst[order], nr[order]
    starts = np.flatnonzero(np.r_[True, (s[1:] != s[:-1] + n[:-1]) | (d[1:] != d[:-1] + n[:-1])])
    return np.add.reduceat(n, starts)


class BatchCharges:
    """The counts of one migration call's batches, charged to ``clock``.

    Parameters
    ----------
    m : Machine
        The machine (its page state gives the mappings per folio).
    entries : Entries
        The call's entries.
    stats : MigrateStats
        The call's counters (the DMA fallbacks are read from them).
    clock : ModelClock
        The modelled clock of the call.
    """

    def __init__(self, m: Machine, entries: Entries, stats: MigrateStats, clock: ModelClock):
        self.m, self.e, self.stats, self.clock = m, entries, stats, clock
        self.maps = np.zeros(entries.src.size, dtype=np.int64)  # mappings per entry, taken before its unmap
        clock.charge(CallCharge(int(entries.src.size)))

    @classmethod
    def start(cls, m: Machine, entries: Entries, stats: MigrateStats) -> BatchCharges | None:
        """The charges of a call on ``m``, or ``None`` when the machine has no cost model (nothing is charged)."""
        model = getattr(m, "cost_model", None)
        return None if model is None else cls(m, entries, stats, ModelClock(model))

    def before_unmap(self, todo: np.ndarray) -> None:
        """Note the mappings of the folios a batch will try (the unmap replaces them by migration entries)."""
        if self.maps.size < self.e.src.size:  # a split large folio added entries for its pieces
            self.maps = np.concatenate([self.maps, np.zeros(self.e.src.size - self.maps.size, dtype=np.int64)])
        self.maps[todo] = np.maximum(self.m.pages.mapcount[self.e.src[todo]], 0)

    def unmapped(self, tried: int, moving: np.ndarray, flushes: int, submitted: bool) -> BatchRecord:
        """The batch's first half: ``tried`` folio attempts, ``moving`` unmapped, its flushes and submission."""
        e = self.e
        dma_folios: Hist = ()
        dma_runs: Hist = ()
        if submitted:
            need = moving[~e.fresh[moving]]
            nr = e.nr[need]
            dma_folios = histogram(nr)
            dma_runs = histogram(coalesced_runs(e.src[need], e.dst[need], nr))
        self.clock.charge(UnmapCharge(tried, histogram(e.nr[moving]), int(self.maps[moving].sum()), flushes,
                                      dma_folios, dma_runs))
        return BatchRecord(self, moving, self.stats.nr_dma_fallback, submitted)


class BatchRecord:
    """One batch between its two halves (a pipelined step's batches are in flight together)."""

    def __init__(self, charges: BatchCharges, moving: np.ndarray, fallback0: int, submitted: bool):
        self.charges, self.moving, self.fallback0, self.submitted = charges, moving, fallback0, submitted
        self.fresh = moving[:0].astype(bool)

    def before_move(self) -> None:
        """Note which folios have a current copy before the move loop (the CPU copies the others)."""
        self.fresh = self.charges.e.fresh[self.moving].copy()

    def moved(self, freezes: int, left: np.ndarray) -> None:
        """The batch's second half: its reference ``freezes``, the folios moved, those ``left`` to undo."""
        c = self.charges
        e, moving, maps = c.e, self.moving, c.maps
        done = e.status[moving] == 0
        moved = moving[done]
        copied = moving[done & ~self.fresh]
        c.clock.charge(MoveCharge(freezes, histogram(e.nr[moved]), int(maps[moved].sum()), histogram(e.nr[copied]),
                                  c.stats.nr_dma_fallback - self.fallback0, int(left.size), int(maps[left].sum()),
                                  self.submitted))
