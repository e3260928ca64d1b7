"""dmamig: emulated Linux page migration between memory nodes with a device DMA engine.

Copy migration (the migrating thread copies every page) and no-copy migration (a DMA engine copies while the
core moves page state only, the kernel's ``MIGRATE_SYNC_NO_COPY`` idea), on a CPU backend or on CUDA streams.
"""

from .balloon import Balloon
from .errors import (
    AddressFault,
    BackendUnavailable,
    DmaError,
    DmamigError,
    InvalidArgument,
    MigrationStalled,
    OutOfMemory,
)
from .fault_injection import FaultAttr, FaultPoints
from .filemap import File, Filesystem
from .flags import MigrateMode, MigratePfn, MigrateReason, MigrateVmaSelect, PageFlag, Prot, PteFlag
from .machine import Machine
from .migrate import MigrateOptions, MigrateResult, MigrateStats, MigrateVma
from .migrate.move_pages import MovePagesResult
from .mm import AddressSpace
from .nodes import Node
from .tiering import Policy, ReplayResult, Trace, TraceError, replay
from .topology import Topology
from .uvm import DeviceAccessor, UvmOptions, UvmStats

__version__ = "0.1.0"

__all__ = [
    "AddressFault",
    "AddressSpace",
    "BackendUnavailable",
    "Balloon",
    "DeviceAccessor",
    "DmaError",
    "DmamigError",
    "FaultAttr",
    "FaultPoints",
    "File",
    "Filesystem",
    "InvalidArgument",
    "Machine",
    "MigrateMode",
    "MigrateOptions",
    "MigratePfn",
    "MigrateReason",
    "MigrateResult",
    "MigrateStats",
    "MigrateVma",
    "MigrateVmaSelect",
    "MigrationStalled",
    "MovePagesResult",
    "Node",
    "OutOfMemory",
    "PageFlag",
    "Policy",
    "Prot",
    "PteFlag",
    "ReplayResult",
    "Topology",
    "Trace",
    "TraceError",
    "UvmOptions",
    "UvmStats",
    "__version__",
    "replay",
]
