"""The device DMA engine: planning (coalesce, balance, choose a method), channels, fences and checksums."""

from __future__ import annotations

from .checksum import page_checksums
from .engine import DmaEngine, DmaStats, Fence
from .plan import METHOD_BATCH, METHOD_GATHER, METHOD_MEMCPY, CopyPlan, PlanOptions, plan_copy

__all__ = [
    "METHOD_BATCH",
    "METHOD_GATHER",
    "METHOD_MEMCPY",
    "CopyPlan",
    "DmaEngine",
    "DmaStats",
    "Fence",
    "PlanOptions",
    "page_checksums",
    "plan_copy",
]
