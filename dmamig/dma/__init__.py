"""The device DMA engine: planning (coalesce, balance, choose a method), channels, fences and checksums."""

from __future__ import annotations

from .checksum import page_checksums
from .copy_plan import METHOD_BATCH, METHOD_GATHER, METHOD_MEMCPY, CopyPlan, PlanOptions
from .engine import DmaEngine
from .fence import Fence
from .plan import plan_copy
from .stats import DmaStats

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
