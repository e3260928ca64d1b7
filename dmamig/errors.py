"""The exception tree.

Per-page migration failures are status codes (``0`` or ``-errno``), never exceptions; exceptions are for bad
arguments and unrecoverable conditions.
"""

from __future__ import annotations

__all__ = [
    "AddressFault",
    "BackendUnavailable",
    "DmaError",
    "DmamigError",
    "InvalidArgument",
    "MigrationStalled",
    "OutOfMemory",
]


class DmamigError(Exception):
    """Base class of every error dmamig raises."""


class InvalidArgument(DmamigError, ValueError):
    """An argument was malformed: unaligned, empty, out of range, unknown node or wrong dtype."""


class AddressFault(DmamigError):
    """An access touched a virtual address that no mapping covers."""


class OutOfMemory(DmamigError, MemoryError):
    """No free frames were left for a fault, a populate or an allocation."""


class DmaError(DmamigError):
    """A DMA submission failed; raised by ``Fence.wait``."""


class BackendUnavailable(DmamigError, RuntimeError):
    """The requested backend cannot run here (no cupy, no device, or a driver problem)."""


class MigrationStalled(DmamigError, TimeoutError):
    """A wait for another thread's migration of a range did not end in time (a driver that never finished
    its ``MigrateVma``, or a migration stuck elsewhere); the waiting call changed nothing."""
