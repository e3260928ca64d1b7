"""What a migration reports: per-page status, the kernel's counters, and where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..cost_model.clock import ModelledTime
from ..flags import MigrateMode, MigrateReason
from .options import MigrateOptions

__all__ = ["PHASES", "MigrateEvent", "MigrateResult", "MigrateStats"]

#: Wall-time phases of the migrating thread. ``isolate`` and ``putback`` are the per-call work around the
#: batches (collecting and isolating the folios of the range; putting back what did not move and building the
#: result); ``unmap``, ``copy``, ``submit`` (handing a batch's copy to the DMA engine: planning, queueing),
#: ``dma_wait``, ``move`` and ``undo`` are the batch phases.
PHASES = ("isolate", "unmap", "copy", "submit", "dma_wait", "move", "undo", "putback")


@dataclass(frozen=True)
class MigrateEvent:
    """One ``migrate_pages()`` call as the kernel's ``mm_migrate_pages`` tracepoint records it.

    Attributes
    ----------
    succeeded, failed : int
        Base pages migrated, and base pages that failed (``nr_succeeded``, ``nr_failed_pages``).
    thp_succeeded, thp_failed, thp_split : int
        PMD-sized folios migrated, failed and split.
    large_folio_split : int
        Large folios of any size split (``nr_split``).
    mode : MigrateMode
        ``ASYNC``, ``SYNC_LIGHT`` or ``SYNC`` (``NO_COPY`` included where it applied).
    reason : MigrateReason
        Why the pages migrated.
    """

    succeeded: int
    failed: int
    thp_succeeded: int
    thp_failed: int
    thp_split: int
    large_folio_split: int
    mode: MigrateMode
    reason: MigrateReason

    def as_dict(self) -> dict[str, int | str]:
        """The record with plain values (names for mode and reason), for JSON."""
        return {"succeeded": self.succeeded, "failed": self.failed, "thp_succeeded": self.thp_succeeded,
                "thp_failed": self.thp_failed, "thp_split": self.thp_split,
                "large_folio_split": self.large_folio_split, "mode": str(self.mode.name),
                "reason": self.reason.name}


@dataclass
class MigrateStats:
    """Counters of one migrate call (``struct migrate_pages_stats``, plus the DMA engine's).

    ``nr_thp_*`` count PMD-sized folios only (order 9), as the kernel's ``thp_migration_*`` do;
    ``nr_large_*`` and ``nr_split`` count every large folio. ``nr_passes`` adds up, per batch, the passes of
    its longer loop (unmap or move).
    """

    nr_succeeded: int = 0
    nr_failed_pages: int = 0
    nr_thp_succeeded: int = 0
    nr_thp_failed: int = 0
    nr_thp_split: int = 0
    nr_large_succeeded: int = 0
    nr_large_failed: int = 0
    nr_split: int = 0
    nr_no_copy: int = 0
    nr_dma_fallback: int = 0
    nr_untried_pages: int = 0
    nr_tlb_flush: int = 0
    nr_passes: int = 0
    nr_unmap_passes: int = 0
    nr_move_passes: int = 0


@dataclass
class MigrateResult:
    """What a migration did: per-page status and counters, in base pages as the kernel counts.

    Attributes
    ----------
    status : numpy.ndarray
        One int32 per requested base page: ``0`` (migrated or already on the node) or ``-errno``:
        ``-EAGAIN`` (busy or pinned), ``-EBUSY`` (writeback, or not migratable), ``-ENOMEM`` (target full; also
        the pages the call never reached once a base page found no frame), ``-ENOENT`` (no page there).
    nr_succeeded, nr_failed : int
        Base pages migrated, and base pages the core tried and could not migrate (untried pages are in
        neither: see ``stats.nr_untried_pages``).
    nr_thp_succeeded, nr_thp_failed, nr_thp_split : int
        PMD-sized folios migrated whole, failed (a split one included), and split to migrate as base pages.
    rc : int
        The kernel's return value of ``migrate_pages()``: the number of folios not migrated (a split large
        folio counts as one, its pieces not at all; ``0`` when every folio moved, a split one's pieces all
        included), or ``-ENOMEM`` when a base page found no frame.
    phase_ns : dict
        Wall nanoseconds on the migrating thread per phase (see :data:`PHASES`).
    thread_time_ns, wall_ns : int
        CPU time of the migrating thread and wall time of the whole call.
    options : MigrateOptions
        The batching the call ran with (the kernel's unless an experiment asked otherwise).
    modelled : ModelledTime or None
        With a cost model on the machine (``Machine(cost_model=...)``): what the model says the call took,
        labelled with the model's name. Never part of the measured fields above.
    """

    status: np.ndarray
    nr_succeeded: int = 0
    nr_failed: int = 0
    nr_thp_succeeded: int = 0
    nr_thp_failed: int = 0
    nr_thp_split: int = 0
    phase_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    thread_time_ns: int = 0
    wall_ns: int = 0
    stats: MigrateStats = field(default_factory=MigrateStats)
    options: MigrateOptions = field(default_factory=MigrateOptions)
    rc: int = 0
    modelled: ModelledTime | None = None

    @property
    def ok(self) -> bool:
        """True when every requested page ended on the target node."""
        return bool((self.status == 0).all())
