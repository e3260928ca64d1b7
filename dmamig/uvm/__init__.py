"""Device-side access, UVM-style: fault batching, prefetch, oversubscription and eviction.

A :class:`DeviceAccessor` lets a device node read and write an address space. Non-resident pages fault;
faults are serviced in batches through the migration core (:mod:`dmamig.uvm.faults`), widened by a prefetch
policy (:mod:`dmamig.uvm.prefetch`), and an oversubscribed device evicts 2 MiB blocks back to host memory
(:mod:`dmamig.uvm.evict`). Access-counter migration (:mod:`dmamig.uvm.counters`) and read duplication
(:mod:`dmamig.uvm.dup`) are settings of :class:`UvmOptions`.
"""

from .access import DeviceAccessor
from .counters import AccessCounters
from .dup import ReadDuplicates
from .evict import EVICTION_POLICIES, BlockTracker, migrate_device_pages, migrate_device_range, tracker_of
from .options import DEFAULT_FAULT_BATCH_SIZE, SERVICE_PHASES, VA_BLOCK_SIZE, UvmOptions, UvmStats
from .prefetch import density_prefetch

__all__ = ["DEFAULT_FAULT_BATCH_SIZE", "EVICTION_POLICIES", "SERVICE_PHASES", "VA_BLOCK_SIZE", "AccessCounters",
           "BlockTracker", "DeviceAccessor", "ReadDuplicates", "UvmOptions", "UvmStats", "density_prefetch",
           "migrate_device_pages", "migrate_device_range", "tracker_of"]
