"""Migration settings: the kernel's batching by default, anything else a named experiment.

The kernel's ``migrate_pages_batch()`` takes :data:`NR_MAX_BATCHED_MIGRATION` base pages, unmaps them, copies
(or, with a DMA engine, submits the copy and waits for it), moves them, and only then takes the next batch.
:class:`MigrateOptions` with its defaults is exactly that. Other values are experiments the kernel does not run
(bigger batches, several batches per step, one step's DMA copy overlapping the next step's unmap); every
benchmark result records the options it ran with, so a figure always says which one it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidArgument

__all__ = ["FAITHFUL", "NR_MAX_BATCHED_MIGRATION", "RFC_DMA_OFFLOAD", "RFC_DMA_OFFLOAD_BATCH_PAGES", "MigrateOptions"]

#: Base pages unmapped (and flushed) together before any of them moves (``NR_MAX_BATCHED_MIGRATION``).
NR_MAX_BATCHED_MIGRATION = 512


@dataclass(frozen=True)
class MigrateOptions:
    """How a migration batches its work.

    Parameters
    ----------
    batch_pages : int
        Base pages per batch: unmapped together, one TLB flush, then moved together. The kernel's value is
        ``NR_MAX_BATCHED_MIGRATION`` (512). A large folio never splits across batches, so a batch may hold
        more when one folio alone is larger.
    batches_per_step : int
        Consecutive batches whose phases run together (each still counts its own TLB flush). ``1`` is the
        kernel. More amortizes the emulator's per-call cost over more pages: an experiment setting.
    pipeline_depth : int
        With a DMA engine, how many steps' copies may be in flight while the next step is unmapped. ``0`` is
        the kernel and the DMA batch-offload RFC (submit, wait, move, next batch). ``1`` overlaps one step's
        copy with the next step's unmap: an experiment setting. Blocking passes (sync modes' per-folio retries)
        always run unpipelined, so the core never sleeps on a lock while holding other page locks.
    unaudited_no_copy : bool
        Let no-copy migration move the folios of a filesystem that writes folios without the folio lock
        (``Filesystem(locks_folios=False)``). ``False`` is the kernel's precaution: such a migration fails with
        ``-EINVAL``. ``True`` is an experiment that shows why: a write that lands on the source after its DMA
        copy is lost.
    """

    batch_pages: int = NR_MAX_BATCHED_MIGRATION
    batches_per_step: int = 1
    pipeline_depth: int = 0
    unaudited_no_copy: bool = False

    def __post_init__(self) -> None:
        for name, low in (("batch_pages", 1), ("batches_per_step", 1), ("pipeline_depth", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidArgument(f"MigrateOptions.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.unaudited_no_copy, bool):
            raise InvalidArgument(f"MigrateOptions.unaudited_no_copy must be True or False, got "
                                  f"{self.unaudited_no_copy!r}")

    @property
    def faithful(self) -> bool:
        """True for the kernel's own batching (the default)."""
        return self == FAITHFUL

    def changes(self) -> list[tuple[str, int]]:
        """The settings that differ from the kernel's, as ``(name, value)`` in field order."""
        return [(name, getattr(self, name)) for name in ("batch_pages", "batches_per_step", "pipeline_depth",
                                                         "unaudited_no_copy")
                if getattr(self, name) != getattr(FAITHFUL, name)]

    @property
    def label(self) -> str:
        """A short name for reports: ``faithful`` or the settings that differ from it."""
        words = {"batch_pages": "batch {}", "batches_per_step": "{} batches/step", "pipeline_depth": "pipeline {}",
                 "unaudited_no_copy": "no-copy on un-audited files"}
        return ", ".join(words[n].format(v) for n, v in self.changes()) or "faithful"

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (for ``results.json``), with ``faithful`` beside them.

        ``unaudited_no_copy`` appears only where it is set: it changes nothing for anonymous memory, and the
        results recorded before it existed keep their form."""
        d = asdict(self)
        if not self.unaudited_no_copy:
            del d["unaudited_no_copy"]
        return {**d, "faithful": self.faithful}

    @classmethod
    def coerce(cls, value: Any, name: str = "options") -> MigrateOptions:
        """``None`` gives the defaults; a MigrateOptions passes; anything else is an error naming ``name``."""
        if value is None:
            return FAITHFUL
        if isinstance(value, cls):
            return value
        raise InvalidArgument(f"{name} must be a MigrateOptions or None (the kernel's batching), got {value!r}")


#: The kernel's batching: 512-page batches, one at a time, no pipeline.
FAITHFUL = MigrateOptions()

#: Base pages per batch in the DMA batch-offload RFC's measurements: its patched kernels raised
#: ``NR_MAX_BATCHED_MIGRATION`` so that one batch holds 1 GiB of 4 KiB pages.
RFC_DMA_OFFLOAD_BATCH_PAGES = 1 << 18
#: The DMA batch-offload RFC's configuration, as an experiment preset: 1 GiB batches, one at a time, no pipeline.
#: Not what a released kernel does; reported beside the faithful figure, never instead of it.
RFC_DMA_OFFLOAD = MigrateOptions(batch_pages=RFC_DMA_OFFLOAD_BATCH_PAGES)
