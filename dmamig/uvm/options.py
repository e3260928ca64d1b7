"""Settings and counters of device-side access: :class:`UvmOptions` and :class:`UvmStats`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..migrate.options import MigrateOptions
from ..migrate.result import PHASES

__all__ = ["DEFAULT_FAULT_BATCH_SIZE", "PREFETCH_POLICIES", "SERVICE_PHASES", "UvmOptions", "UvmStats",
           "VA_BLOCK_SIZE"]

#: Faults the driver fetches from the fault buffer per batch (UVM's ``uvm_perf_fault_batch_count``).
DEFAULT_FAULT_BATCH_SIZE = 256
#: Bytes of one virtual block: UVM services and prefetches faults per 2 MiB ``va_block``.
VA_BLOCK_SIZE = 2 << 20
#: Prefetch policies: ``none`` migrates the faulted pages only; ``density`` is UVM's bitmap-tree prefetch.
PREFETCH_POLICIES = ("none", "density")
#: Where the service time of a batch goes: fetching and grouping faults, the prefetch decision, evicting,
#: zero-filling untouched pages on the device, the migration core's own phases, and the replay.
SERVICE_PHASES = ("fetch", "prefetch", "evict", "populate", *PHASES, "replay")


@dataclass(frozen=True)
class UvmOptions:
    """How a device services its faults.

    Parameters
    ----------
    fault_batch_size : int
        Fault-buffer entries fetched and serviced together before a replay.
    prefetch : {"density", "none"}
        ``density`` migrates, besides the faulted pages, every aligned subregion of their 2 MiB block
        in which more than ``prefetch_threshold`` percent of the pages are resident on the device or faulted
        (UVM's ``uvm_perf_prefetch``); ``none`` migrates only the faulted pages.
    prefetch_threshold : int
        Percentage for the density prefetch, 1 to 100 (UVM's default is 51).
    no_copy : bool
        Service through the machine's DMA engine (no-copy migration: the engine copies, the core moves
        state) instead of the migrating thread's copy.
    eviction : {"lru", "fifo"}
        Which device-resident 2 MiB blocks an oversubscribed device evicts first: least recently accessed
        (UVM's default) or first made resident.
    faults_per_page : int
        Fault-buffer entries each non-resident page raises in one access of a contiguous range, as the
        several warps touching one page each fault: the extra ones are duplicates the batch drops.
    migrate_options : MigrateOptions or None
        Batching of the migration core (``None`` is the kernel's).
    access_counter_threshold : int
        ``0`` (the default): every non-resident page faults and migrates. ``N > 0``: access-counter
        migration: a page populated elsewhere is accessed remotely, in place, and migrates once the device
        has accessed it ``N`` times (pages never touched still fault in on the device).
    read_duplication : bool
        UVM's read-mostly memory: a device read of a private page resident elsewhere makes a read-only copy
        on the device and leaves the page where it is; any write (CPU or device), munmap or close drops
        the copies first.
    """

    fault_batch_size: int = DEFAULT_FAULT_BATCH_SIZE
    prefetch: str = "density"
    prefetch_threshold: int = 51
    no_copy: bool = True
    eviction: str = "lru"
    faults_per_page: int = 1
    migrate_options: MigrateOptions | None = None
    access_counter_threshold: int = 0
    read_duplication: bool = False

    def __post_init__(self) -> None:
        for name, low, high in (("fault_batch_size", 1, 1 << 20), ("prefetch_threshold", 1, 100),
                                ("faults_per_page", 1, 1024), ("access_counter_threshold", 0, 1 << 30)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise InvalidArgument(f"UvmOptions.{name} must be an integer in {low}..{high}, got {v!r}")
        if self.prefetch not in PREFETCH_POLICIES:
            raise InvalidArgument(f"UvmOptions.prefetch must be one of {PREFETCH_POLICIES}, got {self.prefetch!r}")
        if self.eviction not in ("lru", "fifo"):
            raise InvalidArgument(f"UvmOptions.eviction must be 'lru' or 'fifo', got {self.eviction!r}")
        for name in ("no_copy", "read_duplication"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"UvmOptions.{name} must be a bool, got {getattr(self, name)!r}")
        MigrateOptions.coerce(self.migrate_options, "UvmOptions.migrate_options")

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (for results files)."""
        d = asdict(self)
        mo = MigrateOptions.coerce(self.migrate_options)
        d["migrate_options"] = mo.as_dict()
        return d


@dataclass
class UvmStats:
    """Counters of one device's accesses through a :class:`~dmamig.uvm.DeviceAccessor`.

    Attributes
    ----------
    accesses : int
        Calls that accessed memory (read, write, touch, in any form).
    faults : int
        Fault-buffer entries fetched, duplicates included.
    duplicates : int
        Entries dropped because their page was already in the batch.
    batches, replays : int
        Fault batches serviced, and replays (one per batch: the access retries after each).
    pages_faulted : int
        Distinct pages faulted (summed over batches).
    pages_migrated, bytes_migrated : int
        Pages (and bytes) the migration core moved onto the device, prefetched ones included.
    pages_populated : int
        Untouched (or zero-page) pages given a zeroed page on the device without any copy.
    pages_prefetched : int
        Pages brought in (migrated or populated) that did not fault themselves.
    pages_evicted, bytes_evicted, blocks_evicted : int
        Device pages sent back to host memory to make room, and the 2 MiB blocks they belonged to.
    pages_remote : int
        Page accesses served in place on another node: the page could not come (pinned, no room), or
        access-counter migration left it there until its count reaches the threshold.
    pages_counter_migrated : int
        Pages whose access count reached the threshold and were serviced for migration.
    pages_read_duplicated, pages_collapsed : int
        Read-only device copies made (read duplication), and copies dropped because the page was written,
        unmapped, or their frames were needed.
    pages_resident : int
        Page accesses that found their page on the device already.
    service_ns : dict
        Wall nanoseconds per service phase (:data:`SERVICE_PHASES`).
    access_ns : int
        Wall nanoseconds of the in-place accesses themselves.
    """

    accesses: int = 0
    faults: int = 0
    duplicates: int = 0
    batches: int = 0
    replays: int = 0
    pages_faulted: int = 0
    pages_migrated: int = 0
    bytes_migrated: int = 0
    pages_populated: int = 0
    pages_prefetched: int = 0
    pages_evicted: int = 0
    bytes_evicted: int = 0
    blocks_evicted: int = 0
    pages_remote: int = 0
    pages_counter_migrated: int = 0
    pages_read_duplicated: int = 0
    pages_collapsed: int = 0
    pages_resident: int = 0
    service_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICE_PHASES, 0))
    access_ns: int = 0

    @property
    def service_total_ns(self) -> int:
        """All service time, every phase together."""
        return sum(self.service_ns.values())

    @property
    def service_ns_per_batch(self) -> float:
        """Mean service time of a fault batch (0.0 before the first)."""
        return self.service_total_ns / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain values."""
        return {**asdict(self), "service_total_ns": self.service_total_ns,
                "service_ns_per_batch": self.service_ns_per_batch}
