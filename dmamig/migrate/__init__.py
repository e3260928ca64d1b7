"""The migration core: migrate_pages batches, state transfer, and migrate_vma device migration."""

from .core import MigrateResult, MigrateStats
from .device import MigrateVma
from .options import FAITHFUL, NR_MAX_BATCHED_MIGRATION, MigrateOptions

__all__ = ["FAITHFUL", "NR_MAX_BATCHED_MIGRATION", "MigrateOptions", "MigrateResult", "MigrateStats", "MigrateVma"]
